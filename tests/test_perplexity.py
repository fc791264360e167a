"""The perplexity protocol (umqcli/perplexity.py) on a tiny random Llama built by transformers."""

from __future__ import annotations

import math

import pytest
import torch

from umqcli.errors import UMQError
from umqcli.perplexity import Perplexity, PerplexityIncrease, perplexity, token_windows

transformers = pytest.importorskip("transformers")


class _CountingTokenizer:
    """Token id = position modulo 50: enough to test windowing without a vocabulary file."""

    def __call__(self, text: str, add_special_tokens: bool = True):
        assert add_special_tokens is False  # the protocol never adds BOS/EOS
        return {"input_ids": [i % 50 for i in range(len(text.split()))]}


def _tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config).eval()


def test_windows_are_non_overlapping_and_drop_the_partial_tail():
    windows = token_windows(_CountingTokenizer(), "w " * 70, window=16, max_tokens=60)
    assert windows.shape == (3, 16)  # min(70, 60) // 16 = 3 windows
    assert windows.flatten().tolist() == [i % 50 for i in range(48)]


def test_perplexity_matches_the_models_own_loss_per_window():
    model = _tiny_llama()
    windows = token_windows(_CountingTokenizer(), "w " * 100, window=16, max_tokens=100)
    result = perplexity(model, windows)
    with torch.no_grad():
        # Every window scores 15 tokens, so the mean of per-window mean losses is the token mean.
        losses = [float(model(input_ids=w[None], labels=w[None]).loss) for w in windows]
    assert result == Perplexity(value=pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-5), tokens=96, window=16)
    assert result.scored_tokens == 6 * 15


def test_increase_is_relative_to_the_reference():
    increase = PerplexityIncrease(reference=20.0, packed=20.5, tokens=512, window=128)
    assert increase.increase_pct == pytest.approx(2.5)
    assert increase.to_json() == {"reference": 20.0, "packed": 20.5, "increase_pct": pytest.approx(2.5), "tokens": 512, "window": 128}


@pytest.mark.parametrize(
    ("words", "window", "max_tokens", "rule"),
    [(10, 16, 100, "perplexity-text"), (100, 1, 100, "perplexity-window"), (100, 32, 16, "perplexity-window")],
)
def test_bad_windows_name_the_text_and_rule(words, window, max_tokens, rule):
    with pytest.raises(UMQError) as caught:
        token_windows(_CountingTokenizer(), "w " * words, window=window, max_tokens=max_tokens, source="prose.txt")
    assert caught.value.rule == rule and caught.value.file == "prose.txt"

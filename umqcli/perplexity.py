"""Perplexity of a causal language model on a text, by one fixed protocol.

Protocol (every perplexity umq reports follows it, so numbers are comparable):

1. Tokenize the whole text once with the model's tokenizer, without special tokens.
2. Keep the first ``max_tokens`` tokens and cut them into non-overlapping windows of
   ``window`` tokens; a partial last window is dropped. Each window is scored on its own
   (no context carried between windows).
3. In each window the model predicts tokens 2..``window`` from the ones before them, so
   ``windows * (window - 1)`` tokens are scored.
4. Perplexity = exp(mean negative log-likelihood over all scored tokens), the log-softmax
   taken in float32 whatever the model's dtype.

``tokens`` in a :class:`Perplexity` is the number of text tokens used
(``windows * window``); ``window`` is the window length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .errors import UMQError

DEFAULT_WINDOW = 256
DEFAULT_MAX_TOKENS = 4096
# Windows scored per forward pass: bounds memory (batch * window * vocab float32 logits).
_BATCH_WINDOWS = 4


@dataclass(frozen=True)
class Perplexity:
    """One measurement: ``value`` over ``tokens`` text tokens in windows of ``window``."""

    value: float
    tokens: int
    window: int

    @property
    def scored_tokens(self) -> int:
        return (self.tokens // self.window) * (self.window - 1)


@dataclass(frozen=True)
class PerplexityIncrease:
    """Reference and packed perplexity on the same token windows."""

    reference: float
    packed: float
    tokens: int
    window: int

    @property
    def increase_pct(self) -> float:
        return 100.0 * (self.packed / self.reference - 1.0)

    def to_json(self) -> dict[str, float | int]:
        return {
            "reference": self.reference,
            "packed": self.packed,
            "increase_pct": self.increase_pct,
            "tokens": self.tokens,
            "window": self.window,
        }


def token_windows(
    tokenizer: Any,
    text: str,
    *,
    window: int = DEFAULT_WINDOW,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    source: str | None = None,
) -> torch.Tensor:
    """The text's token ids as an int64 ``[windows, window]`` tensor (steps 1-2 above).

    ``source`` names the text in errors (a file path, usually).
    """
    if window < 2:
        raise UMQError(f"a perplexity window needs at least 2 tokens, got {window}", rule="perplexity-window", file=source)
    if max_tokens < window:
        raise UMQError(
            f"the token limit {max_tokens} is below one window of {window}", rule="perplexity-window", file=source
        )
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    count = min(len(ids), max_tokens) // window
    if count == 0:
        raise UMQError(
            f"the text has {len(ids)} tokens, fewer than one window of {window}", rule="perplexity-text", file=source
        )
    return torch.tensor(ids[: count * window], dtype=torch.int64).view(count, window)


@torch.no_grad()
def perplexity(model: torch.nn.Module, windows: torch.Tensor) -> Perplexity:
    """Score ``windows`` (from :func:`token_windows`) with ``model`` (steps 3-4 above)."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    total_nll = 0.0
    scored = 0
    was_training = model.training
    model.eval()
    try:
        for start in range(0, windows.shape[0], _BATCH_WINDOWS):
            batch = windows[start : start + _BATCH_WINDOWS].to(device)
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
            targets = batch[:, 1:]
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
            )
            total_nll += float(nll)
            scored += targets.numel()
    finally:
        model.train(was_training)
    return Perplexity(value=math.exp(total_nll / scored), tokens=windows.numel(), window=windows.shape[1])


def text_perplexity(
    model: torch.nn.Module,
    tokenizer: Any,
    text: str,
    *,
    window: int = DEFAULT_WINDOW,
    max_tokens: int = DEFAULT_MAX_TOKENS,
) -> Perplexity:
    """:func:`token_windows` then :func:`perplexity`."""
    return perplexity(model, token_windows(tokenizer, text, window=window, max_tokens=max_tokens))

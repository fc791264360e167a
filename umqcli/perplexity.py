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
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from .errors import UMQError
from .progress import ProgressFn, no_progress

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


# --------------------------------------------------------------------------- whole models


def read_text(path: str | Path) -> str:
    """The UTF-8 text of ``path`` (:class:`UMQError` naming it when unreadable)."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UMQError(f"cannot read the perplexity text ({exc.__class__.__name__}: {exc})",
                       rule="perplexity-text", file=path) from None


def _model_dir(path: str | Path, role: str) -> Path:
    path = Path(path)
    if not (path.is_dir() and (path / "config.json").is_file()):
        raise UMQError(f"perplexity needs the {role} as a Hugging Face model directory (with config.json "
                       "and tokenizer files)", rule="perplexity-model", file=path)
    return path


def perplexity_inputs(packed_dir: str | Path, reference_dir: str | Path, text_file: str | Path) -> tuple[Path, Path, str]:
    """The packed and reference model directories and the text of :func:`packed_perplexity`,
    checked (:class:`UMQError` naming the one at fault): a caller can refuse them before
    a long run, not after it."""
    return _model_dir(packed_dir, "packed model"), _model_dir(reference_dir, "reference"), read_text(text_file)


def packed_perplexity(
    packed_dir: str | Path,
    reference_dir: str | Path,
    text_file: str | Path,
    *,
    window: int = DEFAULT_WINDOW,
    max_tokens: int = DEFAULT_MAX_TOKENS,
) -> PerplexityIncrease:
    """Perplexity of the reference model and of the packed one (``load_hf``) on the same
    token windows of ``text_file``, tokenized by the reference's tokenizer; both run in
    float32 apart from the packed weights themselves."""
    from .integrations.transformers import load_dense_model, load_hf
    from .nn import configure

    packed_dir, reference_dir, text = perplexity_inputs(packed_dir, reference_dir, text_file)
    model, tokenizer = load_dense_model(reference_dir)
    windows = token_windows(tokenizer, text, window=window, max_tokens=max_tokens, source=str(text_file))
    reference = perplexity(model, windows)
    del model
    packed = configure(load_hf(packed_dir, dtype=torch.float32), cache_decoded=True)  # decode once, not per window
    measured = perplexity(packed, windows)
    return PerplexityIncrease(reference=reference.value, packed=measured.value, tokens=reference.tokens, window=window)


def fake_quantized_perplexities(
    source_dir: str | Path,
    text_file: str | Path,
    fake_quantizers: Mapping[str, Callable[[str, torch.Tensor], torch.Tensor]],
    weight_names: Sequence[str],
    *,
    window: int = DEFAULT_WINDOW,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    progress: ProgressFn = no_progress,
) -> tuple[Perplexity, dict[str, Perplexity]]:
    """(reference perplexity, {format: perplexity}) of the float32 model in ``source_dir``
    with each of ``weight_names`` (checkpoint names) replaced by
    ``fake_quantizers[format](name, stored weight)`` (the stored dtype, float32 result).
    Every format sees the same token windows; the weights are restored between formats."""
    from .calibrate.hooks import match_weight_names
    from .integrations.transformers import load_dense_model
    from .io import open_checkpoint

    source_dir = _model_dir(source_dir, "source")
    model, tokenizer = load_dense_model(source_dir)
    windows = token_windows(tokenizer, read_text(text_file), window=window, max_tokens=max_tokens,
                            source=str(text_file))
    linears = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    owner = {weight: module for module, weight in match_weight_names(linears, weight_names).items()}
    missing = [name for name in weight_names if name not in owner]
    if missing:
        raise UMQError(f"no linear layer of the model holds {missing[0]} ({len(missing)} weight(s) unmatched)",
                       rule="perplexity-model", file=source_dir, tensor=missing[0])
    reference = perplexity(model, windows)
    results: dict[str, Perplexity] = {}
    with open_checkpoint(source_dir) as checkpoint:
        stored = {name: checkpoint.get(name) for name in weight_names}
    original = {name: linears[owner[name]].weight.detach().clone() for name in weight_names}
    try:
        for done, (format_name, fake_quantize) in enumerate(fake_quantizers.items()):
            progress(format_name, done, len(fake_quantizers))
            with torch.no_grad():
                for name in weight_names:
                    linears[owner[name]].weight.copy_(fake_quantize(name, stored[name]))
            results[format_name] = perplexity(model, windows)
        progress("", len(fake_quantizers), len(fake_quantizers))
    finally:
        with torch.no_grad():
            for name in weight_names:
                linears[owner[name]].weight.copy_(original[name])
    return reference, results

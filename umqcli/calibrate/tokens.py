"""Tokenising calibration text into fixed-length model inputs that cover the whole corpus."""

from __future__ import annotations

from typing import Sequence

import torch

from ..errors import UMQError


def _special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """The token ids the tokenizer puts before and after a text (``[CLS]``/``[SEP]``,
    ``<s>``, ...), found by tokenising one word with and without special tokens."""
    probe = "calibration"
    bare = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(bare) + 1):
        if full[start:start + len(bare)] == bare:
            return list(full[:start]), list(full[start + len(bare):])
    return [], []


def make_sequences(
    tokenizer, documents: Sequence[tuple[str, str]], *, samples: int, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token sequences for calibration: int64 ``input_ids [N, L]`` and ``attention_mask
    [N, L]`` with ``N <= samples``, ``L <= seq_len``.

    The documents are tokenised and concatenated (separator token between documents) into
    one stream, cut into chunks that fill ``seq_len`` together with the model's special
    tokens; when there are more chunks than ``samples``, evenly spaced chunks are taken, so
    the sequences cover the whole text, not just its beginning.
    """
    if samples < 1 or seq_len < 8:
        raise UMQError(f"need samples >= 1 and seq_len >= 8, got {samples} and {seq_len}", rule="calibration-data")
    prefix, suffix = _special_tokens(tokenizer)
    special = len(prefix) + len(suffix)
    body = seq_len - special
    if body < 1:
        raise UMQError(f"seq_len {seq_len} leaves no room next to {special} special tokens", rule="calibration-data")
    separator = [tokenizer.sep_token_id] if tokenizer.sep_token_id is not None else (
        [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
    stream: list[int] = []
    for _, text in documents:
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        if stream and ids:
            stream.extend(separator)
        stream.extend(ids)
    chunks = [stream[i:i + body] for i in range(0, len(stream), body)]
    if len(chunks) > 1 and len(chunks[-1]) < body:
        chunks.pop()  # a short tail would only add padding
    if len(chunks) > samples:
        step = len(chunks) / samples
        chunks = [chunks[int(i * step)] for i in range(samples)]
    rows = [prefix + c + suffix for c in chunks]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(rows), width), pad, dtype=torch.int64)
    attention = torch.zeros((len(rows), width), dtype=torch.int64)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = torch.tensor(r, dtype=torch.int64)
        attention[i, : len(r)] = 1
    return input_ids, attention

"""Statistics through hooks: run the model on calibration text and stream the input of
every ``nn.Linear`` into an :class:`~umqcli.stats.ActivationAccumulator`, keyed by the
checkpoint's weight names."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from ..progress import ProgressFn, no_progress
from ..stats import OUTLIER_THRESHOLD, ActivationAccumulator, ChannelStats
from .corpus import read_documents
from .model import load_hf_model
from .tokens import make_sequences


def match_weight_names(module_names: Iterable[str], checkpoint_names: Iterable[str]) -> dict[str, str]:
    """Map ``nn.Linear`` module names to checkpoint weight names by suffix.

    Module names and checkpoint keys often differ by a prefix (``bert.`` in a checkpoint
    of ``BertForMaskedLM`` loaded as ``BertModel``, or ``model.`` the other way round).
    ``m`` matches checkpoint key ``k`` when ``m + ".weight"`` equals ``k``, or one is the
    other with a leading ``"<prefix>."``. A module with no match or several matches is left
    out (its tensor then gets weights-only statistics), never guessed.
    """
    checkpoint = [n for n in checkpoint_names if n.endswith(".weight")]
    exact = set(checkpoint)
    by_last: dict[str, list[str]] = {}
    for key in checkpoint:
        by_last.setdefault(key.rsplit(".", 2)[-2] if key.count(".") else key, []).append(key)
    mapping: dict[str, str] = {}
    for module in module_names:
        wanted = module + ".weight"
        if wanted in exact:
            mapping[module] = wanted
            continue
        last = wanted.rsplit(".", 2)[-2] if wanted.count(".") else wanted
        hits = [k for k in by_last.get(last, []) if k.endswith("." + wanted) or wanted.endswith("." + k)]
        if len(hits) == 1:
            mapping[module] = hits[0]
    # Two modules must not claim one tensor (e.g. tied weights under two names).
    claimed: dict[str, list[str]] = {}
    for module, key in mapping.items():
        claimed.setdefault(key, []).append(module)
    return {m: k for m, k in mapping.items() if len(claimed[k]) == 1}


@dataclass
class StatsRun:
    """What :func:`collect_stats` measured: statistics per checkpoint weight name, the
    metadata for the stats file, and which linear modules could not be mapped."""

    stats: dict[str, ChannelStats]
    metadata: dict[str, str]
    unmatched_modules: list[str]
    peak_state_bytes: int


def collect_stats(
    model_dir: str | Path,
    data: str | Path,
    *,
    checkpoint_names: Iterable[str],
    samples: int = 128,
    seq_len: int = 128,
    batch_size: int = 8,
    sample_rows: int = 128,
    seed: int = 0,
    hessian: bool = False,
    progress: ProgressFn = no_progress,
) -> StatsRun:
    """Run the model on the calibration text and record the input statistics of every
    ``nn.Linear`` (see :mod:`umqcli.stats`), keyed by checkpoint weight name.

    Padding positions are excluded (the attention mask selects real tokens). The model
    runs under ``torch.inference_mode`` in batches of ``batch_size`` sequences; the hooks
    fold each batch into running sums at once, so memory does not grow with ``samples``.

    ``hessian``: also ``H = E[x x^T]`` (float32) per distinct linear input, for the gptq
    method. Layers that are handed the same input tensor (q/k/v, gate/up) share one H,
    keyed by the first of them: ``4 C^2`` bytes per distinct input of width C, held for
    the whole run (MiniLM ~66 MB, SmolLM2-135M ~0.4 GB; a 4096-wide 32-layer Llama with
    11008-wide FFN inputs ~22 GB, see ``docs/gptq.md``).
    """
    model, tokenizer = load_hf_model(model_dir)
    documents = read_documents(data)
    input_ids, attention = make_sequences(tokenizer, documents, samples=samples, seq_len=seq_len)
    linear_names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    mapping = match_weight_names(linear_names, checkpoint_names)
    accumulator = ActivationAccumulator(sample_rows=sample_rows, seed=seed)
    current_mask: list[torch.Tensor | None] = [None]
    # Per batch: input tensor id -> (the tensor, kept alive so its id stays unique; the
    # first weight that read it). Weights reading the same tensor share its statistics
    # and its Hessian, measured once.
    batch_inputs: dict[int, tuple[torch.Tensor, str]] = {}

    def make_hook(weight_name: str):
        def hook(module, args):
            x = args[0]
            first_reader = batch_inputs.setdefault(id(x), (x, weight_name))[1]
            if first_reader != weight_name:  # q/k/v, gate/up: statistics measured once
                accumulator.update(weight_name, x, hessian_key=first_reader if hessian else None,
                                   same_input_as=first_reader)
                return
            token_mask = current_mask[0]
            if token_mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(token_mask.shape):
                x = x[token_mask]
            accumulator.update(weight_name, x, hessian_key=weight_name if hessian else None)

        return hook

    modules = dict(model.named_modules())
    handles = [modules[m].register_forward_pre_hook(make_hook(k)) for m, k in mapping.items()]
    head_kwargs = _skip_unused_head(model, set(mapping))
    total = input_ids.shape[0]
    peak = 0
    try:
        with torch.inference_mode():
            for start in range(0, total, batch_size):
                ids = input_ids[start:start + batch_size]
                mask = attention[start:start + batch_size]
                current_mask[0] = mask.bool()
                batch_inputs.clear()
                model(input_ids=ids, attention_mask=mask, **head_kwargs)
                peak = max(peak, accumulator.nbytes)
                progress("calibrate", min(start + batch_size, total), total)
    finally:
        batch_inputs.clear()
        for handle in handles:
            handle.remove()
    stats = accumulator.result()
    tokens = int(attention.sum())
    metadata = {
        "tokens": str(tokens),
        "samples": str(total),
        "seq_len": str(input_ids.shape[1]),
        "seed": str(seed),
        "source": f"model={Path(model_dir).name}; data={Path(data).name} ({len(documents)} files)",
        "outlier_threshold": str(OUTLIER_THRESHOLD),
    }
    unmatched = sorted(set(linear_names) - set(mapping))
    return StatsRun(stats=stats, metadata=metadata, unmatched_modules=unmatched, peak_state_bytes=peak)


def _skip_unused_head(model, hooked: set[str]) -> dict[str, int]:
    """``{"logits_to_keep": 1}`` for a causal LM whose output head is not hooked (tied to
    the embeddings, or not in the checkpoint): its vocabulary-wide matmul for every token
    (a fifth of SmolLM2's forward) then runs for one position only. ``{}`` otherwise."""
    import inspect

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or "logits_to_keep" not in inspect.signature(model.forward).parameters:
        return {}
    names = {id(module): name for name, module in model.named_modules()}
    return {} if names.get(id(head)) in hooked else {"logits_to_keep": 1}

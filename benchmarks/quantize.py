"""Codec throughput against a plain per-channel FP8 cast, measured in the same run.

    python benchmarks/quantize.py                 # 4096 x 4096 fp16, 5 repeats
    python benchmarks/quantize.py --size 2048 --repeat 3 --threads 1

For a random heavy-tailed fp16 matrix it times, per row of the table:

- ``plain fp8 cast``: the baseline, ``amax`` per row, divide, cast to float8_e4m3fn
  (quantize) and ``q.float() * scale -> fp16`` (decode) in plain torch;
- ``umq`` k = 1, 2, 4 with the magnitude selection (the default path: the fused numba
  pass when numba is installed) and the same with ``fused=False`` (the torch reference);
- ``umq`` k = 1 with the error-greedy selection (torch only).

Throughput is source elements per second (and source GB/s, 2 bytes per element);
"x plain" is the row's throughput over the plain cast's (quantize: >= 0.5 is the target).
Each row is timed alternately with the plain cast, ``--repeat`` times each after one
warm-up (which also loads or compiles the numba code); times are medians and "x plain"
is the median of the per-pair ratios, so that both sides of a ratio saw the same load;
"(cpu)" is the same ratio on process CPU time (all threads), which the other jobs of a
shared machine disturb least. Before timing, every umq row is checked to decode to a relative error
below 4 % and the fused and reference bytes are checked to be identical.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from umqcli import _fused, codec
from umqcli.format import LoFormat, QuantParams, Selection


def heavy_tailed(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """fp16 [rows, cols]: student-t (df 4) * 0.02 with 0.1 % outliers at 10..50x."""
    gen = torch.Generator().manual_seed(seed)
    normal = torch.randn(rows, cols, generator=gen)
    chi2 = torch.randn(4, rows, cols, generator=gen).square_().sum(0)
    values = normal / (chi2 / 4).sqrt_()
    outliers = torch.rand(rows, cols, generator=gen) < 1e-3
    values[outliers] *= 10 + 40 * torch.rand(int(outliers.sum()), generator=gen)
    return (values * 0.02).to(torch.float16)


def plain_cast(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The baseline: per-row absmax scale, divide, cast to FP8 E4M3 (no mask, no hi)."""
    w32 = weight.float()
    scale = w32.abs().amax(1, keepdim=True).div_(448.0)
    return w32.div_(scale).to(torch.float8_e4m3fn), scale


def plain_decode(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float().mul_(scale).to(torch.float16)


def timed_pair(baseline, candidate, repeat: int) -> tuple[float, float, float, float]:
    """Time ``baseline`` and ``candidate`` alternately, ``repeat`` times each after one
    warm-up call of both, so that both see the same machine load (this machine is shared).
    Returns (median baseline wall s, median candidate wall s, median of the per-pair wall
    ratios baseline / candidate, ratio of the median process CPU times baseline /
    candidate). CPU time is what the machine's other jobs disturb least."""
    baseline()
    candidate()
    wall = {0: [], 1: []}
    cpu = {0: [], 1: []}
    for _ in range(repeat):
        for which, fn in ((0, baseline), (1, candidate)):
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            wall[which].append(time.perf_counter() - start)
            cpu[which].append(time.process_time() - start_cpu)
    ratios = [b / c for b, c in zip(wall[0], wall[1])]
    return (
        statistics.median(wall[0]),
        statistics.median(wall[1]),
        statistics.median(ratios),
        statistics.median(cpu[0]) / statistics.median(cpu[1]),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=4096, help="rows = columns of the fp16 matrix")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per row (median)")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch.set_num_threads (the fused pass follows it; 0: as is)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    weight = heavy_tailed(args.size, args.size)
    elements = weight.numel()
    numba = None
    if _fused.available():
        _fused._follow_torch_threads()
        numba = _fused.kernels().numba
    print(
        f"{args.size} x {args.size} float16, median of {args.repeat}; torch {torch.__version__} "
        f"threads={torch.get_num_threads()}, numba "
        f"{f'{numba.__version__} threads={numba.get_num_threads()}' if numba else 'not used'}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus"
    )

    rows = []
    q, scale = plain_cast(weight)
    base_quantize = lambda: plain_cast(weight)  # noqa: E731
    base_decode = lambda: plain_decode(q, scale)  # noqa: E731
    base_q = timed_pair(base_quantize, base_quantize, args.repeat)[0]
    base_d = timed_pair(base_decode, base_decode, args.repeat)[0]
    rows.append(("plain fp8 cast (per-row e4m3)", base_q, 1.0, 1.0, base_d, 1.0, 1.0))

    configs = []
    for k in (1, 2, 4):
        params = QuantParams(k=k, lo=LoFormat.FP8_E4M3)
        if _fused.available():
            configs.append((f"umq k={k} magnitude, fused", params, True))
        configs.append((f"umq k={k} magnitude, torch", params, False))
    configs.append(("umq k=1 error-greedy, torch", QuantParams(k=1, selection=Selection.ERROR), False))

    for label, params, fused in configs:
        packed = codec.quantize(weight, params, fused=fused)
        error = codec.weight_error(weight, packed)
        assert error < 0.04, f"{label}: relative error {error:.4f}"
        if fused:
            reference = codec.quantize(weight, params, fused=False)
            assert torch.equal(reference.data, packed.data) and torch.equal(reference.scale, packed.scale)
        _, quantize_s, quantize_ratio, quantize_cpu = timed_pair(
            base_quantize, lambda: codec.quantize(weight, params, fused=fused), args.repeat
        )
        _, decode_s, decode_ratio, decode_cpu = timed_pair(
            base_decode, lambda: codec.dequantize(packed, fused=fused), args.repeat
        )
        rows.append((label, quantize_s, quantize_ratio, quantize_cpu, decode_s, decode_ratio, decode_cpu))

    header = (
        f"{'path':32} {'quantize ms':>11} {'Melem/s':>8} {'GB/s':>6} {'x plain':>8} {'(cpu)':>6} "
        f"{'decode ms':>10} {'Melem/s':>8} {'x plain':>8} {'(cpu)':>6}"
    )
    print(header)
    print("-" * len(header))
    for label, quantize_s, quantize_ratio, quantize_cpu, decode_s, decode_ratio, decode_cpu in rows:
        print(
            f"{label:32} {quantize_s * 1e3:11.1f} {elements / quantize_s / 1e6:8.1f} "
            f"{2 * elements / quantize_s / 1e9:6.2f} {quantize_ratio:8.2f} {quantize_cpu:6.2f} "
            f"{decode_s * 1e3:10.1f} {elements / decode_s / 1e6:8.1f} {decode_ratio:8.2f} {decode_cpu:6.2f}"
        )

if __name__ == "__main__":
    main()

"""CPU timing of UMQLinear's forward next to nn.Linear, measured in the same run.

For each shape ``x [M, C] @ W [R, C]^T + b`` (float32 activations) it times:

- ``nn.Linear``: float32 weights, ``F.linear`` (the baseline);
- ``UMQLinear``: weights kept packed; every call decodes ``Ŵ`` (backend ``torch``:
  ``codec.dequantize`` to float32) and multiplies;
- ``UMQLinear cache``: ``cache_decoded=True``: the float32 decode is kept after the first
  call (the weight is then no longer held packed: +4 bytes per weight);
- ``decode``: the backend's decode alone (what the per-call mode pays on top of the matmul).

and the weight bytes each variant holds. Times are medians of ``--repeat`` runs after a
warm-up, in milliseconds. Nothing is asserted: the numbers go into docs/runtime.md.

    python benchmarks/linear.py [--repeat 20] [--k 1] [--shapes 1x384x1536,...]
"""

from __future__ import annotations

import argparse
import os

import torch
from torch import nn

from umqcli.backends import get_backend
from umqcli.format import QuantParams
from umqcli.nn import UMQLinear, weight_memory

from _timing import time_ms

DEFAULT_SHAPES = "1x384x1536,128x384x1536,1x1536x384,1x2048x2048,32x2048x2048,512x2048x2048,1x4096x4096"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated MxCxR (tokens x in x out)")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--k", type=int, default=1)
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch intra-op threads (1 by default: comparable numbers on a shared machine)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)  # the fused numba decode follows torch's count

    torch.manual_seed(0)
    backend = get_backend("torch")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, k={args.k}, lo=fp8_e4m3, "
        f"one scale per row, UMQ_FUSED={os.environ.get('UMQ_FUSED', 'default')}, median of {args.repeat}, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    header = (
        f"{'M x C x R':>18} | {'nn.Linear ms':>12} | {'UMQLinear ms':>12} {'(x)':>6} | "
        f"{'cache ms':>9} {'(x)':>5} | {'decode ms':>9} | {'fp32 KiB':>9} {'packed KiB':>10} {'+cache KiB':>10}"
    )
    print(header)
    print("-" * len(header))
    for shape in args.shapes.split(","):
        m, c, r = (int(v) for v in shape.lower().split("x"))
        linear = nn.Linear(c, r)
        with torch.no_grad():
            linear.weight[:, ::37] *= 10.0  # a few outlier columns, as in real weights
        per_call = UMQLinear.from_linear(linear, QuantParams(k=args.k), backend="torch")
        cached = UMQLinear.from_packed(per_call.packed, per_call.bias, backend="torch", cache_decoded=True)
        x = torch.randn(m, c)
        with torch.inference_mode():
            t_linear = time_ms(lambda: linear(x), args.repeat, stat="median")
            t_umq = time_ms(lambda: per_call(x), args.repeat, stat="median")
            t_cache = time_ms(lambda: cached(x), args.repeat, stat="median")
            t_decode = time_ms(lambda: backend.decode(per_call.packed, torch.float32), args.repeat, stat="median")
            torch.testing.assert_close(per_call(x), cached(x), rtol=1e-4, atol=1e-4)  # same math
        fp32_kib = weight_memory(linear).total / 1024
        packed_kib = weight_memory(per_call).total / 1024
        cached_kib = weight_memory(cached).total / 1024
        print(
            f"{shape:>18} | {t_linear:12.3f} | {t_umq:12.3f} {t_umq / t_linear:5.1f}x | "
            f"{t_cache:9.3f} {t_cache / t_linear:4.1f}x | {t_decode:9.3f} | "
            f"{fp32_kib:9.0f} {packed_kib:10.0f} {cached_kib:10.0f}"
        )


if __name__ == "__main__":
    main()

"""Benchmark: the CUDA kernels executed on the CPU through the g++ host shim.

The shim is a test vehicle (blocks run one after another on one core, every CUDA thread
is a ucontext fiber), so this only shows that the CPU kernel tests stay cheap; the
baseline in the same run is torch's float32 matmul with the decoded weight.

Run: ``python benchmarks/kernels_shim.py [--repeat 5]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from umqcli.backends.cuda import CudaBackend
from umqcli.testing.host_shim import HostShimRunner
from umqcli.codec import dequantize, quantize
from umqcli.format import QuantParams

from _timing import time_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        shim = CudaBackend(runner=HostShimRunner.build(tmp))
        print(f"g++ build of the shim library: {time.perf_counter() - start:.2f} s")
        print(f"{'M x R x C':>16} {'blocks x threads':>17} {'shim matmul ms':>15} {'shim decode ms':>15} {'torch matmul ms':>16}")
        generator = torch.Generator().manual_seed(0)
        for m, r, c in ((1, 256, 128), (16, 256, 128), (64, 256, 128), (17, 130, 264), (256, 384, 384)):
            packed = quantize(torch.randn(r, c, generator=generator), QuantParams(k=2, lo="fp8_e4m3", block=8))
            x = torch.randn(m, c, generator=generator)
            weight = dequantize(packed, torch.float32)
            # M <= 16: the GEMV kernel (8 rows per block), else 64 x 64 tiles.
            blocks = -(-r // 8) if m <= 16 else -(-r // 64) * -(-m // 64)
            shim_mm = time_ms(lambda: shim.matmul(x, packed), args.repeat)
            shim_dec = time_ms(lambda: shim.decode(packed), args.repeat)
            torch_mm = time_ms(lambda: x @ weight.T, args.repeat)
            print(f"{f'{m} x {r} x {c}':>16} {f'{blocks} x 256':>17} {shim_mm:>15.2f} {shim_dec:>15.2f} {torch_mm:>16.3f}")


if __name__ == "__main__":
    main()

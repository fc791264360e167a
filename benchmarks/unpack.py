"""umq unpack: throughput and peak memory next to a plain safetensors load + save.

Generates a checkpoint (float16 matrices, the largest ``--rows x --cols``), packs it
(k=1, fp8_e4m3), then measures in fresh child processes, in the same run:

- ``unpack``: :func:`umqcli.unpack.unpack` of the packed file back to float16;
- ``safetensors copy``: ``safetensors.torch.load_file`` + ``save_file`` of the dense
  file (the plain way to rewrite a checkpoint; it holds every tensor in memory);
Reported: seconds, MB/s of dense output, and the peak growth of the resident set during
the work (sampled every 2 ms by a thread, relative to the RSS just before it) next to the
largest tensor's dense size. Nothing is asserted.

    python benchmarks/unpack.py [--rows 8192] [--cols 8192] [--tensors 4]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, sys, threading, time
import psutil, torch
import umqcli.unpack
from safetensors.torch import load_file, save_file
torch.set_num_threads(int(sys.argv[4]))
mode, src, out = sys.argv[1:4]
if mode == "unpack":  # compile the fused decode (numba) before measuring
    umqcli.unpack.unpack(src, out + ".warm", dtype="float16")
process = psutil.Process()
before = process.memory_info().rss
peak = [before]
done = threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], process.memory_info().rss)
        time.sleep(0.002)
sampler = threading.Thread(target=sample)
sampler.start()
start = time.perf_counter()
if mode == "unpack":
    umqcli.unpack.unpack(src, out, dtype="float16")
elif mode == "copy":
    save_file(load_file(src), out)
seconds = time.perf_counter() - start
done.set()
sampler.join()
print(json.dumps({"seconds": seconds, "extra": max(peak[0], process.memory_info().rss) - before}))
"""


def child(mode: str, src: Path, out: Path, threads: int) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", CHILD, mode, str(src), str(out), str(threads)],
        check=True, capture_output=True, text=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--cols", type=int, default=8192)
    parser.add_argument("--tensors", type=int, default=4, help="matrices of rows x cols / 2**i, i < tensors")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch
    from safetensors.torch import save_file

    from umqcli.format import QuantParams
    from umqcli.pack import pack

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dense = root / "dense.safetensors"
        g = torch.Generator().manual_seed(0)
        tensors = {
            f"layers.{i}.weight": torch.randn(max(8, args.rows >> i), args.cols, generator=g).to(torch.float16)
            for i in range(args.tensors)
        }
        tensors["norm.weight"] = torch.ones(args.cols, dtype=torch.float16)
        largest = max(t.numel() * t.element_size() for t in tensors.values())
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        save_file(tensors, dense)
        del tensors
        packed = root / "packed.safetensors"
        start = time.perf_counter()
        pack(dense, packed, params=QuantParams(k=1), with_error=False)
        pack_seconds = time.perf_counter() - start

        runs = {
            "unpack": child("unpack", packed, root / "unpacked.safetensors", args.threads),
            "safetensors copy": child("copy", dense, root / "copied.safetensors", args.threads),
        }
        print(
            f"checkpoint: {total / 1e6:.0f} MB float16 ({args.tensors} matrices, largest "
            f"{args.rows}x{args.cols} = {largest / 1e6:.0f} MB), packed {packed.stat().st_size / 1e6:.0f} MB "
            f"in {pack_seconds:.1f} s; {args.threads} thread(s)"
        )
        print(f"{'':>18} | {'seconds':>8} | {'MB/s out':>9} | {'peak RSS growth MB':>22} | {'/ largest tensor':>16}")
        for name, run in runs.items():
            extra = run["extra"]
            print(
                f"{name:>18} | {run['seconds']:8.2f} | {total / 1e6 / run['seconds']:9.0f} | "
                f"{extra / 1e6:22.0f} | {extra / largest:15.2f}x"
            )


if __name__ == "__main__":
    main()

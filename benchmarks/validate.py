"""Benchmark: what the hi-finite rule adds to ``PackedTensor.validate``.

For a MiniLM-sized (1536 x 384) and an LLM-sized (4096 x 4096) weight, each hi dtype
(float16 from a float32 source, bfloat16 from a bfloat16 one) and each lo format,
measured side by side in the same process:

- ``without hi``: ``validate(check_crc=True)`` with the hi-finite check switched off
  (every other FORMAT rule: crc32, popcount, scales, lo codes): the baseline;
- ``with hi``: the full ``validate``, as every reader runs it;
- ratio = with / without.

Run: ``python benchmarks/validate.py [--repeat 5]``. Times are the best of ``repeat``.
"""

from __future__ import annotations

import argparse
from unittest import mock

import torch

from umqcli import codec
from umqcli.format import LoFormat, QuantParams

from _timing import time_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; best of {args.repeat}")
    print(f"{'weight':>11} {'hi':>9} {'lo':>9} {'without hi ms':>14} {'with hi ms':>11} {'ratio':>6}")
    generator = torch.Generator().manual_seed(0)
    for shape in ((1536, 384), (4096, 4096)):
        base = torch.randn(*shape, generator=generator) * 0.02
        for source in (torch.float32, torch.bfloat16):
            for lo in LoFormat:
                packed = codec.quantize(base.to(source), QuantParams(k=1, lo=lo))
                with_hi = time_ms(lambda: packed.validate(check_crc=True), args.repeat)
                with mock.patch.object(codec, "_check_hi_values", lambda packed, fail: None):
                    without_hi = time_ms(lambda: packed.validate(check_crc=True), args.repeat)
                print(f"{shape[0]:>5}x{shape[1]:<5} {packed.spec.hi.value:>9} {lo.value:>9} "
                      f"{without_hi:>14.2f} {with_hi:>11.2f} {with_hi / without_hi:>6.2f}")


if __name__ == "__main__":
    main()

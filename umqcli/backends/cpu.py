"""The fused CPU backend: :mod:`umqcli.runtime`'s decode-matmul (no dense weight).

Same contract as the torch backend (see :mod:`umqcli.backends`), same decoded values
(``decode`` is bit-exact with ``codec.dequantize``); ``matmul`` differs from the torch
backend only by float32 summation order. Serves CPU tensors; tensors elsewhere go to the
torch reference path.
"""

from __future__ import annotations

import torch

from .. import runtime
from ..codec import PackedTensor
from . import check_matmul_input
from .torch import TorchBackend


class CpuBackend:
    """Fused CPU backend; ``isa`` forces a path (``"avx2"``, ``"scalar"``; None: the best)."""

    name = "cpu"

    def __init__(self, isa: str | None = None) -> None:
        self.isa = runtime.select_isa(isa)  # UMQError when the runtime or the path is unavailable
        self._reference = TorchBackend()

    def decode(self, packed: PackedTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        if packed.data.device.type != "cpu":
            return self._reference.decode(packed, dtype)
        return runtime.decode(packed, dtype, isa=self.isa)

    def matmul(self, x: torch.Tensor, packed: PackedTensor) -> torch.Tensor:
        check_matmul_input(x, packed)
        if packed.data.device.type != "cpu" or x.device.type != "cpu":
            return self._reference.matmul(x, packed)
        return runtime.matmul(x, packed, isa=self.isa)

    def __repr__(self) -> str:
        return f"CpuBackend(isa={self.isa!r})"

"""The torch reference backend: ``codec.dequantize`` then a float32 matmul.

This is the twin every CUDA entry point is measured against; it runs on whatever device
the packed tensors live on (CPU here, or a GPU through plain torch ops).
"""

from __future__ import annotations

import torch

from ..codec import PackedTensor, dequantize
from . import check_matmul_input


class TorchBackend:
    """Reference backend (see :mod:`umqcli.backends` for the contract)."""

    name = "torch"

    def decode(self, packed: PackedTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dense ``[R, C]`` in ``dtype`` (default: the source dtype): exactly
        :func:`umqcli.codec.dequantize`."""
        return dequantize(packed, dtype)

    def matmul(self, x: torch.Tensor, packed: PackedTensor) -> torch.Tensor:
        """``x`` float ``[..., C]`` -> float32 ``[..., R]``: ``x · Ŵᵀ``.

        ``Ŵ`` is the float32 decode (``dequantize(packed, torch.float32)``: hi values
        exact, lo values ``decode(q) * scale`` without a rounding to the source dtype),
        the same values the fused CUDA kernel builds in registers.
        """
        check_matmul_input(x, packed)
        weight = dequantize(packed, torch.float32).to(x.device)
        rows = x.reshape(-1, x.shape[-1]).to(torch.float32)
        return (rows @ weight.T).reshape(*x.shape[:-1], packed.spec.rows)

    def __repr__(self) -> str:
        return "TorchBackend()"

"""Run packed weights: :class:`UMQLinear` and loading packed Hugging Face models.

:class:`UMQLinear` is a drop-in ``nn.Linear`` whose weight stays packed in memory: the
three stored tensors of FORMAT v1 (``umq_data`` uint8 ``[R, G*(8+k)]``, ``umq_mask``
uint8 ``[R, G]``, ``umq_scale`` float32 ``[R, C/block]``) are buffers of a child module
called ``weight``, so a UMQLinear's ``state_dict`` keys are exactly the tensor names of a
packed file (``<module>.weight.umq_data`` ...) and the Hugging Face loader fills them
without any renaming. The forward computes ``x @ Ŵᵀ + b`` through
:func:`umqcli.backends.get_backend`: the fused CUDA kernel when the input is on a GPU and
CuPy is present, the torch reference path (decode, then a float32 matmul) elsewhere.

Loading packed Hugging Face models (the ``"umq"`` quantizer of transformers, and
``load_hf``) lives in :mod:`umqcli.integrations.transformers`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping

import torch
from torch import nn

from .codec import PackedTensor, quantize
from .errors import UMQError
from .format import (
    DATA_SUFFIX,
    MASK_SUFFIX,
    SCALE_SUFFIX,
    QuantParams,
    TensorSpec,
)

# --------------------------------------------------------------------------- the packed weight


class PackedWeight(nn.Module):
    """The packed form of one ``[R, C]`` weight, held as three buffers (FORMAT §2).

    - ``umq_data``: uint8 ``[R, (C/8) * (8 + k)]``, the groups' payload bytes.
    - ``umq_mask``: uint8 ``[R, C/8]``, bit i set <=> position i of the group is hi.
    - ``umq_scale``: float32 ``[R, C/block]``, the lo scale of each block.
    - ``spec``: the :class:`TensorSpec` (shape, source dtype, k, lo, hi, block, crc32).

    A module rather than a tensor so that the buffer names line up with the file's tensor
    names (``<linear>.weight.umq_data``). It answers ``shape``, ``dtype`` (the source
    dtype) and ``device`` like a tensor, for the model code that asks a linear layer's
    weight for those.
    """

    umq_data: torch.Tensor
    umq_mask: torch.Tensor
    umq_scale: torch.Tensor
    # Its bytes come from the file: transformers' init helpers skip tensors flagged so, which
    # keeps an ``_init_weights`` that touches a child's weight by name (CLIP's
    # ``init.normal_(module.q_proj.weight)``) from writing into a packed weight.
    _is_hf_initialized = True

    def __init__(self, spec: TensorSpec, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.spec = spec
        shapes = spec.stored_shapes()
        self.register_buffer("umq_data", torch.empty(shapes[DATA_SUFFIX], dtype=torch.uint8, device=device))
        self.register_buffer("umq_mask", torch.empty(shapes[MASK_SUFFIX], dtype=torch.uint8, device=device))
        self.register_buffer("umq_scale", torch.empty(shapes[SCALE_SUFFIX], dtype=torch.float32, device=device))

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self.spec.shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.spec.torch_dtype

    @property
    def device(self) -> torch.device:
        return self.umq_data.device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.umq_data, self.umq_mask, self.umq_scale))

    def packed(self) -> PackedTensor:
        """The buffers as a :class:`PackedTensor` (no copy)."""
        return PackedTensor(data=self.umq_data, mask=self.umq_mask, scale=self.umq_scale, spec=self.spec)

    def load_packed(self, packed: PackedTensor) -> None:
        """Take ``packed``'s tensors as the buffers (no copy); its spec must match."""
        if packed.spec.shape != self.spec.shape:
            raise UMQError(
                f"packed tensor has shape {list(packed.spec.shape)}, the layer expects {list(self.spec.shape)}",
                rule="shape",
            )
        self.spec = packed.spec
        self.umq_data, self.umq_mask, self.umq_scale = packed.data, packed.mask, packed.scale

    def check_state(self, state_dict: Mapping[str, torch.Tensor], prefix: str, *, strict: bool = True) -> None:
        """Hold the buffers that ``state_dict`` would load (keys ``prefix + "umq_data"``
        ...) to every FORMAT rule against this weight's spec (dtypes, shapes, crc32,
        popcount, scales, lo codes, finite hi values): a :class:`UMQError` naming the
        tensor, never torch's size-mismatch ``RuntimeError`` or bytes the spec does not
        describe. Absent keys are an error with ``strict``, or when only some are given."""
        name = prefix.removesuffix(".") or "weight"
        keys = {suffix: prefix + suffix.removeprefix(".") for suffix in (DATA_SUFFIX, MASK_SUFFIX, SCALE_SUFFIX)}
        present = {suffix: state_dict[key] for suffix, key in keys.items() if key in state_dict}
        if present and len(present) < len(keys) or not present and strict:
            absent = [key for suffix, key in keys.items() if suffix not in present]
            raise UMQError(f"state dict lacks {', '.join(absent)}", rule="stored-missing", tensor=name)
        if present:
            PackedTensor.from_stored(
                self.spec, present[DATA_SUFFIX], present[MASK_SUFFIX], present[SCALE_SUFFIX]
            ).validate(name=name, check_crc=True)

    def _apply(self, fn, recurse: bool = True):
        # .half() / .to(dtype) cast every floating buffer; the stored scales must stay
        # float32 (FORMAT §2), so keep the original values and only follow the device.
        scale = self.umq_scale
        super()._apply(fn, recurse)
        if self.umq_scale.dtype != torch.float32:
            self.umq_scale = scale.to(device=self.umq_scale.device)
        return self

    def extra_repr(self) -> str:
        s = self.spec
        return (
            f"shape={list(s.shape)}, dtype={s.dtype}, k={s.k}, lo={s.lo.value}, hi={s.hi.value}, "
            f"block={s.block}, bits/element={s.bits_per_element:.2f}"
        )


# --------------------------------------------------------------------------- UMQLinear


class UMQLinear(nn.Module):
    """``y = x @ Ŵᵀ + b`` with ``Ŵ`` kept packed (FORMAT v1) in memory.

    - ``weight``: a :class:`PackedWeight` (buffers ``umq_data`` / ``umq_mask`` /
      ``umq_scale``); ``Ŵ`` is its float32 decode.
    - ``bias``: float ``[out_features]`` parameter or ``None``.
    - ``backend``: ``"auto"`` (CUDA kernel for inputs on a GPU when CuPy is present, the
      fused CPU runtime for CPU inputs when it builds, the torch reference path
      otherwise), ``"torch"``, ``"cpu"`` or ``"cuda"``. On the CPU runtime the layer keeps
      one checked launch state (:class:`umqcli.runtime.LinearLaunch`), rebuilt whenever a
      buffer, the bias, the spec or ``backend`` changes.
    - ``cache_decoded``: keep the decoded float32 weight after the first forward (per
      device) and use ``F.linear``. Faster on the CPU, but it holds a dense copy next to
      the packed one (``4 * R * C`` bytes more), so the weight is no longer "kept packed";
      off by default. See ``docs/runtime.md`` for the measured trade-off.

    Input ``x``: float32/float16/bfloat16 ``[..., in_features]`` (any leading dims);
    output: ``[..., out_features]`` in ``x.dtype``, computed with float32 accumulation.

    The constructor allocates empty buffers for ``spec`` (``device``; ``dtype`` is the
    bias dtype, default the source dtype) to be filled by ``load_state_dict`` or the
    transformers loader; :meth:`from_packed` and :meth:`from_linear` build filled layers.
    """

    def __init__(
        self,
        spec: TensorSpec,
        bias: bool = True,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        backend: str = "auto",
        cache_decoded: bool = False,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = spec.shape
        self.weight = PackedWeight(spec, device=device)
        if bias:
            self.bias = nn.Parameter(
                torch.empty(self.out_features, dtype=dtype or spec.torch_dtype, device=device),
                requires_grad=False,
            )
        else:
            self.register_parameter("bias", None)
        self.backend = backend
        self.cache_decoded = cache_decoded
        self._decoded: dict[torch.device, torch.Tensor] = {}
        self._backends: dict[str, Any] = {}
        self._launch: Any = None  # runtime.LinearLaunch of the fused CPU path, built on first use
        self._launch_backend = backend  # the backend setting it was built under

    # ---- construction

    @classmethod
    def from_packed(
        cls,
        packed: PackedTensor,
        bias: torch.Tensor | None = None,
        *,
        backend: str = "auto",
        cache_decoded: bool = False,
    ) -> "UMQLinear":
        """Wrap an existing packed tensor (``[R, C]`` -> ``in_features=C``,
        ``out_features=R``) and an optional bias ``[R]``; the tensors are used as they
        are, not copied."""
        rows = packed.spec.rows
        if bias is not None and tuple(bias.shape) != (rows,):
            raise UMQError(
                f"bias has shape {tuple(bias.shape)}, expected ({rows},) for weight shape {list(packed.spec.shape)}",
                rule="shape",
            )
        layer = cls(
            packed.spec,
            bias=bias is not None,
            device="meta",
            backend=backend,
            cache_decoded=cache_decoded,
        )
        layer.weight.load_packed(packed)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach(), requires_grad=False)
        return layer

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        params: QuantParams = QuantParams(),
        *,
        act_sq: torch.Tensor | None = None,
        name: str | None = None,
        backend: str = "auto",
        cache_decoded: bool = False,
    ) -> "UMQLinear":
        """Quantize ``linear.weight`` (``[out, in]``, ``in % 8 == 0``) with ``params``
        (``act_sq``: float32 ``[in]`` for the ``activation`` selection) and keep its bias.
        The result lives on ``linear``'s device."""
        weight = linear.weight.detach()
        packed = quantize(weight.cpu() if weight.device.type != "cpu" else weight, params, act_sq=act_sq, name=name)
        layer = cls.from_packed(
            packed,
            None if linear.bias is None else linear.bias.detach().clone(),
            backend=backend,
            cache_decoded=cache_decoded,
        )
        return layer.to(weight.device)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # The packed weight is checked before anything of this layer (its bias too) changes.
        self.weight.check_state(state_dict, prefix + "weight.", strict=strict)
        self._launch = None
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    # ---- views

    @property
    def packed(self) -> PackedTensor:
        """The packed weight (buffers, no copy)."""
        return self.weight.packed()

    @property
    def spec(self) -> TensorSpec:
        return self.weight.spec

    def decoded_weight(self, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        """Dense ``[out, in]`` decode in ``dtype`` (``None``: the source dtype); float32
        gives exactly the ``Ŵ`` the forward multiplies by."""
        return self._backend_for(self.weight.device).decode(self.packed, dtype)

    def clear_cache(self) -> None:
        """Drop the decoded weights kept by ``cache_decoded``."""
        self._decoded.clear()

    # ---- compute

    def _backend_for(self, device: torch.device):
        name = self.backend
        if name == "auto" and device.type != "cuda":
            # The CUDA backend only serves tensors on a GPU; the fused CPU one when it builds.
            from .backends import cpu_available

            name = "cpu" if device.type == "cpu" and cpu_available() else "torch"
        backend = self._backends.get(name)
        if backend is None:
            from .backends import get_backend

            backend = self._backends[name] = get_backend(name)
        return backend

    def _cpu_launch(self):
        """The fused CPU runtime's launch state for the current buffers and bias, or None
        when this layer does not use that runtime. Rebuilt (and so re-checked) whenever a
        buffer, the bias or the spec was replaced or modified in place."""
        # Read through the module dicts: nn.Module.__getattr__ costs about a microsecond a name.
        weight, launch = self._modules["weight"], self._launch
        if launch is not None and self._launch_backend == self.backend:
            buffers = weight._buffers
            if launch.current(buffers["umq_data"], buffers["umq_mask"], buffers["umq_scale"],
                              self._parameters["bias"], weight.spec):
                return launch
        self._launch = None
        backend = self._backend_for(weight.device)
        if backend.name != "cpu" or weight.device.type != "cpu":
            return None
        from .runtime import LinearLaunch

        self._launch = LinearLaunch(self.packed, self.bias, isa=backend.isa)
        self._launch_backend = self.backend
        return self._launch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise UMQError(
                f"input has shape {tuple(x.shape)}, its last dimension must be in_features={self.in_features}",
                rule="matmul-shape",
            )
        if not self.cache_decoded and x.is_cpu and x.is_floating_point():
            launch = self._cpu_launch()
            if launch is not None:
                return launch(x)
        leading = x.shape[:-1]
        rows = x.reshape(-1, self.in_features)
        if self.cache_decoded:
            weight = self._decoded.get(x.device)
            if weight is None:
                weight = self._decoded[x.device] = self.decoded_weight(torch.float32).to(x.device)
            bias = None if self.bias is None else self.bias.to(torch.float32)
            out = torch.nn.functional.linear(rows.to(torch.float32), weight, bias)
        else:
            out = self._backend_for(x.device).matmul(rows, self.packed)
            if self.bias is not None:
                out = out.add_(self.bias.to(torch.float32))
        return out.to(x.dtype).reshape(*leading, self.out_features)

    def _apply(self, fn, recurse: bool = True):
        self.clear_cache()  # a device or dtype move invalidates the dense copies
        self._launch = None  # and the fused runtime's pointers
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, backend={self.backend}, cache_decoded={self.cache_decoded}"
        )


# --------------------------------------------------------------------------- model helpers


def umq_linears(model: nn.Module) -> Iterator[tuple[str, UMQLinear]]:
    """``(name, module)`` of every :class:`UMQLinear` in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, UMQLinear):
            yield name, module


def configure(model: nn.Module, *, backend: str | None = None, cache_decoded: bool | None = None) -> nn.Module:
    """Set ``backend`` and/or ``cache_decoded`` on every UMQLinear of ``model``."""
    for _, module in umq_linears(model):
        if backend is not None:
            module.backend = backend
            module._backends.clear()
            module._launch = None
        if cache_decoded is not None:
            module.cache_decoded = cache_decoded
            module.clear_cache()
    return model


def replace_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def quantize_model(
    model: nn.Module,
    params: QuantParams = QuantParams(),
    *,
    skip: Iterable[str] = (),
    backend: str = "auto",
    cache_decoded: bool = False,
) -> dict[str, PackedTensor]:
    """Replace, in place, every ``nn.Linear`` of ``model`` whose input size divides by 8
    (and whose name is not in ``skip``) by ``UMQLinear.from_linear(..., params)``.
    Returns the packed weights by parameter name (``<module>.weight``)."""
    skip = set(skip)
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if type(module) is nn.Linear and module.in_features % 8 == 0 and name not in skip
    ]
    packed = {}
    for name, module in targets:
        layer = UMQLinear.from_linear(module, params, name=f"{name}.weight", backend=backend, cache_decoded=cache_decoded)
        replace_submodule(model, name, layer)
        packed[f"{name}.weight"] = layer.packed
    return packed


@dataclass(frozen=True)
class WeightMemory:
    """Bytes of the tensors a model holds (parameters and buffers, each storage once).

    - ``packed``: UMQLinear packed buffers (data + mask + scale).
    - ``dense``: every other parameter / buffer (embeddings, norms, biases, ...).
    - ``decode_cache``: dense weights kept by ``cache_decoded`` (0 when off).
    """

    packed: int
    dense: int
    decode_cache: int

    @property
    def total(self) -> int:
        return self.packed + self.dense + self.decode_cache


def weight_memory(model: nn.Module) -> WeightMemory:
    """Resident weight memory of ``model``: tensor bytes by kind, tied or shared storages
    counted once, meta tensors not counted."""
    seen: set[tuple[str, int]] = set()

    def count(tensor: torch.Tensor) -> int:
        if tensor.device.type == "meta":
            return 0
        storage = tensor.untyped_storage()
        key = (str(tensor.device), storage.data_ptr())
        if key in seen:
            return 0
        seen.add(key)
        return storage.nbytes()

    packed = 0
    cache = 0
    for _, module in umq_linears(model):
        packed += sum(count(t) for t in (module.weight.umq_data, module.weight.umq_mask, module.weight.umq_scale))
        cache += sum(count(t) for t in module._decoded.values())
    dense = sum(count(t) for t in model.parameters()) + sum(count(t) for t in model.buffers())
    return WeightMemory(packed=packed, dense=dense, decode_cache=cache)


__all__ = [
    "PackedWeight",
    "UMQLinear",
    "WeightMemory",
    "configure",
    "quantize_model",
    "replace_submodule",
    "umq_linears",
    "weight_memory",
]

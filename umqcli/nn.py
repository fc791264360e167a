"""Run packed weights: :class:`UMQLinear` and loading packed Hugging Face models.

:class:`UMQLinear` is a drop-in ``nn.Linear`` whose weight stays packed in memory: the
three stored tensors of FORMAT v1 (``umq_data`` uint8 ``[R, G*(8+k)]``, ``umq_mask``
uint8 ``[R, G]``, ``umq_scale`` float32 ``[R, C/block]``) are buffers of a child module
called ``weight``, so a UMQLinear's ``state_dict`` keys are exactly the tensor names of a
packed file (``<module>.weight.umq_data`` ...) and the Hugging Face loader fills them
without any renaming. The forward computes ``x @ Ŵᵀ + b`` through
:func:`umqcli.backends.get_backend`: the fused CUDA kernel when the input is on a GPU and
CuPy is present, the torch reference path (decode, then a float32 matmul) elsewhere.

:func:`load_hf` builds a ``transformers`` model from a directory written by ``umq pack``:
it registers a ``"umq"`` quantizer with transformers (so ``config.json``'s
``quantization_config`` is honoured by ``from_pretrained`` itself), which swaps every
``nn.Linear`` whose weight is packed for a :class:`UMQLinear` before the weights are
read; everything else loads as usual.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import torch
from torch import nn

from .codec import PackedTensor, quantize
from ._optional import require, transformers_quiet
from .errors import UMQError
from .format import (
    DATA_SUFFIX,
    MASK_SUFFIX,
    SCALE_SUFFIX,
    QuantParams,
    TensorSpec,
)

QUANT_METHOD = "umq"

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
      torch reference path otherwise), ``"torch"`` or ``"cuda"``.
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise UMQError(
                f"input has shape {tuple(x.shape)}, its last dimension must be in_features={self.in_features}",
                rule="matmul-shape",
            )
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
        if cache_decoded is not None:
            module.cache_decoded = cache_decoded
            module.clear_cache()
    return model


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
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
        _set_submodule(model, name, layer)
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


# --------------------------------------------------------------------------- transformers


def _read_quantization_config(path: Path) -> dict[str, Any]:
    config_file = path / "config.json"
    if not path.exists():
        raise UMQError("does not exist (load_hf reads a model directory written by umq pack)",
                       rule="missing", file=path)
    if not config_file.is_file():
        raise UMQError("not a model directory: config.json is missing", rule="hf-config", file=path)
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UMQError(f"config.json is not valid JSON ({exc})", rule="hf-config", file=config_file) from None
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        found = qc.get("quant_method") if isinstance(qc, dict) else None
        raise UMQError(
            f"config.json has no quantization_config with quant_method 'umq' (found {found!r}); "
            "was this directory written by umq pack?",
            rule="quantization-config",
            file=config_file,
        )
    return config


def _module_for(model: nn.Module, weight_name: str) -> tuple[str, nn.Module | None]:
    """The module that owns checkpoint tensor ``weight_name`` (``<module>.weight``),
    trying the model's ``base_model_prefix`` both ways as transformers' loader does."""
    module_name = weight_name.rsplit(".", 1)[0] if weight_name.endswith(".weight") else None
    if module_name is None:
        return weight_name, None
    prefix = getattr(model, "base_model_prefix", "") or ""
    candidates = [module_name]
    if prefix:
        candidates += [f"{prefix}.{module_name}", module_name.removeprefix(prefix + ".")]
    for candidate in candidates:
        try:
            return candidate, model.get_submodule(candidate)
        except AttributeError:
            continue
    return module_name, None


_REGISTERED = False


def register_hf() -> None:
    """Teach ``transformers`` the ``"umq"`` quantization method (idempotent).

    Afterwards ``AutoModel.from_pretrained(packed_dir)`` swaps the packed linear layers
    for :class:`UMQLinear` on its own; :func:`load_hf` calls this first.
    """
    global _REGISTERED
    if _REGISTERED:
        return
    require("transformers", extra="hf", purpose="loading a packed Hugging Face model")
    from transformers.quantizers.auto import (
        AUTO_QUANTIZATION_CONFIG_MAPPING,
        AUTO_QUANTIZER_MAPPING,
    )
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    class UMQConfig(QuantizationConfigMixin):
        """``quantization_config`` of a packed model: ``quant_method: "umq"`` plus
        whatever ``umq pack`` recorded (format version, parameters), kept verbatim."""

        def __init__(self, quant_method: str = QUANT_METHOD, **recorded: Any) -> None:
            self.quant_method = quant_method
            for key, value in recorded.items():
                setattr(self, key, value)

        def to_dict(self) -> dict[str, Any]:
            return dict(self.__dict__)

    class UMQHfQuantizer(HfQuantizer):
        """Loads checkpoints written by ``umq pack`` (pre-quantized only)."""

        requires_calibration = True  # umq never quantizes inside from_pretrained

        def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
            # The packed tensors' specs live in the safetensors headers, not in config.json;
            # reading them holds the directory to every umq reader rule before transformers
            # reads a tensor.
            from .load_checks import packed_directory_specs

            specs, spec_files = packed_directory_specs(checkpoint_files or [])
            if not specs:
                # Loading on would leave every linear weight missing, i.e. randomly
                # initialised, with only a log line from transformers.
                raise UMQError(
                    "config.json says quant_method 'umq' but no safetensors header lists "
                    f"packed tensors (umq.tensors) in {len(checkpoint_files or [])} file(s)",
                    rule="not-packed",
                )
            self.decode_on_load: dict[str, TensorSpec] = {}
            self.layer_sources: dict[str, tuple[str, Path]] = {}
            for name, spec in specs.items():
                module_name, module = _module_for(model, name)
                if isinstance(module, nn.Linear) and tuple(module.weight.shape) == spec.shape:
                    with torch.device("meta"):
                        layer = UMQLinear(spec, bias=module.bias is not None, dtype=getattr(module.bias, "dtype", None))
                    _set_submodule(model, module_name, layer)
                    self.layer_sources[module_name] = (name, spec_files[name])
                else:
                    # Packed but not held by an nn.Linear (e.g. an embedding table): the
                    # loader leaves it missing; it is decoded into its dense parameter
                    # after loading.
                    self.decode_on_load[name] = spec
            self.checkpoint_files = list(checkpoint_files or [])
            return model

        def _process_model_after_weight_loading(self, model, **kwargs):
            from .load_checks import check_loaded_layers

            # Every FORMAT §7 reader rule, crc32 included: about one pass over the bytes;
            # a layer transformers left unfilled fails here, named.
            check_loaded_layers(umq_linears(model), self.layer_sources)
            if self.decode_on_load:
                _decode_into(model, self.checkpoint_files, self.decode_on_load)
            return model

        def is_serializable(self, **kwargs) -> bool:
            # save_pretrained would write the packed buffers without the umq.tensors
            # header metadata that makes them readable: refuse (pack the source instead).
            return False

        @property
        def is_trainable(self) -> bool:
            return False

    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] = UMQConfig
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        AUTO_QUANTIZER_MAPPING[QUANT_METHOD] = UMQHfQuantizer
    _REGISTERED = True


def _decode_into(model: nn.Module, files: Iterable[str], specs: Mapping[str, TensorSpec]) -> None:
    """Decode packed tensors that no UMQLinear holds into the model's dense parameters."""
    from .io import open_checkpoint

    state_names = set(model.state_dict().keys())
    for file in files:
        with open_checkpoint(file) as checkpoint:
            for name in checkpoint.specs:
                if name not in specs:
                    continue
                target = name if name in state_names else f"{model.base_model_prefix}.{name}"
                if target not in state_names:
                    continue
                packed = checkpoint.packed(name)
                param = model.get_parameter(target)
                if tuple(param.shape) != tuple(specs[name].shape):
                    raise UMQError(
                        f"packed as {list(specs[name].shape)} but the model's '{target}' is {list(param.shape)}",
                        rule="shape", file=file, tensor=name,
                    )
                with torch.no_grad():
                    param.copy_(_dequantize(packed, param.dtype))


def _dequantize(packed: PackedTensor, dtype: torch.dtype) -> torch.Tensor:
    from .backends import get_backend

    return get_backend("torch").decode(packed, dtype)


def _safetensors_error() -> type[Exception]:
    from safetensors import SafetensorError

    return SafetensorError


def load_hf(
    path: str | os.PathLike,
    *,
    model_class: Any = None,
    backend: str = "auto",
    cache_decoded: bool = False,
    **from_pretrained_kwargs: Any,
) -> nn.Module:
    """A transformers model from a packed model directory written by ``umq pack``.

    Every ``nn.Linear`` whose weight is packed becomes a :class:`UMQLinear` holding the
    packed bytes (checked against their crc32 after loading); all other tensors load as
    transformers loads them. ``model_class`` defaults to the first entry of
    ``config.json``'s ``architectures`` (else ``AutoModel``); ``from_pretrained_kwargs``
    go to ``from_pretrained`` (e.g. ``dtype=torch.float16`` for the non-packed tensors
    and biases). Raises :class:`UMQError` (rule ``quantization-config``) for a directory
    without a ``"umq"`` ``quantization_config``. Returns the model in eval mode.
    """
    from .load_checks import check_directory_before_loading

    path = Path(path)
    config = _read_quantization_config(path)
    check_directory_before_loading(path)  # every umq reader rule, before transformers reads
    register_hf()
    import transformers

    if model_class is None:
        architectures = config.get("architectures") or []
        model_class = getattr(transformers, architectures[0], None) if architectures else None
        model_class = model_class or transformers.AutoModel
    try:
        with transformers_quiet():
            model = model_class.from_pretrained(str(path), **from_pretrained_kwargs)
    except UMQError as exc:
        raise exc.located(file=path)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, _safetensors_error()) as exc:
        # What transformers (or safetensors under it) raises about the files it read
        # itself: the same one line as every umq error; the cause stays chained.
        first_line = (str(exc).strip().splitlines() or [""])[0]
        raise UMQError(f"transformers could not load it: {type(exc).__name__}: {first_line}",
                       rule="transformers", file=path) from exc
    configure(model, backend=backend, cache_decoded=cache_decoded)
    return model.eval()


__all__ = [
    "PackedWeight",
    "UMQLinear",
    "WeightMemory",
    "configure",
    "load_hf",
    "quantize_model",
    "register_hf",
    "umq_linears",
    "weight_memory",
]

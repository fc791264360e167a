"""Hugging Face transformers integration: the ``"umq"`` quantization method and loaders.

- :class:`UMQConfig` / :class:`UMQHfQuantizer`: registered in transformers' tables under
  ``quant_method: "umq"`` when this module is imported (once per process: a module runs
  once), so ``from_pretrained(packed_dir)`` swaps every ``nn.Linear`` whose weight is
  packed for a :class:`~umqcli.nn.UMQLinear` before the weights are read. ``import
  umqcli`` arranges that import for the moment transformers loads its quantizer table
  (see :mod:`umqcli.integrations`).
- :func:`load_hf`: the documented helper (validates the directory first, picks the
  architecture from ``config.json``, sets the backend).
- :func:`load_dense_model`: a local, unquantized model and its tokenizer in float32
  (what calibration and perplexity run).

Validation hooks, all raising :class:`~umqcli.errors.UMQError`: :func:`check_index_first`
runs on ``model.safetensors.index.json`` before transformers parses it (the one file
transformers reads before any quantizer hook; see :func:`install_index_check`),
:func:`check_before_weights_load` on the checkpoint files before transformers reads a
tensor, and :func:`check_after_weights_load` on the loaded model.

Tested with transformers 5.24 (pyproject pins the range); the quantizer API changed
across 5.x minor releases.
"""

from __future__ import annotations

import functools
import json
import os
import re
import threading
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from .._optional import require, transformers_quiet
from ..errors import UMQError
from ..load_checks import check_directory_before_loading, check_loaded_layers, packed_directory_specs
from ..format import DATA_SUFFIX, MASK_SUFFIX, QUANT_METHOD, SCALE_SUFFIX, TensorSpec
from ..io import read_index
from ..nn import UMQLinear, configure, replace_submodule, umq_linears

require("transformers", extra="hf", purpose="the transformers integration (loading packed models)")

import transformers  # noqa: E402
from safetensors import SafetensorError  # noqa: E402
from transformers.quantizers.auto import (  # noqa: E402
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
)
from transformers.quantizers.base import HfQuantizer  # noqa: E402
from transformers.utils.quantization_config import QuantizationConfigMixin  # noqa: E402


class UMQConfig(QuantizationConfigMixin):
    """``quantization_config`` of a packed model: ``quant_method: "umq"`` plus whatever
    ``umq pack`` recorded (format version, parameters), kept verbatim."""

    def __init__(self, quant_method: str = QUANT_METHOD, **recorded: Any) -> None:
        self.quant_method = quant_method
        for key, value in recorded.items():
            setattr(self, key, value)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class UMQHfQuantizer(HfQuantizer):
    """Loads checkpoints written by ``umq pack`` (pre-quantized only)."""

    requires_calibration = True  # umq never quantizes inside from_pretrained

    def validate_environment(self, *args, **kwargs) -> None:
        # transformers builds the quantizer from config.json before it resolves (and
        # parses) the checkpoint's index: the last moment to put umq's index rules first.
        install_index_check()

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        self.checkpoint_files = list(checkpoint_files or [])
        specs = check_before_weights_load(self.checkpoint_files)
        self.decode_on_load = swap_packed_linears(model, specs)
        _expect_decoded_after_loading(model, self.decode_on_load)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        check_after_weights_load(model, self.checkpoint_files)
        if self.decode_on_load:
            _decode_into(model, self.checkpoint_files, self.decode_on_load)
        return model

    def is_serializable(self, **kwargs) -> bool:
        # save_pretrained would write the packed buffers without the umq.tensors header
        # metadata that makes them readable: refuse (pack the source instead).
        return False

    @property
    def is_trainable(self) -> bool:
        return False


def register() -> None:
    """Enter :class:`UMQConfig` and :class:`UMQHfQuantizer` in transformers' tables.

    Idempotent and free of shared state: it only ever writes the same two classes, and
    refuses a ``"umq"`` entry that another package put there.
    """
    for table, ours in ((AUTO_QUANTIZATION_CONFIG_MAPPING, UMQConfig), (AUTO_QUANTIZER_MAPPING, UMQHfQuantizer)):
        present = table.setdefault(QUANT_METHOD, ours)
        if present is not ours:
            raise UMQError(
                f"transformers already has a quantization method 'umq' from {present.__module__}",
                rule="quantizer-registration",
            )


# --------------------------------------------------------------------------- validation hooks

# What transformers (or safetensors under it) raises about files it reads itself.
TRANSFORMERS_ERRORS = (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError, SafetensorError)


def transformers_error(exc: BaseException, file: str | os.PathLike) -> UMQError:
    """``exc`` from transformers' own reading of ``file``, as umq's one line (rule
    ``transformers``); raise it ``from exc`` to keep the cause chained."""
    first_line = (str(exc).strip().splitlines() or [""])[0]
    return UMQError(f"transformers could not load it: {type(exc).__name__}: {first_line}",
                    rule="transformers", file=file)


def _config_says_umq(directory: str | os.PathLike) -> bool:
    """Whether ``directory/config.json`` declares ``quant_method: "umq"``."""
    try:
        config = json.loads((Path(directory) / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return False
    return _quant_method(config) == QUANT_METHOD


def check_index_first(resolve_shards):
    """transformers' ``get_checkpoint_shard_files`` (it parses the index, then resolves or
    downloads the shards), with umq's index rules applied first for a packed directory
    (its ``config.json`` says ``quant_method: "umq"``): JSON, ``weight_map`` an object
    of strings, every entry inside the directory. What transformers still raises there
    (an index without ``metadata``, a shard it cannot download) becomes the same
    one-line :class:`UMQError`, naming the index. Other directories pass through
    untouched. The shards' presence and contents are checked by the quantizer before a
    tensor is read (:func:`check_before_weights_load`)."""

    @functools.wraps(resolve_shards)
    def resolve_checked(pretrained_model_name_or_path, index_filename, *args, **kwargs):
        if not _config_says_umq(Path(index_filename).parent):
            return resolve_shards(pretrained_model_name_or_path, index_filename, *args, **kwargs)
        read_index(index_filename)
        try:
            return resolve_shards(pretrained_model_name_or_path, index_filename, *args, **kwargs)
        except TRANSFORMERS_ERRORS as exc:
            raise transformers_error(exc, index_filename) from exc

    resolve_checked.umq_checks_index = True
    return resolve_checked


_INSTALL_LOCK = threading.Lock()


def install_index_check() -> None:
    """Wrap ``transformers.modeling_utils.get_checkpoint_shard_files`` (the name
    ``from_pretrained`` calls) in :func:`check_index_first`, once per process.

    transformers 5.24 parses ``model.safetensors.index.json`` before any quantizer hook
    sees a file path, so no hook can check it first; this wrapper is the narrow way in.
    Called when transformers builds the umq quantizer (so a process that never loads a
    packed model never has it), idempotent, and a pass-through for every directory whose
    config does not say ``umq``. The name is a module global of 5.24 (pinned range)."""
    import transformers.modeling_utils as modeling_utils

    with _INSTALL_LOCK:
        current = modeling_utils.get_checkpoint_shard_files
        if not getattr(current, "umq_checks_index", False):
            modeling_utils.get_checkpoint_shard_files = check_index_first(current)


def check_before_weights_load(checkpoint_files: Iterable[str | os.PathLike]) -> dict[str, TensorSpec]:
    """The packed tensors (source name -> spec) of the checkpoint, checked before
    transformers reads it; raises :class:`UMQError` where loading would go wrong."""
    # Held to every rule a umq reader applies (index, headers, specs, stored shapes,
    # orphans, at least one packed tensor; docs/validation.md) before transformers reads
    # a tensor: it would leave a weight it cannot find randomly initialised, with only a
    # log line.
    specs, _ = packed_directory_specs(checkpoint_files)
    return specs


def check_after_weights_load(model: nn.Module, checkpoint_files: Iterable[str | os.PathLike]) -> None:
    """Every packed layer of the loaded ``model`` holds the file's bytes (every FORMAT
    §7 reader rule, crc32 included: about one pass over the bytes); a layer transformers
    left unfilled is an error naming the tensor (``not-loaded``)."""
    specs, spec_files = packed_directory_specs(checkpoint_files)
    sources: dict[str, tuple[str, Path]] = {}
    for name in specs:
        module_name, module = _module_for(model, name)
        if isinstance(module, UMQLinear):
            sources[module_name] = (name, spec_files[name])
    check_loaded_layers(umq_linears(model), sources)


# --------------------------------------------------------------------------- model surgery


def swap_packed_linears(model: nn.Module, specs: Mapping[str, TensorSpec]) -> dict[str, TensorSpec]:
    """Replace each ``nn.Linear`` whose weight ``specs`` lists by an empty (meta)
    :class:`UMQLinear` for the loader to fill; return the packed tensors no linear holds
    (e.g. an embedding table), to be decoded into their dense parameters after loading."""
    decode_on_load: dict[str, TensorSpec] = {}
    for name, spec in specs.items():
        module_name, module = _module_for(model, name)
        if isinstance(module, nn.Linear) and tuple(module.weight.shape) == spec.shape:
            with torch.device("meta"):
                layer = UMQLinear(spec, bias=module.bias is not None, dtype=getattr(module.bias, "dtype", None))
            replace_submodule(model, module_name, layer)
        else:
            decode_on_load[name] = spec
    return decode_on_load


def _expect_decoded_after_loading(model: nn.Module, names: Iterable[str]) -> None:
    """Tell transformers' load report that ``names`` (decoded by :func:`_decode_into`) are
    not MISSING ("newly initialized"), nor their packed parts UNEXPECTED; likewise a weight
    tied to one of them (GPT-2's ``lm_head`` when ``wte`` is packed)."""
    names = set(names)
    if not names:
        return
    tied = {target for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items()
            if any(source == name or source.endswith("." + name) or name.endswith("." + source) for name in names)}
    either = "|".join(re.escape(name) for name in sorted(names | tied))
    parts = "|".join(re.escape(suffix) for suffix in (DATA_SUFFIX, MASK_SUFFIX, SCALE_SUFFIX))
    model._keys_to_ignore_on_load_missing = set(model._keys_to_ignore_on_load_missing or ()) | {rf"(^|\.)({either})$"}
    model._keys_to_ignore_on_load_unexpected = (set(model._keys_to_ignore_on_load_unexpected or ())
                                                | {rf"(^|\.)({either})({parts})$"})


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


def _decode_into(model: nn.Module, files: Iterable[str], specs: Mapping[str, TensorSpec]) -> None:
    """Decode packed tensors that no UMQLinear holds into the model's dense parameters."""
    from ..backends import get_backend
    from ..io import open_checkpoint

    state_names = set(model.state_dict().keys())
    for file in files:
        with open_checkpoint(file) as checkpoint:
            for name in checkpoint.specs:
                if name not in specs:
                    continue
                target = name if name in state_names else f"{model.base_model_prefix}.{name}"
                if target not in state_names:
                    continue
                param = model.get_parameter(target)
                if tuple(param.shape) != tuple(specs[name].shape):
                    raise UMQError(
                        f"packed as {list(specs[name].shape)} but the model's '{target}' is {list(param.shape)}",
                        rule="shape", file=file, tensor=name,
                    )
                with torch.no_grad():
                    param.copy_(get_backend("torch").decode(checkpoint.packed(name), param.dtype))


# --------------------------------------------------------------------------- loaders


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
    found = _quant_method(config)
    if found != QUANT_METHOD:
        raise UMQError(
            f"config.json has no quantization_config with quant_method 'umq' (found {found!r}); "
            "was this directory written by umq pack?",
            rule="quantization-config",
            file=config_file,
        )
    return config


def _quant_method(config: Any) -> Any:
    """``quantization_config.quant_method`` of a parsed config.json, else None."""
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    return qc.get("quant_method") if isinstance(qc, dict) else None


def _model_class(architectures: list[str] | None) -> Any:
    """The first class of ``config.json``'s ``architectures`` transformers knows, else AutoModel."""
    for arch in architectures or []:
        if hasattr(transformers, arch):
            return getattr(transformers, arch)
    return transformers.AutoModel


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
    path = Path(path)
    config = _read_quantization_config(path)
    check_directory_before_loading(path)  # every umq reader rule, before transformers reads
    register()
    model_class = model_class or _model_class(config.get("architectures"))
    try:
        with transformers_quiet():
            model = model_class.from_pretrained(str(path), **from_pretrained_kwargs)
    except UMQError as exc:
        raise exc.located(file=path)
    except TRANSFORMERS_ERRORS as exc:
        raise transformers_error(exc, path) from exc
    configure(model, backend=backend, cache_decoded=cache_decoded)
    return model.eval()


def load_dense_model(model_dir: str | os.PathLike) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` from a local Hugging Face model directory, float32, on the
    CPU, in eval mode. Uses the architecture named in ``config.json`` (so heads such as
    ``lm_head`` are there too), falling back to ``AutoModel``. Never touches the network."""
    model_dir = Path(model_dir)
    try:
        config = transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True)
        model_cls = _model_class(getattr(config, "architectures", None))
        with transformers_quiet():  # no "Loading weights" bar: the core prints nothing
            model = model_cls.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise UMQError(f"cannot load the model or tokenizer with transformers ({exc})",
                       rule="model-load", file=model_dir) from None
    return model.eval(), tokenizer


register()

__all__ = [
    "QUANT_METHOD",
    "UMQConfig",
    "UMQHfQuantizer",
    "check_after_weights_load",
    "check_before_weights_load",
    "check_index_first",
    "install_index_check",
    "load_dense_model",
    "load_hf",
    "register",
    "swap_packed_linears",
]

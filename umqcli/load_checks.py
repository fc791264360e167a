"""The checks around loading a packed model into a framework: before and after.

Loading through transformers reads the files with transformers' own code, which trusts
them: a weight it cannot find is silently initialised, a damaged header is a raw
exception from deep inside it. So a packed model directory is validated by the same
:class:`~umqcli.io.Checkpoint` every umq reader opens (index, headers, specs, stored
shapes, orphans; see ``docs/validation.md``) before transformers reads a tensor, and
after loading every packed layer must hold exactly the file's bytes (crc32) and every
FORMAT value rule. Nothing here knows transformers' classes; the integration calls in.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping

from torch import nn

from .errors import UMQError
from .format import TensorSpec
from .io import INDEX_NAME, not_packed, open_checkpoint


def packed_directory_specs(files: Iterable[str | os.PathLike]) -> tuple[dict[str, TensorSpec], dict[str, Path]]:
    """Validate the checkpoint behind ``files`` (the safetensors files a loader resolved)
    and return its quantized tensors: (name -> spec, name -> file).

    When the files come from a directory with an index, that directory is opened as a
    whole, so its index is held to every rule (entries inside the directory, every
    listed shard present, no unlisted shard holding packed tensors) and every file the
    loader reads must be one the index lists. Files without a single packed tensor are
    refused (``not-packed``, naming their directory): loading them would leave every
    layer the config declares packed randomly initialised. Raises :class:`UMQError`
    naming file, tensor and rule.
    """
    paths = [Path(f) for f in files]
    indexed = [p.parent for p in paths if (p.parent / INDEX_NAME).is_file()]
    if indexed:
        with open_checkpoint(indexed[0]) as checkpoint:
            listed = {p.resolve() for p in checkpoint.files}
            for path in paths:
                if path.resolve() not in listed:
                    raise UMQError("the loader reads this file but the index does not list it",
                                   rule="index-unlisted", file=path)
            checkpoint.require_packed()
            return dict(checkpoint.specs), dict(checkpoint.spec_files)
    specs: dict[str, TensorSpec] = {}
    spec_files: dict[str, Path] = {}
    for path in paths:
        with open_checkpoint(path) as checkpoint:
            for name, spec in checkpoint.specs.items():
                if name in specs:
                    raise UMQError("quantized tensor listed in two files", rule="duplicate-tensor",
                                   file=path, tensor=name)
                specs[name] = spec
                spec_files[name] = path
    if not paths:
        raise UMQError("the loader resolved no checkpoint file", rule="not-packed")
    if not specs:
        raise not_packed(paths[0].parent)
    return specs, spec_files


def check_directory_before_loading(path: str | os.PathLike) -> dict[str, TensorSpec]:
    """Every header, index and spec rule of a packed model directory, before a framework
    reads it; the quantized tensors by name. A directory without a single packed tensor
    is refused (rule ``not-packed``): loading it would leave every layer the config
    declares packed randomly initialised."""
    with open_checkpoint(path) as checkpoint:
        checkpoint.require_packed()
        return dict(checkpoint.specs)


def check_loaded_layers(layers: Iterable[tuple[str, nn.Module]], sources: Mapping[str, tuple[str, Path | None]]) -> None:
    """After loading: every packed layer holds the file's bytes and obeys every FORMAT
    rule (crc32, popcount, scales, lo codes, finite hi values).

    ``layers``: ``(module name, UMQLinear)``; ``sources``: module name -> (quantized
    tensor name in the file, file). A layer whose buffers the loader left unfilled fails
    the crc32 check; it is reported as ``not-loaded`` naming the tensor (transformers
    marks every tensor it loads with ``_is_hf_initialized``; only the wording depends on
    that flag, never the verdict).
    """
    for module_name, layer in layers:
        tensor, file = sources.get(module_name, (f"{module_name}.weight", None))
        try:
            layer.packed.validate(name=tensor, check_crc=True)
        except UMQError as exc:
            unfilled = [
                buffer_name
                for buffer_name, buffer in layer.weight.named_buffers(recurse=False)
                if not getattr(buffer, "_is_hf_initialized", False)
            ]
            if unfilled and exc.rule == "crc32":
                raise UMQError(
                    f"the loader did not fill {', '.join(unfilled)} of layer '{module_name}' from the file "
                    "(the checkpoint does not hold it under a name the model maps to this layer)",
                    rule="not-loaded", file=file, tensor=tensor,
                ) from None
            raise exc.located(file=file)


__all__ = ["check_directory_before_loading", "check_loaded_layers", "packed_directory_specs"]

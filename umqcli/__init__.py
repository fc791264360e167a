"""umq: unstructured mixture quantization of safetensors checkpoints.

In every group of 8 consecutive weights of a row, exactly ``k`` stay 16-bit ("hi") and
``8 - k`` become 8-bit ("lo": FP8 E4M3 / E5M2 or int8 with a shared block scale); one
mask byte per group records which. See ``shared/FORMAT.md`` (FORMAT v1) for the bytes.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .codec import PackedTensor, dequantize, quantize, weight_error
from .errors import UMQError
from .format import FORMAT_VERSION, HiFormat, LoFormat, QuantParams, ScaleRule, Selection, TensorSpec
from .integrations import register_when_transformers_loads
from .nn import UMQLinear

# `from_pretrained(packed_dir)` knows quant_method "umq" once transformers loads its
# quantizer table; transformers itself is not imported here.
register_when_transformers_loads()


def __getattr__(name: str):
    # load_hf lives with the transformers integration, imported on first use.
    if name == "load_hf":
        from .integrations.transformers import load_hf

        return load_hf
    raise AttributeError(f"module 'umqcli' has no attribute {name!r}")

__all__ = [
    "FORMAT_VERSION",
    "HiFormat",
    "LoFormat",
    "PackedTensor",
    "QuantParams",
    "ScaleRule",
    "Selection",
    "TensorSpec",
    "UMQError",
    "UMQLinear",
    "__version__",
    "dequantize",
    "load_hf",
    "quantize",
    "weight_error",
]

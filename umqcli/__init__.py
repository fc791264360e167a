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
from .nn import UMQLinear, load_hf

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

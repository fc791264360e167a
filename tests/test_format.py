"""Tests of the FORMAT v1 vocabulary (``umqcli.format``): parameters, specs, metadata."""

from __future__ import annotations

import json

import pytest
import torch

from umqcli.errors import UMQError
from umqcli.format import (
    DATA_SUFFIX,
    FORMAT_VERSION,
    MASK_SUFFIX,
    META_TENSORS_CRC,
    SCALE_SUFFIX,
    HiFormat,
    LoFormat,
    QuantParams,
    ScaleRule,
    Selection,
    TensorSpec,
    decode_metadata,
    dtype_name,
    encode_metadata,
    entry_crc32,
)


def _spec(**changes) -> TensorSpec:
    entry = {
        "shape": [6, 64], "dtype": "float16", "k": 3, "lo": "fp8_e5m2", "hi": "float16",
        "block": 32, "selection": "magnitude", "scale_rule": "absmax",
        "crc32": {"data": 1, "mask": 2, "scale": 4294967295},
    }
    entry.update(changes)
    return TensorSpec.from_json(entry, tensor="w")


def test_lo_constants_match_format() -> None:
    """MAX of FORMAT §4 and the torch dtype whose bit pattern is the stored byte."""
    assert LoFormat.FP8_E4M3.max_value == 448.0
    assert LoFormat.FP8_E5M2.max_value == 57344.0
    assert LoFormat.INT8.max_value == 127.0
    for lo in (LoFormat.FP8_E4M3, LoFormat.FP8_E5M2):
        assert torch.finfo(lo.torch_dtype).max == lo.max_value
    assert HiFormat("bfloat16").torch_dtype == torch.bfloat16
    assert FORMAT_VERSION == 1


def test_quant_params_accept_strings_and_round_trip() -> None:
    """Strings from JSON/CLI become enums; 'auto' hi is None; to_json/from_json round-trip."""
    params = QuantParams(k=4, lo="int8", hi="auto", block=64, selection="activation")
    assert params.lo is LoFormat.INT8 and params.hi is None and params.selection is Selection.ACTIVATION
    assert params.scale_rule is ScaleRule.ABSMAX
    assert QuantParams.from_json(params.to_json()) == params
    assert json.loads(json.dumps(params.to_json()))["hi"] == "auto"
    explicit = QuantParams(hi="bfloat16")
    assert explicit.hi is HiFormat.BFLOAT16 and QuantParams.from_json(explicit.to_json()) == explicit
    assert params.with_(k=2).k == 2 and params.k == 4


@pytest.mark.parametrize(
    "kwargs, rule",
    [({"k": 9}, "k"), ({"k": -1}, "k"), ({"block": 12}, "block"), ({"block": -8}, "block"),
     ({"lo": "fp4"}, "lo"), ({"hi": "float32"}, "hi"), ({"selection": "random"}, "selection"),
     ({"scale_rule": "mse"}, "scale_rule")],
)
def test_quant_params_refuse_bad_values(kwargs, rule) -> None:
    """Each out-of-range or unknown parameter raises UMQError with its own rule."""
    with pytest.raises(UMQError) as info:
        QuantParams(**kwargs)
    assert info.value.rule == rule


def test_quant_params_from_json_refuses_unknown_keys() -> None:
    """An unknown key (a typo, a newer parameter) is refused, not ignored."""
    with pytest.raises(UMQError) as info:
        QuantParams.from_json({"k": 1, "bits": 4})
    assert info.value.rule == "params" and "bits" in info.value.message


def test_resolve_block() -> None:
    """block 0 -> the column count; a block not dividing C is refused with the sizes."""
    assert QuantParams(block=0).resolve_block(4096) == 4096
    assert QuantParams(block=128).resolve_block(4096) == 128
    with pytest.raises(UMQError) as info:
        QuantParams(block=48).resolve_block(64)
    assert info.value.rule == "block" and "48" in info.value.message and "64" in info.value.message


@pytest.mark.parametrize("k", range(9))
def test_bits_per_element_follow_format_section_6(k: int) -> None:
    """(8 + k + 1) bytes per group of 8 plus 32 / B bits of scale: 10 bits + scale at k=1."""
    assert QuantParams(k=k, block=64).bits_per_element() == (9 + k) + 0.5
    assert QuantParams(k=k).bits_per_element(4096) == (9 + k) + 32 / 4096
    spec = _spec(k=k, shape=[4, 128], block=32)
    assert spec.bits_per_element == (9 + k) + 1.0
    assert spec.stored_bytes == 4 * 16 * (8 + k) + 4 * 16 + 4 * 4 * 4


def test_spec_stored_shapes() -> None:
    """Stored shapes of FORMAT §2: data [R, G*(8+k)], mask [R, G], scale [R, C/B]."""
    spec = _spec()
    assert spec.stored_shapes() == {DATA_SUFFIX: (6, 8 * 11), MASK_SUFFIX: (6, 8), SCALE_SUFFIX: (6, 2)}
    assert spec.groups == 8 and spec.group_bytes == 11 and spec.torch_dtype == torch.float16


def test_spec_json_round_trip_and_default_scale_rule() -> None:
    """to_json/from_json are inverse; a vector-style entry without scale_rule reads as absmax."""
    spec = _spec()
    assert TensorSpec.from_json(spec.to_json()) == spec
    entry = spec.to_json()
    del entry["scale_rule"]
    assert TensorSpec.from_json(entry).scale_rule == "absmax"


@pytest.mark.parametrize(
    "changes, rule",
    [({"shape": [6]}, "shape"), ({"shape": [6, 0]}, "shape"), ({"shape": [6, 60]}, "shape"),
     ({"dtype": "int8"}, "dtype"), ({"k": True}, "k"), ({"k": "3"}, "k"), ({"lo": "e4m3"}, "lo"),
     ({"hi": "auto"}, "hi"), ({"block": 48}, "block"), ({"block": 0}, "block"), ({"block": 4}, "block"),
     ({"selection": 3}, "spec"), ({"crc32": {"data": 1, "mask": 2}}, "crc32"),
     ({"crc32": {"data": 1, "mask": 2, "scale": 2**32}}, "crc32")],
)
def test_spec_refuses_each_rule(changes, rule) -> None:
    """Each malformed umq.tensors field fails with its rule and names the tensor."""
    with pytest.raises(UMQError) as info:
        _spec(**changes)
    assert info.value.rule == rule and info.value.tensor == "w"


def test_spec_refuses_missing_keys() -> None:
    """An entry without crc32 fails with rule spec and names the missing key."""
    entry = _spec().to_json()
    del entry["crc32"]
    with pytest.raises(UMQError) as info:
        TensorSpec.from_json(entry, tensor="w")
    assert info.value.rule == "spec" and "crc32" in info.value.message


def test_metadata_round_trip() -> None:
    """encode_metadata writes format=pt, umq.version=1 and compact JSON; decode parses it
    back to equal specs, keeps extra keys untouched, and a plain checkpoint gives {}."""
    specs = {"a.weight": _spec(), "b.weight": _spec(k=0, lo="int8", hi="bfloat16", dtype="bfloat16")}
    meta = encode_metadata(specs, extra={"note": "x"})
    assert meta["format"] == "pt" and meta["umq.version"] == "1" and meta["note"] == "x"
    assert " " not in meta["umq.tensors"]
    assert decode_metadata(meta) == specs
    assert decode_metadata({"format": "pt"}) == {}
    assert decode_metadata(None) == {}


@pytest.mark.parametrize(
    "meta, rule",
    [({"umq.version": "2", "umq.tensors": "{}"}, "version"),
     ({"umq.tensors": "{}"}, "version"),
     ({"umq.version": "1", "umq.tensors": "{not json"}, "spec"),
     ({"umq.version": "1", "umq.tensors": "[]"}, "spec")],
)
def test_decode_metadata_refuses(meta, rule) -> None:
    """Unknown or missing umq.version, invalid JSON, a non-object: refused naming the file."""
    with pytest.raises(UMQError) as info:
        decode_metadata(meta, file="m.safetensors")
    assert info.value.rule == rule and info.value.file == "m.safetensors"


def test_decode_metadata_names_file_and_tensor() -> None:
    """A bad entry inside a header names file, tensor and rule, also in str()."""
    meta = encode_metadata({"x.weight": _spec()})
    meta["umq.tensors"] = meta["umq.tensors"].replace('"k":3', '"k":12')
    with pytest.raises(UMQError) as info:
        decode_metadata(meta, file="m.safetensors")
    err = info.value
    assert (err.rule, err.file, err.tensor) == ("k", "m.safetensors", "x.weight")
    assert "m.safetensors" in str(err) and "x.weight" in str(err) and "[rule: k]" in str(err)


def test_dtype_name() -> None:
    """FORMAT dtype names for source dtypes; float64 is refused with rule source-dtype."""
    assert dtype_name(torch.bfloat16) == "bfloat16"
    with pytest.raises(UMQError) as info:
        dtype_name(torch.float64)
    assert info.value.rule == "source-dtype"


def test_entry_checksums_catch_a_changed_entry() -> None:
    """umq.tensors.crc32 holds each entry's CRC-32 over its canonical JSON: spacing and
    key order do not matter, a flipped dtype or swapped lo/hi does (rule spec-crc32,
    naming the tensor); a file without the key reads as before; a malformed key is refused."""
    specs = {"a.weight": _spec(), "b.weight": _spec(k=0, lo="int8", hi="bfloat16", dtype="bfloat16")}
    meta = encode_metadata(specs)
    checksums = json.loads(meta[META_TENSORS_CRC])
    assert checksums == {name: entry_crc32(spec.to_json()) for name, spec in specs.items()}
    assert checksums["a.weight"] != checksums["b.weight"]
    # Same entries, other spacing and key order: still valid.
    entries = json.loads(meta["umq.tensors"])
    respaced = dict(meta, **{"umq.tensors": json.dumps({n: dict(reversed(e.items())) for n, e in entries.items()}, indent=1)})
    assert decode_metadata(respaced) == specs
    assert decode_metadata({k: v for k, v in meta.items() if k != META_TENSORS_CRC}) == specs
    for change in ({"dtype": "bfloat16"}, {"lo": "fp8_e4m3", "hi": "bfloat16"}, {"k": 2}):
        edited = json.loads(meta["umq.tensors"])
        edited["a.weight"].update(change)
        with pytest.raises(UMQError) as info:
            decode_metadata(dict(meta, **{"umq.tensors": json.dumps(edited)}), file="m.safetensors")
        assert (info.value.rule, info.value.tensor, info.value.file) == ("spec-crc32", "a.weight", "m.safetensors")
    for bad in ("[]", "{not json", json.dumps({"a.weight": checksums["a.weight"]}),
                json.dumps({**checksums, "a.weight": str(checksums["a.weight"])})):
        with pytest.raises(UMQError) as info:
            decode_metadata(dict(meta, **{META_TENSORS_CRC: bad}))
        assert info.value.rule == "spec-crc32"
    # The writer's reserve: every checksum at its widest.
    assert set(json.loads(encode_metadata(specs, widest=True)[META_TENSORS_CRC]).values()) == {2**32 - 1}

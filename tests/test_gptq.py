"""Tests of the gptq method and the clip-searched scales (``umqcli.gptq``).

Truth from outside the sweep: the output error ``tr(E H E^T)`` of a synthetic layer
with a known Hessian, the reference codec's bytes (H = identity), a plain float64
column-by-column GPTQ written out below (no lazy blocks, no transposes), and the
FORMAT §7 validation of the packed result.
"""

from __future__ import annotations

import pytest
import torch

from umqcli import codec, gptq
from umqcli.errors import UMQError
from umqcli.format import GROUP, LoFormat, Method, QuantParams, ScaleRule, Selection, decode_metadata, encode_metadata

LOS = [LoFormat.INT8, LoFormat.FP8_E4M3, LoFormat.FP8_E5M2]


def _layer(rows: int = 64, cols: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight with a few large input columns and a Hessian of correlated inputs with a
    few high-energy channels (what transformer activations look like)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2048, 16, generator=gen) @ torch.randn(16, cols, generator=gen) * 0.5
    x += torch.randn(2048, cols, generator=gen)
    x[:, torch.randperm(cols, generator=gen)[:4]] *= 8.0
    weight = torch.randn(rows, cols, generator=gen) * 0.02
    weight[:, torch.randperm(cols, generator=gen)[:3]] *= 10.0
    return weight, x.T @ x / x.shape[0]


def _output_error(weight: torch.Tensor, packed: codec.PackedTensor, hessian: torch.Tensor) -> float:
    """``tr(E H E^T) / tr(W H W^T)``: the relative output error energy on inputs with
    second moment H."""
    w, h = weight.double(), hessian.double()
    e = w - codec.dequantize(packed, torch.float32).double()
    return float(((e @ h) * e).sum() / ((w @ h) * w).sum())


@pytest.fixture(scope="module")
def layer():
    weight, hessian = _layer()
    return weight, hessian, gptq.prepare_hessian(hessian)


@pytest.mark.parametrize("lo", LOS)
@pytest.mark.parametrize("block", [0, 32])
@pytest.mark.parametrize("k", [0, 1, 4])
def test_gptq_output_error_is_below_round_to_nearest(layer, lo, block, k) -> None:
    """Same mask, same absmax scales: error feedback at least halves the output error
    energy on correlated inputs, for every lo format, row and block scales and k."""
    weight, hessian, prepared = layer
    rtn = codec.quantize(weight, QuantParams(k=k, lo=lo, block=block))
    packed = gptq.quantize_gptq(weight, QuantParams(k=k, lo=lo, block=block, method="gptq"), prepared)
    ratio = _output_error(weight, packed, hessian) / _output_error(weight, rtn, hessian)
    assert ratio < 0.5, ratio
    assert torch.equal(packed.mask, rtn.mask) and torch.equal(packed.scale, rtn.scale)
    assert packed.spec.selection == "magnitude+gptq" and packed.spec.scale_rule == "absmax"
    packed.validate(name="w")


@pytest.mark.parametrize("lo", LOS)
@pytest.mark.parametrize("block", [0, 32])
@pytest.mark.parametrize("k", [0, 3, 8])
def test_identity_hessian_gives_the_reference_bytes(lo, block, k) -> None:
    """With H = I nothing is pushed: data, mask and scale equal codec.quantize's (magnitude
    selection, absmax scales); only the recorded selection differs."""
    weight, _ = _layer(rows=16, cols=128, seed=1)
    ref = codec.quantize(weight, QuantParams(k=k, lo=lo, block=block), fused=False)
    packed = gptq.quantize_gptq(weight, QuantParams(k=k, lo=lo, block=block, method="gptq"), torch.eye(128))
    for part in ("data", "mask", "scale"):
        assert torch.equal(getattr(packed, part), getattr(ref, part)), part
    assert packed.spec.crc32 == ref.spec.crc32


@pytest.mark.parametrize("selection", list(Selection))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hi_values_are_the_source_values(layer, selection, dtype) -> None:
    """Every hi element decodes to the source value in the hi dtype (FORMAT §4), whatever
    the sweep pushed into its column; the mask has k bits per group; §7 holds."""
    weight, _, prepared = layer
    weight = weight.to(dtype)
    params = QuantParams(k=2, lo="fp8_e4m3", block=32, selection=selection, method="gptq",
                         scale_rule="clip-hessian")
    packed = gptq.quantize_gptq(weight, params, prepared)
    _, _, mask = codec.deinterleave(packed)
    decoded = codec.dequantize(packed, torch.float32)
    expected = weight.to(packed.spec.hi.torch_dtype).float()
    assert torch.equal(decoded[mask], expected[mask])
    assert int(mask.sum()) == 2 * weight.numel() // GROUP
    assert packed.spec.selection == f"{selection.value}+gptq" and packed.spec.scale_rule == "clip-hessian"
    packed.validate(name="w")
    spec = decode_metadata(encode_metadata({"w": packed.spec}))["w"]
    assert spec == packed.spec


def _reference_gptq(weight: torch.Tensor, hessian: torch.Tensor, params: QuantParams) -> torch.Tensor:
    """float64 GPTQ written out plainly: source column order, every update applied at
    once, hi elements rounded to their source value. Returns the values each lo element
    was rounded from (``[R, C]``)."""
    mask, hi = codec.select(weight, QuantParams(k=params.k, lo=params.lo, block=params.block))
    block = params.resolve_block(weight.shape[1])
    scale = codec.block_scales(weight.float(), mask, block, params.lo).repeat_interleave(block, 1).double()
    h = hessian.double().clone()
    h += 0.01 * h.diagonal().mean() * torch.eye(h.shape[0], dtype=torch.float64)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    work = weight.double().clone()
    rounded_from = torch.zeros_like(work)
    limit = params.lo.max_value
    for j in range(work.shape[1]):
        column = work[:, j].clone()
        rounded_from[:, j] = column
        q = (column.float() / scale[:, j].float()).clamp(-limit, limit)
        q = q.round() if params.lo is LoFormat.INT8 else q.to(params.lo.torch_dtype).float()
        decoded = torch.where(mask[:, j], weight[:, j].to(hi.torch_dtype).double(), q.double() * scale[:, j])
        error = (column - decoded) / u[j, j]
        work[:, j + 1:] -= error.unsqueeze(1) * u[j, j + 1:].unsqueeze(0)
    return rounded_from


@pytest.mark.parametrize("lo", LOS)
def test_lazy_blocked_sweep_matches_the_plain_reference(lo) -> None:
    """The vectorised sweep (act order, lazy blocks of 128 columns, float32) against the
    plain float64 GPTQ: on an H with equal diagonal (so both visit columns in source
    order) the values rounded agree to 1e-4 of the weight scale, and the output error
    energies to 2%."""
    weight, hessian = _layer(rows=24, cols=320, seed=2)
    d = hessian.diagonal().rsqrt()
    hessian = hessian * d.unsqueeze(0) * d.unsqueeze(1)  # correlation matrix: H_jj = 1
    hessian.diagonal().fill_(1.0)  # exactly, so the act order is the source order
    params = QuantParams(k=1, lo=lo, block=0, method="gptq")
    prepared = gptq.prepare_hessian(hessian)
    assert torch.equal(prepared.order, torch.arange(320))
    mask, hi = codec.select(weight, QuantParams(k=1, lo=lo))
    scale = codec.block_scales(weight, mask, 320, lo).repeat_interleave(320, 1)
    fast = gptq._sweep(weight, mask, weight.to(hi.torch_dtype).float(), scale, lo, prepared)
    plain = _reference_gptq(weight, hessian, params)
    assert float((fast.double() - plain).abs().max()) < 1e-4 * float(weight.abs().max())
    packed = gptq.quantize_gptq(weight, params, prepared)
    block = 320
    plain_bytes = codec.quantize_lo(plain.float(), codec.block_scales(weight, mask, block, lo), block, lo)
    plain_packed = codec.assemble(weight, params, hi, mask, codec.block_scales(weight, mask, block, lo), plain_bytes)
    fast_error, plain_error = _output_error(weight, packed, hessian), _output_error(weight, plain_packed, hessian)
    assert abs(fast_error / plain_error - 1) < 0.02


@pytest.mark.parametrize("lo", LOS)
def test_clip_search_is_never_worse_than_absmax_per_block(lo) -> None:
    """Per block the searched scale's (weighted) squared lo error is <= absmax's, the
    scale stays within [0.5, 1] x absmax; on heavy-tailed weights the fp8 formats gain
    (their top binade is coarse: a slightly smaller scale moves values onto finer steps),
    int8 at 8 bits hardly does (its rounding error is tiny next to a clipped value's)."""
    weight, hessian = _layer(rows=32, cols=256, seed=3)
    gen = torch.Generator().manual_seed(3)
    heavy = torch.randn(32, 256, generator=gen) * torch.exp(torch.randn(32, 256, generator=gen))
    for w, channel in ((weight, None), (weight, hessian.diagonal()), (heavy, None)):
        mask = codec.select_magnitude(w, 1)
        scale = gptq.search_scales(w, mask, 32, lo, channel)
        absmax = codec.block_scales(w, mask, 32, lo)
        a = torch.ones(256) if channel is None else channel

        def block_error(s):
            e = codec.lo_error(w, s, 32, lo).square().masked_fill(mask, 0.0) * a
            return e.view(32, 8, 32).sum(-1)

        assert bool((block_error(scale) <= block_error(absmax)).all())
        assert bool((scale <= absmax).all()) and bool((scale >= 0.5 * absmax - 1e-12).all())
    if lo is not LoFormat.INT8:
        assert float(block_error(scale).sum()) < 0.95 * float(block_error(absmax).sum())


def test_rtn_with_clip_scales_rounds_to_nearest(layer) -> None:
    """method rtn with a clip rule: lo bytes are quantize_lo under the searched scales."""
    weight, hessian, prepared = layer
    packed = gptq.quantize_gptq(weight, QuantParams(k=1, lo="int8", block=32, scale_rule="clip"), None)
    mask = codec.select_magnitude(weight, 1)
    scale = gptq.search_scales(weight, mask, 32, LoFormat.INT8)
    assert torch.equal(packed.scale, scale)
    expected = codec.assemble(weight, QuantParams(k=1, lo="int8", block=32, scale_rule="clip"),
                              packed.spec.hi, mask, scale, codec.quantize_lo(weight, scale, 32, LoFormat.INT8))
    assert torch.equal(packed.data, expected.data) and packed.spec.scale_rule == "clip"


def test_saliency_selection_keeps_the_largest_w2_over_hinv_in_its_seed(layer) -> None:
    """saliency = error-greedy with channel weights 1/[H^-1]_jj; with k=1 on int8 its
    H-weighted output error is <= magnitude's under gptq (the per-block guard)."""
    weight, hessian, prepared = layer
    by_name = {}
    for selection in ("magnitude", "saliency"):
        params = QuantParams(k=1, lo="int8", block=32, selection=selection, method="gptq")
        by_name[selection] = _output_error(weight, gptq.quantize_gptq(weight, params, prepared), hessian)
    assert by_name["saliency"] <= by_name["magnitude"] * 1.05
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(
        hessian + 0.01 * hessian.diagonal().mean() * torch.eye(256)))
    assert torch.allclose(prepared.inverse_diagonal, inverse.diagonal(), rtol=1e-3)


def test_prepare_hessian_handles_dead_columns_and_refuses_bad_input() -> None:
    """An always-zero input (H_jj = 0) and a rank-deficient H still factor; a non-square
    or non-finite H is refused (rule hessian); gptq without H is refused."""
    x = torch.randn(8, 64)
    x[:, 5] = 0
    prepared = gptq.prepare_hessian(x.T @ x / 8)  # rank 8 of 64, column 5 dead
    assert bool(torch.isfinite(prepared.inverse_factor).all())
    for bad in (torch.ones(3, 4), torch.full((8, 8), float("nan"))):
        with pytest.raises(UMQError) as info:
            gptq.prepare_hessian(bad)
        assert info.value.rule == "hessian"
    weight = torch.randn(8, 64)
    with pytest.raises(UMQError) as info:
        gptq.quantize_gptq(weight, QuantParams(method="gptq"), None, name="w")
    assert info.value.rule == "hessian" and info.value.tensor == "w"
    with pytest.raises(UMQError) as info:
        gptq.quantize_gptq(weight, QuantParams(method="gptq"), torch.eye(32))
    assert info.value.rule == "hessian"


def test_params_method_round_trip_and_refusals() -> None:
    """method is a QuantParams field (JSON round trip); saliency needs gptq; the RTN
    codec refuses parameters that are not its own."""
    params = QuantParams(k=2, lo="int8", selection="saliency", method="gptq", scale_rule="clip-hessian")
    assert params.method is Method.GPTQ and params.scale_rule is ScaleRule.CLIP_HESSIAN
    assert QuantParams.from_json(params.to_json()) == params
    assert params.recorded_selection == "saliency+gptq"
    assert QuantParams(k=1).recorded_selection == "magnitude"
    with pytest.raises(UMQError) as info:
        QuantParams(selection="saliency")
    assert info.value.rule == "selection"
    with pytest.raises(UMQError) as info:
        codec.quantize(torch.randn(4, 16), QuantParams(method="gptq"))
    assert info.value.rule == "method"


def test_hessians_accumulate_share_and_round_trip(tmp_path) -> None:
    """The accumulator's H is X^T X / N over every row fed (streamed in batches), shared
    by the weights that name its key; save/load keeps one tensor per distinct H and the
    sharing; a version 1 file (no Hessians) still loads."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from umqcli.stats import ActivationAccumulator, load_stats, read_stats_metadata, save_stats

    gen = torch.Generator().manual_seed(5)
    batches = [torch.randn(2, 7, 16, generator=gen) for _ in range(3)]
    acc = ActivationAccumulator(sample_rows=4)
    for x in batches:
        for name in ("q.weight", "k.weight"):  # both read x; q's key holds the Hessian
            acc.update(name, x, hessian_key="q.weight")
        acc.update("o.weight", x[..., :8])  # no Hessian asked for
    stats = acc.result()
    rows = torch.cat([x.reshape(-1, 16) for x in batches]).double()
    assert torch.allclose(stats["q.weight"].hessian.double(), rows.T @ rows / rows.shape[0], atol=1e-5)
    assert stats["k.weight"].hessian is stats["q.weight"].hessian and stats["o.weight"].hessian is None
    path = tmp_path / "s.safetensors"
    save_stats(path, stats)
    with safe_open(str(path), framework="pt") as handle:
        assert sorted(k for k in handle.keys() if k.endswith(".hessian")) == ["q.weight.hessian"]
    assert read_stats_metadata(path)["umq.stats"] == "2"
    loaded = load_stats(path)
    assert torch.equal(loaded["k.weight"].hessian, stats["q.weight"].hessian)
    assert loaded["k.weight"].hessian is loaded["q.weight"].hessian and loaded["o.weight"].hessian is None
    old = tmp_path / "v1.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys() if not k.endswith(".hessian")}
    save_file(tensors, str(old), metadata={"umq.stats": "1", "rows": '{"q.weight":42}'})
    v1 = load_stats(old)
    assert v1["q.weight"].hessian is None and v1["q.weight"].rows == 42
    assert torch.equal(v1["q.weight"].act_sq, stats["q.weight"].act_sq)


def test_pack_gptq_slab_by_slab_equals_the_whole_tensor(tmp_path) -> None:
    """pack() with the gptq method over small slabs gives the bytes of one whole-tensor
    quantize_gptq (rows are independent); a tensor without its Hessian is refused."""
    from safetensors.torch import save_file

    from umqcli.io import open_checkpoint
    from umqcli.pack import pack

    weight, hessian = _layer(rows=40, cols=256, seed=6)
    src = tmp_path / "m.safetensors"
    save_file({"layer.weight": weight}, str(src))
    params = QuantParams(k=1, lo="int8", block=32, selection="saliency", method="gptq", scale_rule="clip-hessian")
    summary = pack(src, tmp_path / "o.safetensors", params=params, act_sq={"layer.weight": hessian.diagonal()},
                   hessians={"layer.weight": hessian}, slab_elements=256 * 7, workers=2)
    whole = gptq.quantize_gptq(weight, params, hessian, act_sq=hessian.diagonal())
    with open_checkpoint(tmp_path / "o.safetensors") as ckpt:
        again = ckpt.packed("layer.weight")
        assert again.spec == whole.spec
        assert torch.equal(again.data, whole.data) and torch.equal(again.scale, whole.scale)
    assert summary.packed[0].spec.selection == "saliency+gptq"
    with pytest.raises(UMQError) as info:
        pack(src, tmp_path / "p.safetensors", params=params, act_sq={"layer.weight": hessian.diagonal()})
    assert info.value.rule == "hessian" and not (tmp_path / "p.safetensors").exists()


def test_candidate_search_adds_gptq_candidates_around_the_rtn_allocation() -> None:
    """method=rtn+gptq: the per-tensor pass evaluates rtn candidates only (saliency only
    with gptq); after the rtn allocation, gptq candidates are added for the picked key and
    its two neighbours on the rtn front (saliency for k > 0); each one's predicted error
    is the key's best rtn prediction times tr(E H E^T) of what quantize_gptq packs over
    that of the rtn bytes (stacked sweeps of two lo formats give the single sweep's
    bytes); gptq predicts less error than rtn at equal bits, and the reallocation then
    picks a gptq candidate."""
    from umqcli.calibrate import CandidateSpace, allocate_budget, evaluate_tensor, search_recipe
    from umqcli.calibrate.candidates import gptq_configurations
    from umqcli.stats import ChannelStats

    weight, hessian = _layer(rows=32, cols=256, seed=7)
    space = CandidateSpace.parse("k=0-3,lo=int8+fp8_e4m3,block=row,selection=magnitude+saliency,method=rtn+gptq")
    assert space.methods == (Method.RTN, Method.GPTQ)
    stats = ChannelStats(hessian.diagonal().clone(), hessian.diagonal().sqrt(), torch.zeros(256, dtype=torch.int64),
                         torch.zeros(0, 256), rows=2048, hessian=hessian)
    rtn = evaluate_tensor("w", weight, stats, space, refine=0)
    assert all(c.params.method is Method.RTN and c.params.selection is not Selection.SALIENCY
               for c in rtn.candidates)
    allocate_budget([rtn], 10.2)
    assert rtn.chosen.params.k == 1  # 10.125 bits; k = 2 costs 11.125
    expected = gptq_configurations(rtn, space)
    assert [p.k for p in expected] == [0, 1, 2] and expected[1].selection is Selection.SALIENCY

    result = search_recipe({"w": weight}, {"w": stats}, budget_bits=10.2, space=space)
    choice = result.choices[0]
    added = [c for c in choice.candidates if c.params.method is Method.GPTQ]
    assert [c.params for c in added] == expected
    for c in added:
        reference = min((r for r in rtn.candidates if (r.params.k, r.params.lo, r.params.block)
                         == (c.params.k, c.params.lo, c.params.block)), key=lambda r: r.error)
        packed = gptq.quantize_gptq(weight, c.params, hessian, act_sq=hessian.diagonal())
        rounded = codec.quantize(weight, reference.params, act_sq=hessian.diagonal())
        gain = _output_error(weight, packed, hessian) / _output_error(weight, rounded, hessian)
        assert c.error == pytest.approx(reference.error * gain, rel=1e-3)
        assert gain < (0.7 if c.params.k == 0 else 1.0)
    assert choice.chosen.params.method is Method.GPTQ and choice.chosen.bits <= 10.2


def test_compare_shows_gptq_rows_when_the_statistics_hold_hessians() -> None:
    """default_formats(with_hessians=True) adds plain GPTQ (k=0) and k=1 saliency rows for
    int8 and fp8_e4m3; measured on inputs with second moment H, gptq k=0 beats rtn k=0
    (int8 per-channel's values); without a Hessian those rows are skipped with a reason."""
    from umqcli.compare import default_formats, measure_tensor

    weight, hessian = _layer(rows=32, cols=256, seed=8)
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(4096, 256, generator=gen) @ torch.linalg.cholesky(hessian).T  # E[x x^T] = H
    formats = [f for f in default_formats(with_activations=True, with_hessians=True)
               if f.name in ("umq-k0-int8-row-mag", "umq-k0-int8-row-mag-gptq", "umq-k1-int8-row-sal-gptq",
                             "umq-k1-fp8_e4m3-row-sal-gptq", "umq-k0-fp8_e4m3-row-mag-gptq")]
    assert len(formats) == 5 and {f.family for f in formats if f.params.method is Method.GPTQ} == {"gptq k=0",
                                                                                                  "gptq k=1"}
    results, skipped, _ = measure_tensor("w", weight, formats, x, act_sq=hessian.diagonal(), hessian=hessian)
    assert not skipped
    assert results["umq-k0-int8-row-mag-gptq"].rel_error < 0.8 * results["umq-k0-int8-row-mag"].rel_error
    assert results["umq-k1-int8-row-sal-gptq"].rel_error < results["umq-k0-int8-row-mag-gptq"].rel_error
    _, skipped, _ = measure_tensor("w", weight, formats, x, act_sq=hessian.diagonal())
    assert set(skipped) == {f.name for f in formats if f.params.method is Method.GPTQ}
    assert all("Hessian" in reason for reason in skipped.values())

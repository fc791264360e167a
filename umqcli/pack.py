"""``umq pack``: a checkpoint in, a packed checkpoint out, streaming in bounded memory.

The job, for a source file or Hugging Face model directory:

1. :func:`umqcli.plan.make_plan` decides every tensor (quantize with which parameters, or
   pass through and why).
2. Each output file's layout is fixed from the plan alone (packed sizes depend only on
   shape, k and block), so a :class:`~umqcli.io.SafetensorsWriter` can place every byte as
   soon as it exists.
3. Quantized tensors are processed in slabs of rows (rows are independent in FORMAT v1:
   scales are per row-block, groups never cross rows), read straight from the file,
   quantized, and written at their final offsets; each tensor's crc32 is combined from
   the slabs' (:func:`crc32_combine`, no second pass over the bytes).
   Peak memory is a few slabs, whatever the tensor or model size. Worker threads
   read and quantize the next slabs while the calling thread writes (and crc32s) the
   previous one, in order, so the bytes never depend on the thread timing.
4. Pass-through tensors are copied byte for byte, in chunks.
5. For a directory: packed shards under the source's shard names, a rewritten index, a
   ``config.json`` with ``quantization_config``, and every other file copied.

Everything goes to a temporary path next to OUT that is renamed at the end; any failure
(including Ctrl-C raised from the progress callback) removes it. Nothing here prints:
progress goes to a callback and the result is a :class:`PackSummary`.
"""

from __future__ import annotations

import functools
import math
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch

from . import _fused
from .codec import PackedTensor, dequantize, quantize
from .errors import UMQError
from .format import (DATA_SUFFIX, FORMAT_VERSION, MASK_SUFFIX, QUANT_METHOD, SCALE_SUFFIX, HiFormat, Method, QuantParams, ScaleRule,
                     Selection, TensorSpec, encode_metadata)
from .gptq import PreparedHessian, prepare_hessian, quantize_gptq
from .io import (
    INDEX_NAME,
    CONFIG_NAME,
    Checkpoint,
    SafetensorsWriter,
    atomic_output,
    check_output_path,
    copy_auxiliary_files,
    open_checkpoint,
    packed_layout,
    write_config,
    write_index,
)
from .plan import Plan, TensorPlan, make_plan
from .recipe import Recipe

# Elements per slab: big enough that per-call overheads vanish, small enough that the
# quantize temporaries (~30 bytes per element) stay near 100 MB.
SLAB_ELEMENTS = 1 << 22
# Slabs up to this many elements have their error measured on every row (_slab_error).
ERROR_EXACT_ELEMENTS = 1 << 20


@dataclass(frozen=True)
class PackProgress:
    """What the progress callback receives after every slab or copied tensor.

    ``bytes_done``/``bytes_total`` count source bytes; ``tensors_done`` counts finished
    tensors; ``current`` is the tensor being worked on.
    """

    tensors_done: int
    tensors_total: int
    bytes_done: int
    bytes_total: int
    current: str


ProgressCallback = Callable[[PackProgress], None]


@dataclass
class TensorOutcome:
    """What pack did with one source tensor: packed (its spec, bytes, error) or passed
    through (and why)."""

    name: str
    action: str  # "packed" | "passthrough"
    dtype: str  # safetensors code of the source
    shape: tuple[int, ...]
    bytes_in: int
    bytes_out: int
    reason: str
    spec: TensorSpec | None = None
    rel_error: float | None = None  # ||W - W_hat|| / ||W||, packed tensors only
    predicted_rel_error: float | None = None
    error_rows: int = 0  # rows the error was measured on (all, or a stride sample)

    @property
    def bits_per_element(self) -> float:
        numel = math.prod(self.shape) if self.shape else 1
        return 8.0 * self.bytes_out / numel if numel else 0.0

    def to_json(self) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "name": self.name,
            "action": self.action,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "bits_per_element": round(self.bits_per_element, 4),
            "reason": self.reason,
        }
        if self.spec is not None:
            spec = self.spec.to_json()
            obj["params"] = {key: spec[key] for key in ("k", "lo", "hi", "block", "selection", "scale_rule")}
            obj["rel_error"] = self.rel_error
            obj["rel_error_rows"] = self.error_rows
            obj["predicted_rel_error"] = self.predicted_rel_error
        return obj


@dataclass
class PackSummary:
    """The result of :func:`pack`: per-tensor results and totals."""

    source: Path
    output: Path
    files: list[str]
    tensors: list[TensorOutcome] = field(default_factory=list)
    seconds: float = 0.0
    copied_files: list[str] = field(default_factory=list)
    skipped_files: list[str] = field(default_factory=list)

    @property
    def packed(self) -> list[TensorOutcome]:
        return [t for t in self.tensors if t.action == "packed"]

    @property
    def passthrough(self) -> list[TensorOutcome]:
        return [t for t in self.tensors if t.action == "passthrough"]

    @property
    def bytes_in(self) -> int:
        return sum(t.bytes_in for t in self.tensors)

    @property
    def bytes_out(self) -> int:
        return sum(t.bytes_out for t in self.tensors)

    @property
    def packed_bits_per_element(self) -> float | None:
        """Stored bits per element over the quantized tensors (payload + mask + scale)."""
        numel = sum(math.prod(t.shape) for t in self.packed)
        return 8.0 * sum(t.bytes_out for t in self.packed) / numel if numel else None

    @property
    def packed_source_bits_per_element(self) -> float | None:
        numel = sum(math.prod(t.shape) for t in self.packed)
        return 8.0 * sum(t.bytes_in for t in self.packed) / numel if numel else None

    @property
    def error_mean(self) -> float | None:
        errors = [t.rel_error for t in self.packed if t.rel_error is not None]
        return sum(errors) / len(errors) if errors else None

    @property
    def error_worst(self) -> TensorOutcome | None:
        candidates = [t for t in self.packed if t.rel_error is not None]
        return max(candidates, key=lambda t: t.rel_error) if candidates else None

    @property
    def throughput_mb_s(self) -> float:
        return self.bytes_in / 1e6 / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        worst = self.error_worst
        return {
            "source": str(self.source),
            "output": str(self.output),
            "files": self.files,
            "tensors_packed": len(self.packed),
            "tensors_passthrough": len(self.passthrough),
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "packed_bits_per_element": self.packed_bits_per_element,
            "packed_source_bits_per_element": self.packed_source_bits_per_element,
            "rel_error_mean": self.error_mean,
            "rel_error_worst": None if worst is None else {"tensor": worst.name, "rel_error": worst.rel_error},
            "seconds": round(self.seconds, 3),
            "copied_files": self.copied_files,
            "skipped_files": self.skipped_files,
            "tensors": [t.to_json() for t in self.tensors],
        }


def default_output(src: str | Path) -> Path:
    """``model.safetensors`` -> ``model.umq.safetensors``; ``model_dir`` -> ``model_dir.umq``."""
    src = Path(src)
    if src.is_dir():
        return src.with_name(src.name + ".umq")
    if src.suffix == ".safetensors":
        return src.with_name(src.stem + ".umq.safetensors")
    return src.with_name(src.name + ".umq")


def quantization_config(defaults: QuantParams, recipe: Recipe | None, packed: int) -> dict[str, Any]:
    """The ``config.json`` ``quantization_config`` entry of a packed model directory.

    Per-tensor parameters live in each shard's ``umq.tensors``; this records how the model
    was packed (defaults, whether a recipe was used) so loaders know to expect umq.
    """
    config: dict[str, Any] = {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION}
    config.update(defaults.to_json())
    config["recipe"] = recipe is not None
    config["quantized_tensors"] = packed
    return config


# --------------------------------------------------------------------------- crc32


def _gf2_times(matrix: tuple[int, ...], vector: int) -> int:
    """A 32 x 32 GF(2) matrix (one int per column) times a 32-bit vector."""
    total, i = 0, 0
    while vector:
        if vector & 1:
            total ^= matrix[i]
        vector >>= 1
        i += 1
    return total


def _gf2_compose(outer: tuple[int, ...], inner: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(_gf2_times(outer, column) for column in inner)


@functools.lru_cache(maxsize=None)
def _zeros_operator_pow2(power: int) -> tuple[int, ...]:
    """The operator that advances a CRC-32 register over ``2**power`` zero bytes."""
    if power == 0:
        # One zero bit: the reflected polynomial in column 0, a shift for the others.
        bit = (0xEDB88320,) + tuple(1 << n for n in range(31))
        two = _gf2_compose(bit, bit)
        four = _gf2_compose(two, two)
        return _gf2_compose(four, four)
    half = _zeros_operator_pow2(power - 1)
    return _gf2_compose(half, half)


@functools.lru_cache(maxsize=256)
def _zeros_operator(length: int) -> tuple[int, ...]:
    result = tuple(1 << n for n in range(32))  # identity
    power = 0
    while length:
        if length & 1:
            result = _gf2_compose(_zeros_operator_pow2(power), result)
        length >>= 1
        power += 1
    return result


def crc32_combine(crc1: int, crc2: int, length2: int) -> int:
    """zlib's ``crc32_combine``: the CRC-32 of ``A + B`` from ``crc32(A)``, ``crc32(B)``
    and ``len(B)``. Lets slab CRCs (which the codec computes anyway) chain into a
    tensor's CRC without a second pass over the bytes; the operator for each length is
    cached, so a combine costs a few microseconds."""
    if length2 <= 0:
        return crc1
    return _gf2_times(_zeros_operator(length2), crc1) ^ crc2


# --------------------------------------------------------------------------- slabs


@dataclass
class _TensorState:
    """Running state of one quantized tensor across its slabs."""

    plan: TensorPlan
    slabs: list[tuple[int, int]]
    hi: HiFormat | None  # forced hi (None = auto, resolved by the first slab)
    act_sq: torch.Tensor | None
    hessian: "PreparedHessian | None" = None  # the gptq method's, shared by every slab
    crc: dict[str, int] = field(default_factory=lambda: {"data": 0, "mask": 0, "scale": 0})
    err_sq: float = 0.0
    norm_sq: float = 0.0
    error_rows: int = 0
    first_spec: TensorSpec | None = None
    rows_done: int = 0
    finished: bool = False


def _slabs(rows: int, cols: int, slab_elements: int) -> list[tuple[int, int]]:
    per = max(1, slab_elements // max(cols, 1))
    return [(r, min(r + per, rows)) for r in range(0, rows, per)]


def _quantize_slab(checkpoint: Checkpoint, state: _TensorState, rows: tuple[int, int], hi: HiFormat | None,
                   with_error: bool) -> tuple[PackedTensor, float, float, int]:
    """Read rows ``r0:r1`` and quantize them; also the squared error, the squared norm and
    how many rows they were measured on (see :func:`_slab_error`)."""
    name = state.plan.name
    weight = checkpoint.get(name, rows=rows)
    params = state.plan.params if hi is None else state.plan.params.with_(hi=hi)
    if params.method is Method.RTN and params.scale_rule is ScaleRule.ABSMAX:
        with _fused.codec_call():
            packed = quantize(weight, params, act_sq=state.act_sq, name=name)
    else:  # torch only: rows are independent, so slab by slab equals the whole tensor
        packed = quantize_gptq(weight, params, state.hessian, act_sq=state.act_sq, name=name)
    if not with_error:
        return packed, 0.0, 0.0, 0
    return (packed, *_slab_error(weight, packed))


def _slab_error(weight: torch.Tensor, packed: PackedTensor) -> tuple[float, float, int]:
    """(sum (w - w_hat)^2, sum w^2, rows measured) over a slab ``weight`` ``[r, C]``.

    Slabs up to ``ERROR_EXACT_ELEMENTS`` are measured on every row; larger ones on one
    block of contiguous rows (about ``ERROR_EXACT_ELEMENTS`` elements) in the middle of
    the slab, so a tensor is sampled evenly, one block per slab. Decoding costs as much as
    quantizing; a million elements per slab pin a relative error far below the digits
    reported; and a contiguous block decodes without copies (a strided row sample costs
    more than decoding everything). Sums are float32 dot products (BLAS accumulates in
    blocks; within 1e-4 relative of float64).
    """
    rows, cols = weight.shape
    if rows * cols > ERROR_EXACT_ELEMENTS:
        count = max(1, -(-ERROR_EXACT_ELEMENTS // cols))
        a = (rows - count) // 2
        weight = weight[a:a + count]
        packed = PackedTensor(packed.data[a:a + count], packed.mask[a:a + count], packed.scale[a:a + count],
                              replace(packed.spec, shape=(count, cols)))
    w = weight.float().reshape(-1)
    with _fused.codec_call():
        decoded = dequantize(packed, torch.float32)
    diff = decoded.reshape(-1).sub_(w)
    return float(torch.dot(diff, diff)), float(torch.dot(w, w)), weight.shape[0]


# --------------------------------------------------------------------------- pack


def pack(
    src: str | Path,
    out: str | Path | None = None,
    *,
    params: QuantParams = QuantParams(),
    recipe: Recipe | None = None,
    include: Iterable[str] = (),
    exclude: Iterable[str] = (),
    act_sq: Mapping[str, torch.Tensor] | None = None,
    hessians: Mapping[str, torch.Tensor] | None = None,
    force: bool = False,
    progress: ProgressCallback | None = None,
    with_error: bool = True,
    slab_elements: int = SLAB_ELEMENTS,
    workers: int = 2,
) -> PackSummary:
    """Pack ``src`` (a .safetensors file or HF model directory) into ``out``.

    - ``params``: defaults for tensors the recipe does not name; ``recipe``: per-tensor
      parameters (:class:`~umqcli.recipe.Recipe`); ``include``/``exclude``: name patterns
      (see :mod:`umqcli.plan`).
    - ``act_sq``: tensor name -> float32 ``[C]`` E[x^2] per input channel, needed by the
      ``activation`` selection (``umq calibrate`` writes them).
    - ``hessians``: tensor name -> float32 ``[C, C]`` input Hessian ``E[x x^T]``, needed by
      the ``gptq`` method (``umq calibrate`` collects them on request); tensors reading
      the same input may map to the same tensor, which is then factored once.
    - ``with_error``: measure each tensor's relative weight error (decodes every slab).
    - ``slab_elements``: rows per slab are ``slab_elements // C`` (memory vs. overhead).
    - ``workers``: background threads reading + quantizing slabs ahead of the writer (0 =
      everything on the calling thread). Two pay on two cores: the fused quantize and the
      error measurement of one slab do not keep both cores busy on their own.

    Raises :class:`UMQError` for bad input; OS errors (disk full) and ``KeyboardInterrupt``
    propagate. In every failure case no output and no temporary file remain.
    """
    started = time.perf_counter()
    src = Path(src)
    out = Path(out) if out is not None else default_output(src)
    if not src.exists():
        raise UMQError("no such file or directory", rule="missing", file=src)
    check_output_path(src, out, force=force)
    with open_checkpoint(src) as checkpoint:
        plan = make_plan(checkpoint, params, include=include, exclude=exclude, recipe=recipe)
        stats = dict(act_sq or {})
        for item in plan.packed:
            if item.params.selection is Selection.ACTIVATION:
                channels = stats.get(item.name)
                if channels is None:
                    raise UMQError("selection 'activation' needs its activation statistics",
                                   rule="activation-stats", file=src, tensor=item.name,
                                   hint="give act_sq from umq calibrate")
                if tuple(channels.shape) != (item.shape[1],):
                    raise UMQError(
                        f"activation statistics have shape {tuple(channels.shape)}, expected ({item.shape[1]},)",
                        rule="activation-stats", tensor=item.name)
            if item.params.needs_hessian:
                hessian = (hessians or {}).get(item.name)
                if hessian is None:
                    raise UMQError("method 'gptq' needs the input Hessian in the statistics (umq calibrate)",
                                   rule="hessian", tensor=item.name)
                if tuple(hessian.shape) != (item.shape[1], item.shape[1]):
                    raise UMQError(f"the Hessian has shape {tuple(hessian.shape)}, expected "
                                   f"({item.shape[1]}, {item.shape[1]})", rule="hessian", tensor=item.name)
        job = _PackJob(checkpoint, plan, stats, progress, with_error, slab_elements, workers, hessians or {})
        with atomic_output(out, directory=checkpoint.is_dir, force=force) as tmp:
            if checkpoint.is_dir:
                results, files = job.run_dir(tmp)
                write_config(src, tmp, quantization_config(params, recipe, len(plan.packed)))
                skip = [checkpoint.relative_name(f) for f in checkpoint.files] + [INDEX_NAME, CONFIG_NAME]
                copied, skipped = copy_auxiliary_files(src, tmp, skip=skip)
            else:
                results, files = job.run_file(tmp), [out.name]
                copied, skipped = [], []
    return PackSummary(
        source=src, output=out, files=files, tensors=results, seconds=time.perf_counter() - started,
        copied_files=copied, skipped_files=skipped,
    )


class _PackJob:
    """One pack run: owns the worker pool, the progress counters and the results."""

    def __init__(self, checkpoint: Checkpoint, plan: Plan, act_sq: Mapping[str, torch.Tensor],
                 progress: ProgressCallback | None, with_error: bool, slab_elements: int, workers: int,
                 hessians: Mapping[str, torch.Tensor]) -> None:
        self.checkpoint = checkpoint
        self.hessians = hessians
        self._prepared: dict[int, PreparedHessian] = {}  # by id of the Hessian tensor
        self.plan = plan
        self.act_sq = act_sq
        self.progress = progress
        self.with_error = with_error
        self.slab_elements = slab_elements
        self.workers = workers
        self.tensors_done = 0
        self.bytes_done = 0
        self.tensors_total = len(plan.tensors)
        self.bytes_total = plan.bytes_in
        self.results: dict[str, TensorOutcome] = {}

    def _prepared_hessian(self, item: TensorPlan) -> PreparedHessian | None:
        """The factored Hessian of a gptq tensor (once per distinct Hessian), else None."""
        hessian = self.hessians.get(item.name)
        if not item.params.needs_hessian or hessian is None:
            return None
        if id(hessian) not in self._prepared:
            try:
                self._prepared[id(hessian)] = prepare_hessian(hessian)
            except UMQError as exc:
                raise exc.located(tensor=item.name)
        return self._prepared[id(hessian)]

    def _report(self, current: str) -> None:
        if self.progress is not None:
            self.progress(PackProgress(self.tensors_done, self.tensors_total, self.bytes_done, self.bytes_total, current))

    def run_file(self, tmp: Path) -> list[TensorOutcome]:
        self._write_file(tmp, self.plan.tensors)
        return [self.results[t.name] for t in self.plan.tensors]

    def run_dir(self, tmp: Path) -> tuple[list[TensorOutcome], list[str]]:
        weight_map: dict[str, str] = {}
        files: list[str] = []
        total_size = 0
        for file in self.checkpoint.files:
            rel = self.checkpoint.relative_name(file)
            items = [t for t in self.plan.tensors if t.entry.file == file]
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            names = self._write_file(target, items)
            weight_map.update({n: rel for n in names})
            total_size += sum(self.results[t.name].bytes_out for t in items)
            files.append(rel)
        if self.checkpoint.index is not None:
            write_index(tmp, weight_map, total_size, self.checkpoint.index)
        return [self.results[t.name] for t in self.plan.tensors], files

    def _write_file(self, path: Path, items: list[TensorPlan]) -> list[str]:
        """Write one output file holding ``items``; returns the stored names."""
        layout: list[tuple[str, Any, tuple[int, ...]]] = []
        placeholders: dict[str, TensorSpec] = {}
        for item in items:
            if item.quantize:
                spec = item.placeholder_spec()
                placeholders[item.name] = spec
                layout += packed_layout(item.name, spec.stored_shapes())
            else:
                layout.append((item.name, item.entry.dtype, item.entry.shape))
        source_meta = self.checkpoint.headers[items[0].entry.file].metadata if items else {}
        extra = {k: v for k, v in source_meta.items() if not k.startswith("umq.")}
        writer = SafetensorsWriter(path, layout, metadata_reserve=encode_metadata(placeholders, extra, widest=True))
        with writer:
            specs = self._fill(writer, items)
            writer.close(encode_metadata(specs, extra) if specs else extra)
        return [name for name, _, _ in layout]

    def _fill(self, writer: SafetensorsWriter, items: list[TensorPlan]) -> dict[str, TensorSpec]:
        """Write every tensor of ``items``; quantize slabs ahead on the worker pool."""
        states: dict[str, _TensorState] = {}
        units: list[tuple[str, tuple[int, int] | None]] = []
        for item in items:
            if item.quantize:
                rows, cols = item.shape
                state = _TensorState(item, _slabs(rows, cols, self.slab_elements), item.params.hi,
                                     self.act_sq.get(item.name), self._prepared_hessian(item))
                states[item.name] = state
                units += [(item.name, rows_) for rows_ in state.slabs]
            else:
                units.append((item.name, None))
        slab_units = [(name, rows) for name, rows in units if rows is not None]
        specs: dict[str, TensorSpec] = {}
        pool = ThreadPoolExecutor(max_workers=self.workers) if self.workers > 0 else None
        pending: deque[Future] = deque()
        next_submit = 0
        # Slabs in flight: one per worker plus one ready for the writer (memory bound).
        lookahead = self.workers + 1 if pool is not None else 1

        def submit_ahead() -> None:
            nonlocal next_submit
            while next_submit < len(slab_units) and len(pending) < lookahead:
                name, rows = slab_units[next_submit]
                state = states[name]
                args = (self.checkpoint, state, rows, state.hi, self.with_error)
                if pool is None:
                    done: Future = Future()
                    done.set_result(_quantize_slab(*args))
                    pending.append(done)
                else:
                    pending.append(pool.submit(_quantize_slab, *args))
                next_submit += 1

        by_name = {item.name: item for item in items}
        try:
            if pool is not None:
                submit_ahead()
            for name, rows in units:
                if rows is None:
                    self._copy(writer, by_name[name])
                    continue
                item = by_name[name]
                if pool is None:
                    submit_ahead()
                result = pending.popleft().result()
                if pool is not None:
                    submit_ahead()
                state = states[name]
                if state.finished:  # already rewritten whole by _redo_bfloat16
                    continue
                self._write_slab(writer, state, rows, *result)
                if state.rows_done == item.shape[0]:
                    specs[name] = self._finish(writer, state)
                    state.finished = True
        finally:
            if pool is not None:
                for future in pending:
                    future.cancel()
                pool.shutdown(wait=True, cancel_futures=True)
        return specs

    def _copy(self, writer: SafetensorsWriter, item: TensorPlan) -> None:
        self._report(item.name)
        offset = 0
        for chunk in self.checkpoint.iter_bytes(item.name):
            writer.write_part(item.name, offset, chunk)
            offset += len(chunk)
            self.bytes_done += len(chunk)
            self._report(item.name)
        self.tensors_done += 1
        self.results[item.name] = TensorOutcome(
            item.name, "passthrough", item.entry.dtype, item.shape, item.bytes_in, item.bytes_in, item.reason
        )
        self._report(item.name)

    def _write_slab(self, writer: SafetensorsWriter, state: _TensorState, rows: tuple[int, int],
                    packed: PackedTensor, err_sq: float, norm_sq: float, error_rows: int) -> None:
        if state.first_spec is None:
            state.first_spec = packed.spec
        elif packed.spec.hi is not state.first_spec.hi:
            # fp32 source, hi=auto: this slab needs bfloat16 where earlier ones got float16.
            # The rule is per tensor, so redo the whole tensor with bfloat16.
            self._redo_bfloat16(writer, state)
            return
        self._store(writer, state, rows, packed, err_sq, norm_sq, error_rows)

    def _store(self, writer: SafetensorsWriter, state: _TensorState, rows: tuple[int, int],
               packed: PackedTensor, err_sq: float, norm_sq: float, error_rows: int) -> None:
        name = state.plan.name
        r0, r1 = rows
        for suffix, tensor, key in ((DATA_SUFFIX, packed.data, "data"), (MASK_SUFFIX, packed.mask, "mask"),
                                    (SCALE_SUFFIX, packed.scale, "scale")):
            row_bytes = tensor.shape[1] * tensor.element_size()
            writer.write_part(name + suffix, r0 * row_bytes, tensor)
            nbytes = tensor.numel() * tensor.element_size()
            state.crc[key] = crc32_combine(state.crc[key], packed.spec.crc32[key], nbytes)
        state.err_sq += err_sq
        state.norm_sq += norm_sq
        state.error_rows += error_rows
        state.rows_done += r1 - r0
        self.bytes_done += (r1 - r0) * (state.plan.bytes_in // state.plan.shape[0])
        self._report(name)

    def _redo_bfloat16(self, writer: SafetensorsWriter, state: _TensorState) -> None:
        """Rewrite every slab of ``state`` with hi = bfloat16 (rare: fp32 sources whose hi
        values overflow float16 outside the first slab). Slabs already queued for this
        tensor are recomputed here; their queued results are skipped by ``rows_done``."""
        name = state.plan.name
        self.bytes_done -= state.rows_done * (state.plan.bytes_in // state.plan.shape[0])
        for suffix in (DATA_SUFFIX, MASK_SUFFIX, SCALE_SUFFIX):
            writer.rewind(name + suffix)
        state.crc = {"data": 0, "mask": 0, "scale": 0}
        state.err_sq = state.norm_sq = 0.0
        state.error_rows = 0
        state.rows_done = 0
        state.hi = HiFormat.BFLOAT16
        for rows in state.slabs:
            packed, err_sq, norm_sq, error_rows = _quantize_slab(self.checkpoint, state, rows, HiFormat.BFLOAT16,
                                                                 self.with_error)
            if rows == state.slabs[0]:
                state.first_spec = packed.spec
            self._store(writer, state, rows, packed, err_sq, norm_sq, error_rows)

    def _finish(self, writer: SafetensorsWriter, state: _TensorState) -> TensorSpec:
        item = state.plan
        assert state.first_spec is not None
        spec = replace(state.first_spec, shape=tuple(item.shape), crc32=dict(state.crc))
        rel_error = None
        if self.with_error:
            rel_error = 0.0 if state.norm_sq == 0 else math.sqrt(state.err_sq / state.norm_sq)
        self.tensors_done += 1
        self.results[item.name] = TensorOutcome(
            item.name, "packed", item.entry.dtype, item.shape, item.bytes_in, spec.stored_bytes, item.reason,
            spec=spec, rel_error=rel_error, predicted_rel_error=item.predicted_rel_error,
            error_rows=state.error_rows,
        )
        self._report(item.name)
        return spec

"""``umq verify``: is a packed checkpoint intact, and how far off are its matmuls?

Two phases, in this order:

1. **Integrity** (any failure is invalid input: :class:`UMQError`, CLI exit 2). Every
   selected quantized tensor is read and checked against every FORMAT §7 rule, crc32
   included (``Checkpoint.packed``). With a reference (the unquantized source), every
   quantized tensor must exist there with the same shape and dtype, every stored hi value
   must equal the source value rounded to the hi dtype, bit for bit, and every
   pass-through tensor must be byte-identical.
2. **Matmul error**, one tensor at a time. ``X`` is ``rows`` seeded Gaussian rows (seed
   and tensor name fix them), or real input rows of that layer from an activation stats
   file (``umq calibrate``). ``Y = X · Ŵᵀ`` comes from the chosen backend, straight from
   the packed bytes; ``Y_ref = X · Wᵀ`` is computed by torch in float32 from the
   reference weight, or from the torch codec's decode when no reference is given (then
   the report checks the backend against the codec). Metrics on ``Y - Y_ref`` (float64):
   relative Frobenius error, max abs error, SQNR in dB and cosine similarity. Next to
   them, the same relative error for plain FP8 E4M3 and INT8 per-output-channel
   quantization of the reference weight (:mod:`umqcli.baselines`), so the user sees what
   the extra hi bits bought.

A tensor passes when its relative error is at most ``max_rel_error``. Nothing here prints;
:func:`verify` returns a :class:`VerifyReport` that the CLI renders (table, JSON, JUnit).
"""

from __future__ import annotations

import math
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence
from xml.etree import ElementTree

import torch

from .backends import Backend, get_backend
from .baselines import fake_quant_fp8_channel, fake_quant_int8_channel
from .codec import PackedTensor, dequantize, encode_hi, unpack_mask
from .errors import UMQError
from .format import DATA_SUFFIX, MASK_SUFFIX, SCALE_SUFFIX, TensorSpec
from .io import Checkpoint, open_checkpoint
from .plan import Pattern

DEFAULT_ROWS = 256
DEFAULT_MAX_REL_ERROR = 0.05
DEFAULT_SEED = 0
_COMPARE_CHUNK = 8 * 1024 * 1024

#: Called as ``progress(label, done, total)``: before each tensor's integrity check (label
#: ``"integrity: NAME"``), before each tensor's matmul check (label ``NAME``), and once at
#: the end (label ``""``, done == total).
ProgressCallback = Callable[[str, int, int], None]


@dataclass(frozen=True)
class OutputError:
    """How far ``Y`` is from ``Y_ref`` (both ``[rows, R]``), computed in float64.

    - ``rel_error``: ``||Y - Y_ref||_F / ||Y_ref||_F`` (0 when both are 0, inf when only
      ``Y_ref`` is).
    - ``max_abs_error``: ``max |Y - Y_ref|``.
    - ``sqnr_db``: ``10 log10(||Y_ref||^2 / ||Y - Y_ref||^2)``; inf for an exact match.
    - ``cosine``: cosine similarity of the flattened outputs (1 when both are 0).
    """

    rel_error: float
    max_abs_error: float
    sqnr_db: float
    cosine: float

    @classmethod
    def between(cls, y: torch.Tensor, y_ref: torch.Tensor) -> "OutputError":
        """Metrics of ``y`` (float ``[rows, R]``) against ``y_ref`` (same shape)."""
        y32, ref32 = y.float().reshape(-1), y_ref.float().reshape(-1)
        # float32 subtraction of close values is exact (Sterbenz), so even the tiny
        # differences of a kernel against the codec survive; torch's pairwise float32
        # reductions give the norms to ~1e-6 relative, far below what is reported.
        diff = y32 - ref32
        ref_norm = float(torch.linalg.vector_norm(ref32))
        diff_norm = float(torch.linalg.vector_norm(diff))
        y_norm = float(torch.linalg.vector_norm(y32))
        if ref_norm == 0.0:
            rel = 0.0 if diff_norm == 0.0 else math.inf
        else:
            rel = diff_norm / ref_norm
        if diff_norm == 0.0:
            sqnr = math.inf
        else:
            sqnr = -math.inf if ref_norm == 0.0 else 20.0 * math.log10(ref_norm / diff_norm)
        if y_norm == 0.0 or ref_norm == 0.0:
            cosine = 1.0 if y_norm == ref_norm else 0.0
        else:
            # <y, ref> = (|y|^2 + |ref|^2 - |y - ref|^2) / 2: three norms, no extra pass.
            dot = (y_norm**2 + ref_norm**2 - diff_norm**2) / 2.0
            cosine = min(1.0, max(-1.0, dot / (y_norm * ref_norm)))
        max_abs = float(torch.linalg.vector_norm(diff, ord=math.inf)) if diff.numel() else 0.0
        return cls(rel_error=rel, max_abs_error=max_abs, sqnr_db=sqnr, cosine=cosine)

    def to_json(self) -> dict[str, float | None]:
        return {key: _finite_or_none(value) for key, value in self.__dict__.items()}


def _finite_or_none(value: float) -> float | None:
    """JSON has no inf/NaN: an exact match's SQNR (inf) is written as null."""
    return value if math.isfinite(value) else None


@dataclass(frozen=True)
class TensorVerdict:
    """The verdict on one quantized tensor.

    ``activations`` is ``"gaussian"`` or ``"stats"`` (real rows from the stats file);
    ``reference`` is ``"source"`` (the unquantized weight) or ``"decoded"`` (the codec's
    decode: the report then measures the backend, not the quantization). ``baselines``
    maps ``"fp8_e4m3-channel"`` and ``"int8-channel"`` to their output error, computed
    on the same ``X`` (only with a source reference). ``hi_checked`` counts the hi values
    compared bit for bit with the source (0 without a reference).
    """

    name: str
    spec: TensorSpec
    rows: int
    activations: str
    reference: str
    error: OutputError
    baselines: dict[str, OutputError]
    max_rel_error: float
    hi_checked: int
    seconds: float

    @property
    def passed(self) -> bool:
        return self.error.rel_error <= self.max_rel_error

    def to_json(self) -> dict[str, Any]:
        spec = self.spec
        return {
            "name": self.name,
            "shape": list(spec.shape),
            "dtype": spec.dtype,
            "k": spec.k,
            "lo": spec.lo.value,
            "hi": spec.hi.value,
            "block": spec.block,
            "bits_per_element": spec.bits_per_element,
            "rows": self.rows,
            "activations": self.activations,
            "reference": self.reference,
            **self.error.to_json(),
            "baselines": {
                name: {**err.to_json(), "bits_per_element": _baseline_bits(name, spec)}
                for name, err in self.baselines.items()
            },
            "hi_checked": self.hi_checked,
            "max_rel_error": self.max_rel_error,
            "passed": self.passed,
            "seconds": self.seconds,
        }


@dataclass(frozen=True)
class VerifyReport:
    """Everything ``umq verify`` found, in tensor order."""

    packed: Path
    reference: Path | None
    activations: Path | None
    backend: str
    rows: int
    seed: int
    max_rel_error: float
    tensors: list[TensorVerdict]
    passthrough_checked: int
    integrity: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return all(t.passed for t in self.tensors)

    @property
    def failures(self) -> list[TensorVerdict]:
        return [t for t in self.tensors if not t.passed]

    @property
    def measures_quantization(self) -> bool:
        """Whether the errors are quantization errors (against the unquantized reference);
        without one they only compare the backend with the codec's own decode."""
        return self.reference is not None

    @property
    def rows_used(self) -> list[int]:
        """The distinct input row counts the tensors were checked with (a stats file
        may hold fewer rows than ``rows``, the cap)."""
        return sorted({t.rows for t in self.tensors})

    def to_json(self) -> dict[str, Any]:
        return {
            "packed": str(self.packed),
            "reference": None if self.reference is None else str(self.reference),
            "activations": None if self.activations is None else str(self.activations),
            "backend": self.backend,
            "rows": self.rows,
            "rows_used": self.rows_used,
            "measures_quantization": self.measures_quantization,
            "seed": self.seed,
            "max_rel_error": self.max_rel_error,
            "integrity": self.integrity,
            "passthrough_checked": self.passthrough_checked,
            "passed": self.passed,
            "failures": [t.name for t in self.failures],
            "seconds": self.seconds,
            "tensors": [t.to_json() for t in self.tensors],
        }


BASELINE_NAMES = ("fp8_e4m3-channel", "int8-channel")
_BASELINE_FUNCTIONS = {
    "fp8_e4m3-channel": lambda w: fake_quant_fp8_channel(w, "e4m3"),
    "int8-channel": fake_quant_int8_channel,
}


def _baseline_bits(name: str, spec: TensorSpec) -> float:
    """Stored bits per element of a per-channel baseline: 8-bit codes + one float32
    scale per row."""
    return 8.0 + 32.0 / spec.columns


# --------------------------------------------------------------------------- inputs


def gaussian_rows(name: str, rows: int, columns: int, seed: int) -> torch.Tensor:
    """float32 ``[rows, columns]`` standard normal rows, fixed by ``seed`` and ``name``
    (each tensor has its own stream, independent of which other tensors are checked)."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    return torch.randn(rows, columns, generator=generator)


def select_names(specs: Iterable[str], patterns: Sequence[str]) -> list[str]:
    """The quantized tensor names matching any pattern (globs, or ``re:`` regexes as in
    ``umq pack``); all of them without patterns. No match at all is an error."""
    names = list(specs)
    if not patterns:
        return names
    compiled = [Pattern(p) for p in patterns]
    chosen = [n for n in names if any(p.matches(n) for p in compiled)]
    if not chosen:
        raise UMQError(
            f"no quantized tensor matches {', '.join(repr(p) for p in patterns)} "
            f"({len(names)} quantized tensors in the checkpoint)",
            rule="tensor-pattern",
        )
    return chosen


# --------------------------------------------------------------------------- integrity


def check_hi_values(packed: PackedTensor, source: torch.Tensor, *, name: str, file: Path) -> int:
    """Every stored hi value equals the source value rounded to the hi dtype, bit for
    bit (FORMAT §4). Returns how many hi values were compared.

    Compared through the float32 decode: hi -> float32 is exact and injective, so equal
    float32 bit patterns mean equal 16-bit patterns (and the decode is the codec's
    fastest path, while a separate de-interleave would cost a second gather).
    """
    spec = packed.spec
    mask = unpack_mask(packed.mask)
    decoded = dequantize(packed, torch.float32).view(torch.int32)
    expected = source.to(spec.hi.torch_dtype).to(torch.float32).view(torch.int32)
    wrong = mask & (decoded != expected)
    if bool(wrong.any()):
        r, c = wrong.nonzero()[0].tolist()
        stored = encode_hi(decoded.view(torch.float32)[r, c], spec.hi)
        rounded = encode_hi(source[r, c], spec.hi)
        raise UMQError(
            f"hi value at [{r}, {c}] is stored as 0x{int(stored) & 0xFFFF:04x} but the "
            f"reference value {source[r, c].item()!r} rounds to 0x{int(rounded) & 0xFFFF:04x} "
            f"in {spec.hi.value} ({int(wrong.sum())} hi values differ): this file was not packed from that reference",
            rule="reference-hi",
            file=file,
            tensor=name,
        )
    return int(mask.sum())


def check_reference_entry(reference: Checkpoint, name: str, spec: TensorSpec) -> None:
    """The reference holds ``name`` with the spec's shape and dtype."""
    if name not in reference:
        raise UMQError(
            "quantized in the packed checkpoint but missing from the reference",
            rule="reference-mismatch",
            file=reference.path,
            tensor=name,
        )
    dtype, shape = reference.info(name)
    if tuple(shape) != tuple(spec.shape) or dtype != spec.torch_dtype:
        raise UMQError(
            f"reference has {dtype} {list(shape)}, the packed tensor was {spec.dtype} {list(spec.shape)}",
            rule="reference-mismatch",
            file=reference.path,
            tensor=name,
        )


def check_passthrough(packed: Checkpoint, reference: Checkpoint) -> int:
    """Every pass-through tensor of ``packed`` is byte-identical to the reference's (same
    dtype and shape too). Returns how many were compared."""
    count = 0
    for name in packed.passthrough_names():
        if name not in reference:
            raise UMQError("passed through by the packer but missing from the reference",
                           rule="reference-mismatch", file=reference.path, tensor=name)
        if packed.info(name) != reference.info(name):
            (d1, s1), (d2, s2) = packed.info(name), reference.info(name)
            raise UMQError(f"passed through as {d1} {list(s1)}, reference has {d2} {list(s2)}",
                           rule="reference-mismatch", file=packed.path, tensor=name)
        for ours, theirs in zip(packed.iter_bytes(name, _COMPARE_CHUNK), reference.iter_bytes(name, _COMPARE_CHUNK)):
            if bytes(ours) != bytes(theirs):
                raise UMQError("pass-through bytes differ from the reference",
                               rule="reference-mismatch", file=packed.path, tensor=name)
        count += 1
    return count


# --------------------------------------------------------------------------- verify


def verify(
    packed_path: str | Path,
    *,
    reference: str | Path | None = None,
    activations: str | Path | None = None,
    backend: "str | Backend" = "auto",
    rows: int = DEFAULT_ROWS,
    max_rel_error: float = DEFAULT_MAX_REL_ERROR,
    tensors: Sequence[str] = (),
    seed: int = DEFAULT_SEED,
    progress: ProgressCallback | None = None,
) -> VerifyReport:
    """Verify a packed ``.safetensors`` file or HF directory (see the module docstring).

    - ``reference``: the unquantized checkpoint it was packed from (file or directory).
    - ``activations``: a stats file from ``umq calibrate``; its ``sample`` rows replace
      the Gaussian rows for the tensors it covers (up to ``rows`` of them).
    - ``backend``: ``"auto"``, ``"torch"`` or ``"cuda"`` (``"cuda"`` without a device is
      a :class:`UMQError`), or a backend object (e.g. the CUDA backend on the CPU shim).
    - ``tensors``: name patterns restricting the check (globs or ``re:`` regexes).

    Raises :class:`UMQError` for anything invalid (integrity, a mismatched reference, bad
    options); a tensor over ``max_rel_error`` is a result, not an exception.
    """
    started = time.perf_counter()
    if rows < 1:
        raise UMQError(f"rows must be at least 1, got {rows}", rule="rows")
    if not (max_rel_error >= 0.0 and math.isfinite(max_rel_error)):
        raise UMQError(f"max_rel_error must be a finite number >= 0, got {max_rel_error}", rule="tolerance")
    compute = get_backend(backend) if isinstance(backend, str) else backend
    stats = None
    if activations is not None:
        from .stats import load_stats

        stats = load_stats(activations)

    packed_path = Path(packed_path)
    with open_checkpoint(packed_path) as checkpoint:
        checkpoint.require_packed()
        names = select_names(checkpoint.specs, tensors)
        integrity = ["format", "crc32"]
        ref_ckpt = open_checkpoint(reference) if reference is not None else None
        try:
            if ref_ckpt is not None:
                integrity += ["reference-shapes", "reference-dtypes", "reference-hi", "passthrough-bytes"]
            # Phase 1: integrity of everything before any arithmetic.
            hi_checked, passthrough = _check_integrity(checkpoint, ref_ckpt, names, stats, activations, progress)
            # Phase 2: matmul error, one tensor in memory at a time.
            results = []
            for index, name in enumerate(names):
                if progress is not None:
                    progress(name, index, len(names))
                results.append(_verify_tensor(
                    checkpoint, ref_ckpt, stats, compute, name, rows, seed, max_rel_error, hi_checked.get(name, 0)
                ))
            if progress is not None:
                progress("", len(names), len(names))
        finally:
            if ref_ckpt is not None:
                ref_ckpt.close()
    return VerifyReport(
        packed=packed_path,
        reference=None if reference is None else Path(reference),
        activations=None if activations is None else Path(activations),
        backend=compute.name,
        rows=rows,
        seed=seed,
        max_rel_error=max_rel_error,
        tensors=results,
        passthrough_checked=passthrough,
        integrity=integrity,
        seconds=time.perf_counter() - started,
    )


def _check_integrity(checkpoint: Checkpoint, ref_ckpt: Checkpoint | None, names: Sequence[str], stats,
                     activations, progress: ProgressCallback | None) -> tuple[dict[str, int], int]:
    """Phase 1: every FORMAT rule and crc32 of ``names``, the stats' column counts, and
    with a reference its shapes, dtypes, hi values and pass-through bytes. Returns the hi
    values compared per tensor and the pass-through tensors compared."""
    if ref_ckpt is not None and ref_ckpt.specs:
        raise UMQError("the reference is itself a packed checkpoint; pass the unquantized source",
                       rule="reference-mismatch", file=ref_ckpt.path)
    hi_checked: dict[str, int] = {}
    for index, name in enumerate(names):
        if progress is not None:
            progress(f"integrity: {name}", index, len(names))
        packed = checkpoint.packed(name, check_crc=True)
        _check_sample(stats, name, packed.spec, activations)
        if ref_ckpt is not None:
            check_reference_entry(ref_ckpt, name, packed.spec)
            hi_checked[name] = check_hi_values(packed, ref_ckpt.get(name), name=name, file=checkpoint.spec_files[name])
        del packed
    passthrough = check_passthrough(checkpoint, ref_ckpt) if ref_ckpt is not None else 0
    return hi_checked, passthrough


def _check_sample(stats, name: str, spec: TensorSpec, file) -> None:
    """The stats file's input rows for ``name`` (if any) have the weight's column count."""
    item = None if stats is None else stats.get(name)
    if item is not None and item.sample.shape[0] > 0 and item.sample.shape[1] != spec.columns:
        raise UMQError(
            f"activation sample has {item.sample.shape[1]} channels, the weight has {spec.columns} columns",
            rule="stats", file=file, tensor=name,
        )


def _input_rows(name: str, spec: TensorSpec, stats, rows: int, seed: int) -> tuple[torch.Tensor, str]:
    """float32 ``[rows', C]`` input rows and where they come from (``stats``/``gaussian``)."""
    item = None if stats is None else stats.get(name)
    if item is not None and item.sample.shape[0] > 0:
        return item.sample[:rows].to(torch.float32), "stats"
    return gaussian_rows(name, rows, spec.columns, seed), "gaussian"


def _verify_tensor(checkpoint, ref_ckpt, stats, compute, name, rows, seed, max_rel_error, hi_checked) -> TensorVerdict:
    started = time.perf_counter()
    spec = checkpoint.specs[name]
    # Phase 1 validated these bytes (crc32 and every FORMAT rule); the re-read trusts them.
    packed = PackedTensor.from_stored(
        spec, *(checkpoint.get(name + suffix) for suffix in (DATA_SUFFIX, MASK_SUFFIX, SCALE_SUFFIX))
    )
    x, source = _input_rows(name, spec, stats, rows, seed)
    y = compute.matmul(x, packed).cpu()
    baselines: dict[str, OutputError] = {}
    if ref_ckpt is not None:
        weight32 = ref_ckpt.get(name).to(torch.float32)
        y_ref = x @ weight32.T
        for baseline in BASELINE_NAMES:
            y_base = x @ _BASELINE_FUNCTIONS[baseline](weight32).T
            baselines[baseline] = OutputError.between(y_base, y_ref)
        reference = "source"
    else:
        y_ref = x @ dequantize(packed, torch.float32).T
        reference = "decoded"
    return TensorVerdict(
        name=name,
        spec=spec,
        rows=int(x.shape[0]),
        activations=source,
        reference=reference,
        error=OutputError.between(y, y_ref),
        baselines=baselines,
        max_rel_error=max_rel_error,
        hi_checked=hi_checked,
        seconds=time.perf_counter() - started,
    )


# --------------------------------------------------------------------------- JUnit


def junit_xml(report: VerifyReport) -> str:
    """A JUnit XML document with one ``<testcase>`` per tensor (failure = over the
    tolerance), the form CI systems (GitHub Actions reporters, GitLab, Jenkins) ingest."""
    suite = ElementTree.Element(
        "testsuite",
        name="umq verify",
        tests=str(len(report.tensors)),
        failures=str(len(report.failures)),
        errors="0",
        skipped="0",
        time=f"{report.seconds:.3f}",
    )
    properties = ElementTree.SubElement(suite, "properties")
    for key, value in (
        ("packed", str(report.packed)),
        ("reference", "" if report.reference is None else str(report.reference)),
        ("backend", report.backend),
        ("rows", str(report.rows)),
        ("max_rel_error", repr(report.max_rel_error)),
        ("integrity", ",".join(report.integrity)),
    ):
        ElementTree.SubElement(properties, "property", name=key, value=value)
    classname = f"umq.verify.{report.packed.name}"
    for result in report.tensors:
        case = ElementTree.SubElement(
            suite, "testcase", classname=classname, name=result.name, time=f"{result.seconds:.3f}"
        )
        summary = _summary_line(result)
        if not result.passed:
            failure = ElementTree.SubElement(
                case,
                "failure",
                message=f"relative output error {result.error.rel_error:.4g} > {result.max_rel_error:g}",
                type="ToleranceExceeded",
            )
            failure.text = summary
        ElementTree.SubElement(case, "system-out").text = summary
    ElementTree.indent(suite)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ElementTree.tostring(suite, encoding="unicode") + "\n"


def junit_error_xml(packed: str | Path, error: UMQError) -> str:
    """A JUnit XML document for a run that stopped on invalid input (exit 2): one
    ``<testcase>`` (the tensor at fault, or ``integrity``) with an ``<error>`` of the rule,
    so CI shows why instead of a missing report."""
    suite = ElementTree.Element("testsuite", name="umq verify", tests="1", failures="0", errors="1",
                                skipped="0", time="0")
    case = ElementTree.SubElement(
        suite, "testcase", classname=f"umq.verify.{Path(packed).name}", name=error.tensor or "integrity", time="0"
    )
    ElementTree.SubElement(case, "error", message=str(error), type=error.rule).text = str(error)
    ElementTree.indent(suite)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ElementTree.tostring(suite, encoding="unicode") + "\n"


def _summary_line(result: TensorVerdict) -> str:
    e = result.error
    parts = [
        f"shape={list(result.spec.shape)} k={result.spec.k} lo={result.spec.lo.value} block={result.spec.block}",
        f"rel_error={e.rel_error:.6g} max_abs_error={e.max_abs_error:.6g} sqnr_db={e.sqnr_db:.3f} cosine={e.cosine:.8f}",
        f"rows={result.rows} activations={result.activations} reference={result.reference}",
    ]
    for name, err in result.baselines.items():
        parts.append(f"{name}: rel_error={err.rel_error:.6g} sqnr_db={err.sqnr_db:.3f}")
    return "\n".join(parts)

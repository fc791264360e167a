"""CI compile check: every kernel compiles with NVRTC (no GPU needed) for sm_80, sm_86,
sm_89 and sm_90 to a cubin, and to PTX; a compile error fails the suite."""

from __future__ import annotations

import re

import pytest

from umqcli import nvrtc
from umqcli.errors import UMQError
from umqcli.format import HI_KERNEL_CODES, LO_KERNEL_CODES, HiFormat, LoFormat


def test_nvrtc_matches_runtime_headers():
    nvrtc_version, header_version = nvrtc.toolkit_versions()
    assert nvrtc_version == header_version
    assert nvrtc_version[0] == 12


# umq_gemv.cu compiles slowly (3 entry points x 16 unrolled accumulators, ~7 s per
# architecture): the PTX here, the sm_90 cubin in test_gemv_fits_hopper_without_spills.
COMPILES = [
    (source, arch)
    for source in nvrtc.KERNEL_SOURCES
    for arch in nvrtc.CI_ARCHITECTURES + (nvrtc.PTX_ARCHITECTURE,)
    if source != "umq_gemv.cu" or arch == nvrtc.PTX_ARCHITECTURE
]


@pytest.mark.parametrize(("source", "arch"), COMPILES)
def test_kernel_compiles(source, arch):
    result = nvrtc.compile_kernel(source, arch)
    if arch.startswith("sm_"):
        assert result.binary[:4] == b"\x7fELF"  # a cubin is an ELF image
    else:
        ptx = result.binary.decode()
        assert f".target sm_{arch.split('_')[1]}" in ptx
        for kernel in {"umq_decode.cu": ("umq_decode_f32", "umq_decode_f16", "umq_decode_bf16"),
                       "umq_matmul.cu": ("umq_matmul_f32",),
                       "umq_gemv.cu": ("umq_gemv_f32", "umq_gemv_f16", "umq_gemv_bf16")}[source]:
            assert f".visible .entry {kernel}(" in ptx  # extern "C": unmangled names for RawModule
    # The kernels use nothing NVRTC warns about (sm_70 itself is flagged as deprecated by
    # CUDA 12.9; that note is about the target, not the code).
    warnings = [line for line in result.log.splitlines()
                if "warning" in line.lower() and "deprecated" not in line]
    assert not warnings, result.log


def test_compile_error_is_reported(tmp_path, monkeypatch):
    """A broken kernel must fail loudly with NVRTC's log, not compile to nothing."""
    (tmp_path / "umq_common.cuh").write_text("#pragma once\n")
    (tmp_path / "broken.cu").write_text('extern "C" __global__ void f(int* p) { p[0] = undefined_name; }\n')
    monkeypatch.setattr(nvrtc, "kernel_dir", lambda: tmp_path)
    with pytest.raises(UMQError) as info:
        nvrtc.compile_kernel("broken.cu", "sm_80")
    assert info.value.rule == "nvrtc"
    assert "undefined_name" in str(info.value)


def test_shim_selftest_kernels_are_plain_cuda():
    """The shim's own test kernels compile for a GPU too, so what they prove about the
    shim's barrier is about CUDA code, not about something only the shim accepts."""
    result = nvrtc.compile_kernel("shim_selftest.cu", "sm_80")
    assert result.binary[:4] == b"\x7fELF"


def test_compiling_leaves_python_constants_alone():
    """NVRTC writes its log and binaries into the buffers it is given; an immutable
    ``b" " * n`` buffer of size 1 is CPython's shared one-byte ``b" "``, so a clean compile
    (empty log) used to turn every later ``b" "`` in the process into ``b"\\x00"`` (which
    broke the safetensors writer's header padding in the same test run)."""
    result = nvrtc.compile_kernel("umq_matmul.cu", "sm_80")
    assert result.log == ""  # the case that used to corrupt: a one-byte (empty) log
    # bytes([n]) returns CPython's cached one-byte object for n: its content must be intact.
    assert bytes([32])[0] == 32 and bytes([0])[0] == 0
    assert (b"x" + b" " * 3) == bytes([120, 32, 32, 32])


def test_kernel_codes_match_umq_common_cuh():
    """The one Python table of lo/hi kernel codes (used by the CUDA launchers and the numba
    pass) has exactly the numbers ``#define UMQ_LO_*`` / ``UMQ_HI_*`` give the kernels."""
    text = (nvrtc.kernel_dir() / "umq_common.cuh").read_text()
    defines = {name: int(value) for name, value in re.findall(r"#define UMQ_((?:LO|HI)_\w+) (\d+)", text)}
    expected = {f"LO_{lo.name}": code for lo, code in LO_KERNEL_CODES.items()}
    expected |= {f"HI_{hi.name}": code for hi, code in HI_KERNEL_CODES.items()}
    assert defines == expected
    assert set(LO_KERNEL_CODES) == set(LoFormat) and set(HI_KERNEL_CODES) == set(HiFormat)


def test_gemv_fits_hopper_without_spills():
    """ptxas' report for sm_90 (H200): the GEMV kernels keep their 16 accumulators and
    the decoded group in registers (no local-memory spills, which would add a memory
    round trip to a kernel that is bound by memory) and fit the 48 KiB static shared
    memory limit with room for several blocks per SM."""
    log = nvrtc.compile_kernel("umq_gemv.cu", "sm_90", ("--ptxas-options=-v",)).log
    reports = re.findall(r"Function properties for (umq_gemv_\w+)\s+ptxas\s+\.\s+(\d+) bytes stack frame, "
                         r"(\d+) bytes spill stores, (\d+) bytes spill loads\s+ptxas info\s+: Used (\d+) registers"
                         r".*?(\d+) bytes smem", log)
    assert {r[0] for r in reports} == {"umq_gemv_f32", "umq_gemv_f16", "umq_gemv_bf16"}, log
    for name, stack, stores, loads, registers, smem in reports:
        assert (int(stack), int(stores), int(loads)) == (0, 0, 0), (name, log)
        assert int(registers) <= 128 and int(smem) <= 48 * 1024, (name, log)

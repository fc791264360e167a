"""Test support shipped with the package, never used at run time: the g++ host shim that
executes the CUDA kernels on the CPU (:mod:`umqcli.testing.host_shim`), shared by
``tests/``, ``benchmarks/kernels_shim.py`` and ``benchmarks/gpu_check.py --cpu-dry-run``."""

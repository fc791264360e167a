"""Timing helpers shared by the benchmark scripts (run as ``python benchmarks/x.py``, so
this directory is on ``sys.path``)."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def time_ms(fn: Callable[[], object], repeat: int, *, stat: str = "best") -> float:
    """Milliseconds per call of ``fn`` after one warm-up call (allocator, numba caches):
    the best of ``repeat`` runs (``stat="best"``: on a shared machine the least disturbed
    run, timeit's advice) or their median (``stat="median"``)."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * (min(times) if stat == "best" else statistics.median(times))

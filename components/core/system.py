"""What this process may use of the machine."""

from __future__ import annotations

import os
from pathlib import Path

CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "<quota> <period>" or "max <period>"


def usable_cpus(cpu_max: Path = CPU_MAX) -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup v2 CPU quota (a pod's CPU
    limit: a 4-CPU pod on a 64-core node gets 4). Training, batch inference and serving size their
    thread pools with it."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = cpu_max.read_text().split()
        if quota != "max":
            n = min(n, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return n


# torch's contiguous float unary ops that ATen hands to MKL's vector math library (aten/src/ATen/cpu/vml.h)
_VML_OPS = ("abs", "acos", "asin", "atan", "ceil", "cos", "cosh", "erf", "erfc", "erfinv", "exp", "expm1", "floor",
            "lgamma", "log", "log10", "log1p", "log2", "neg", "reciprocal", "round", "rsqrt", "sigmoid", "sin", "sinh",
            "sqrt", "tan", "tanh", "trunc")


def resolve_cpu_kernels() -> None:
    """Calls each MKL vector-math op once on one element, on this thread, before training starts.

    oneMKL 2024.2 (the build in the torch CPU wheels) picks each function's kernel on its first call; when
    that first call runs on several intra-op threads at once, one thread can run the low-accuracy kernel
    for its chunk (pytorch/pytorch#188792: ~1000 ulp, a fresh process under CPU oversubscription). For us
    that broke bit-exact resume: a resumed fine-tune differed from an uninterrupted one. A one-element call
    runs on the calling thread, so the dispatch is settled before any concurrent use; it costs microseconds."""
    import torch

    one = torch.full((1,), 0.5)
    for name in _VML_OPS:
        getattr(torch, name)(one)


def return_freed_memory() -> None:
    """Make memory a data step frees go back to the OS, so its RSS (what a pod's memory limit counts)
    follows what it holds. Two allocators keep freed memory by default: glibc raises its mmap threshold
    after each large free (later arrays up to 32 MB then come from a heap that fragments and is never
    returned), and Arrow's jemalloc pool keeps freed pages. Called by the steps that stream data
    (validate, tokenize); measured in benchmarks/scale.py."""
    import ctypes

    import pyarrow as pa

    pa.set_memory_pool(pa.system_memory_pool())
    libc = ctypes.CDLL(None)  # the C library this process runs on (found without ldconfig, as in slim images)
    if hasattr(libc, "mallopt"):  # glibc (musl has none: it has no such threshold)
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD, fixed at its default: no dynamic raise

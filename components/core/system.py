"""What this process may use of the machine."""

from __future__ import annotations

import functools
import os
from pathlib import Path

CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "<quota> <period>" or "max <period>"
CPUINFO = Path("/proc/cpuinfo")
# the CPU flags that decide which GEMM kernels ONNX Runtime's MLAS (and torch's oneDNN) dispatch to
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


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


def cpu_features(cpuinfo: Path = CPUINFO) -> dict:
    """{"model": the CPU's name, "flags": the ISA_FLAGS it has}, read at run time (Linux /proc/cpuinfo;
    elsewhere model "unknown", no flags: every path still runs, on the kernels ONNX Runtime finds)."""
    model, flags = _read_cpuinfo(cpuinfo)
    return {"model": model, "flags": list(flags)}


@functools.lru_cache(maxsize=4)
def _read_cpuinfo(cpuinfo: Path) -> tuple[str, tuple[str, ...]]:
    """Read once per process: the file is large on a many-core node and names every core alike."""
    model, flags = "unknown", set()
    try:
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    return model, tuple(f for f in ISA_FLAGS if f in flags)


def cpu_kernels(variant: str, flags: list[str]) -> str:
    """The GEMM kernel family ONNX Runtime's CPU provider dispatches to for `variant` on a CPU with
    `flags` (MLAS picks it at run time from the same flags): int8 uses AMX tiles, else VNNI dot
    products, else AVX2; float graphs use AVX-512 FMA, else AVX2 FMA. What the benchmark, the
    batch-inference record and the serving log name as the path that ran."""
    has = set(flags)
    if variant == "fp16":
        return "fp16 through fp32 casts"  # a GPU variant: on CPU ONNX Runtime inserts casts around fp32 kernels
    if variant == "int8":
        for name, needs in (("AMX int8", {"amx_tile", "amx_int8"}), ("AVX-512 VNNI", {"avx512_vnni"}), ("AVX-VNNI", {"avx_vnni"}),
                            ("AVX2", {"avx2"})):
            if needs <= has:
                return f"int8 {name}"
        return "int8 SSE4.1"
    for name, needs in (("AVX-512", {"avx512f"}), ("AVX2 FMA", {"avx2", "fma"})):
        if needs <= has:
            return f"fp32 {name}"
    return "fp32 SSE"


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

"""Parallel launch of compiled kernels.

A compiled kernel is a *worker* ``void worker(void *ctx)``: every thread that enters it claims work
items from an atomic counter inside ``ctx`` until none are left (work stealing), so the launcher
only has to start N threads on the same function. The launcher is ``GOMP_parallel`` from the
libgomp that PyTorch already loaded (its thread pool is shared with torch's, and one parallel
region costs a few microseconds); ctypes releases the GIL for the duration of the call.
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading
from pathlib import Path

from . import knobs

WORKER_TYPE = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


_threads_memo: dict[str | None, int] = {}


def default_num_threads() -> int:
    """Threads per launch: KT_JIT_NUM_THREADS, else the cores this process may run on."""
    raw = knobs.raw("KT_JIT_NUM_THREADS")
    n = _threads_memo.get(raw)
    if n is None:
        n = _threads_memo[raw] = _resolve_num_threads()
    return n


def _resolve_num_threads() -> int:
    override = knobs.num_threads_override()
    if override is not None:
        return override
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _find_libgomp() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    lib_dir = Path(torch.__file__).parent / "lib"
    for name in ("libgomp.so.1", "libgomp.so"):
        if (lib_dir / name).exists():
            return str(lib_dir / name)
    # torch wheels may ship libgomp under torch.libs/ with a hashed name
    libs = Path(torch.__file__).parent.parent / "torch.libs"
    found = sorted(libs.glob("libgomp*.so*")) if libs.is_dir() else []
    return str(found[0]) if found else None


# Stack the kernels need per thread: the worker frames keep their panels and accumulators on the
# stack, up to ~300 KB (the lane-partial form's accumulators, at most kernels/gemm.py LP_ACC_BYTES,
# and its staged dY pairs; the quantized AMX transposed GEMM's decoded blocks, at most
# AMX_PREDECODE_BYTES); with a margin for the callers' frames.
KERNEL_STACK_MIN = 1 << 20


def check_openmp_stack() -> None:
    """RuntimeError when OMP_STACKSIZE / GOMP_STACKSIZE would give libgomp's threads less stack than
    the kernels need (a stack overflow inside a kernel kills the process without a message)."""
    size = knobs.openmp_stack_bytes()
    if size is not None and size < KERNEL_STACK_MIN:
        raise RuntimeError(f"OpenMP threads get {size >> 10} KB of stack (OMP_STACKSIZE / GOMP_STACKSIZE), but "
                           f"kt_jit's kernels keep up to ~300 KB of buffers on each thread's stack: unset the "
                           f"variable or set it to at least {KERNEL_STACK_MIN >> 20}M")


@functools.lru_cache(maxsize=1)
def _gomp_parallel():
    check_openmp_stack()
    path = _find_libgomp()
    if path is None:
        return None
    try:
        lib = ctypes.CDLL(path)
        fn = lib.GOMP_parallel
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
    fn.restype = None
    return fn


def gomp_parallel_address() -> int | None:
    """Address of ``GOMP_parallel`` in torch's libgomp (for compiled code that launches kernels
    itself), or None when there is none."""
    fn = _gomp_parallel()
    return None if fn is None else ctypes.cast(fn, ctypes.c_void_p).value


def launcher_name() -> str:
    return "GOMP_parallel (torch's libgomp)" if _gomp_parallel() is not None else "Python threads"


def launch(worker_addr: int, ctx_addr: int, num_threads: int | None = None) -> None:
    """Run ``worker(ctx)`` on ``num_threads`` threads and wait for all of them.

    The worker must be a JIT-compiled work-stealing loop (see kt_jit.codegen.worker); the caller
    resets the item counter inside ``ctx`` before each launch.
    """
    n = default_num_threads() if num_threads is None else knobs.check_thread_count(num_threads)
    if n <= 1:
        WORKER_TYPE(worker_addr)(ctx_addr)
        return
    gomp = _gomp_parallel()
    if gomp is not None:
        gomp(worker_addr, ctx_addr, n, 0)
        return
    fn = WORKER_TYPE(worker_addr)
    threads = [threading.Thread(target=fn, args=(ctx_addr,)) for _ in range(n - 1)]
    for t in threads:
        t.start()
    fn(ctx_addr)
    for t in threads:
        t.join()

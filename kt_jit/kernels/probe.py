"""Machine probes measured with the same JIT and launcher as the real kernels.

- :func:`read_bandwidth`: bytes/s a parallel streaming read of a large buffer achieves (the
  memory-bound floor of a pass is bytes / this).
- :func:`write_bandwidth`: bytes/s of a parallel streaming-store write (the floor of what a pass
  writes, e.g. the LoRA gradients). The written bytes matter on some machines: on the Zen 4 VM
  these kernels were tuned on, zero lines were written 2-3x as fast as any other data (80-96
  against 26-50 GB/s, 2 threads), so a zero fill is no floor for writing real values.
- :func:`bf16_peak_flops`: FLOP/s of back-to-back bf16 dot products on all threads (AMX ``tdpbf16ps``
  where AMX is in use, AVX-512 ``vdpbf16ps`` otherwise): the compute-bound floor.
"""

from __future__ import annotations

import ctypes
import functools
import statistics
import time

import torch

from ..codegen import avx512 as vx
from ..codegen.amx import TileConfig
from ..codegen.ir import F32x16, I32x16
from ..codegen.worker import ArgBlock, compile_worker
from ..runtime.amx import active_isa
from ..runtime.buffers import aligned_empty
from ..runtime.threads import launch

CHUNK = 1 << 18  # bytes per work item of the read and write probes
READ_ARGS = ArgBlock(["src", "sink"])
WRITE_ARGS = ArgBlock(["dst", "pattern"])
PEAK_ARGS = ArgBlock(["iters", "sink"])


@functools.cache
def _read_kernel() -> int:
    def body(fn, ctx, item, tiles):
        base = fn.gep(READ_ARGS.load_ptr(fn, ctx, "src"), fn.mul(item, CHUNK))
        acc = fn.var(I32x16, "zeroinitializer", 64)
        with fn.loop(0, CHUNK, 64, name="b") as off:
            vx.prefetch(fn, fn.gep(base, fn.add(off, 2048)))  # 2 KiB ahead, as the GEMMs do
            v = fn.load(I32x16, fn.gep(base, off), 64)
            acc.set(fn.val(f"xor {I32x16} {acc.get()}, {v}"))
        sink = fn.gep(READ_ARGS.load_ptr(fn, ctx, "sink"), fn.mul(item, 64))
        fn.store(I32x16, acc.get(), sink, 64)

    return compile_worker("probe_read", "probe_read", READ_ARGS, body)


@functools.cache
def _write_kernel() -> int:
    def body(fn, ctx, item, tiles):
        base = fn.gep(WRITE_ARGS.load_ptr(fn, ctx, "dst"), fn.mul(item, CHUNK))
        line = vx.i64_splat_value(fn, WRITE_ARGS.load(fn, ctx, "pattern"))
        with fn.loop(0, CHUNK, 64, name="b") as off:
            vx.store_nontemporal(fn, "<8 x i64>", line, fn.gep(base, off), 64)
        vx.sfence(fn)

    return compile_worker("probe_write", "probe_write", WRITE_ARGS, body)


@functools.cache
def _peak_kernel(isa: str) -> int:
    name = f"probe_peak_{isa}"
    amx = isa in ("amx", "amx_emu")

    def body(fn, ctx, item, tiles):
        iters = PEAK_ARGS.load(fn, ctx, "iters")
        sink = fn.gep(PEAK_ARGS.load_ptr(fn, ctx, "sink"), fn.mul(item, 4096))
        if amx:
            for t in range(4, 8):
                tiles.zero(t)
            for t in range(4):
                tiles.load(t, sink, 64)
            with fn.loop(0, iters, name="it"):
                for c, a, b in ((4, 0, 2), (5, 0, 3), (6, 1, 2), (7, 1, 3)):
                    tiles.dp_bf16(c, a, b)
            tiles.store(4, sink, 64)
            return
        ones = vx.bitcast(fn, vx.i32x16_const([0x3F803F80] * 16), I32x16, "<32 x bfloat>")
        accs = [fn.var(F32x16, "zeroinitializer", 64) for _ in range(24)]
        with fn.loop(0, iters, name="it"):
            for acc in accs:
                acc.set(vx.dpbf16(fn, acc.get(), ones, ones))
        x = accs[0].get()
        for acc in accs[1:]:
            x = vx.fadd(fn, x, acc.get())
        fn.store(F32x16, x, sink, 64)

    tile_cfg = TileConfig.uniform() if amx else None
    return compile_worker(name, name, PEAK_ARGS, body, isa, tile_cfg, emulate_amx=isa == "amx_emu")


def median_seconds(fn, repeats: int) -> float:
    """Median wall time of ``repeats`` calls of ``fn()``, in seconds."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class _StreamProbe:
    """A parallel streaming pass over one buffer of ``nbytes`` rounded down to whole CHUNK-byte
    work items (one at least); the argument block is built once, so a call times only the launch."""

    def __init__(self, nbytes: int, kernel: int, num_threads: int | None) -> None:
        self.n_items = max(1, nbytes // CHUNK)
        self.nbytes = self.n_items * CHUNK
        self._addr, self._threads = kernel, num_threads
        self._args = None

    def _run(self) -> None:
        self._args.counter = 0
        launch(self._addr, ctypes.addressof(self._args), self._threads)

    def __call__(self) -> float:
        """Bytes per second of one pass."""
        t0 = time.perf_counter()
        self._run()
        return self.nbytes / (time.perf_counter() - t0)


class ReadProbe(_StreamProbe):
    """A parallel streaming read over one ``nbytes`` buffer (allocated and touched once); each call
    returns the bytes per second of one read: cheap enough to interleave with what it is the floor
    of (benchmarks on a VM whose bandwidth drifts)."""

    def __init__(self, nbytes: int = 1 << 30, num_threads: int | None = None) -> None:
        super().__init__(nbytes, _read_kernel(), num_threads)
        self._buf = aligned_empty((self.nbytes,), torch.uint8)
        self._buf.fill_(1)
        self._sink = aligned_empty((self.n_items * 16,), torch.int32)
        self._args = READ_ARGS.make(self.n_items, src=self._buf.data_ptr(), sink=self._sink.data_ptr())
        self._run()


class WriteProbe(_StreamProbe):
    """A parallel streaming-store write of the 64-bit ``pattern`` (as unsigned or signed: -2^63 to
    2^64 - 1) over ``buffer``, int64 [nbytes // 8] (allocated and touched once); each call returns
    the bytes per second of one write."""

    def __init__(self, nbytes: int = 1 << 30, pattern: int = 0x3F80_3F80_3F80_3F80,
                 num_threads: int | None = None) -> None:
        if not -(1 << 63) <= pattern < 1 << 64:
            raise ValueError(f"pattern must fit in 64 bits, got {pattern:#x}")
        super().__init__(nbytes, _write_kernel(), num_threads)
        self.buffer = aligned_empty((self.nbytes // 8,), torch.int64)
        self.buffer.fill_(1)
        word = pattern - (1 << 64) if pattern >= 1 << 63 else pattern  # (an int64 field)
        self._args = WRITE_ARGS.make(self.n_items, dst=self.buffer.data_ptr(), pattern=word)
        self._run()


def _median_rate(probe: _StreamProbe, repeats: int) -> float:
    return statistics.median(probe() for _ in range(repeats))


def write_bandwidth(nbytes: int = 1 << 30, repeats: int = 5, pattern: int = 0x3F80_3F80_3F80_3F80,
                    num_threads: int | None = None) -> float:
    """Bytes per second of a parallel streaming-store write of ``pattern`` (default: bf16 ones;
    0 measures the zero fill) over a fresh ``nbytes`` buffer (median of ``repeats`` writes)."""
    return _median_rate(WriteProbe(nbytes, pattern, num_threads), repeats)


def read_bandwidth(nbytes: int = 1 << 30, repeats: int = 5, num_threads: int | None = None) -> float:
    """Bytes per second of a parallel streaming read over a fresh ``nbytes`` buffer (median of
    ``repeats`` reads)."""
    return _median_rate(ReadProbe(nbytes, num_threads), repeats)


def bf16_peak_flops(isa: str | None = None, seconds: float = 0.2, num_threads: int | None = None) -> float:
    """Peak bf16 multiply-add FLOP/s on all threads (2 FLOPs per multiply-add)."""
    from ..runtime.threads import default_num_threads

    isa = isa or active_isa()
    threads = num_threads or default_num_threads()
    amx = isa in ("amx", "amx_emu")
    flops_per_iter = 4 * 16 * 16 * 32 * 2 if amx else 24 * 16 * 2 * 2
    sink = aligned_empty((threads * 1024,), torch.float32)
    sink.zero_()
    addr = _peak_kernel(isa)
    iters = 1000

    def run(n):
        PEAK_ARGS.run(addr, threads, threads, iters=n, sink=sink.data_ptr())

    while True:  # grow the loop until one run takes long enough to time
        t = median_seconds(lambda n=iters: run(n), 1)
        if t > seconds / 4 or iters > 1 << 30:
            break
        iters *= 4
    t = median_seconds(lambda n=iters: run(n), 3)
    return threads * iters * flops_per_iter / t

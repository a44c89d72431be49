"""The work-stealing worker every kernel is wrapped in, and its argument block ABI.

A kernel's entry point is ``void <name>(ptr %ctx)``. ``ctx`` is an array of 8-byte fields: field 0
is the item counter (atomically incremented by every thread), field 1 the number of items, then
the kernel's own fields. The same field list builds the ctypes Structure on the Python side and
the field offsets on the IR side, so the two cannot drift apart.
"""

from __future__ import annotations

import ctypes
import functools
import struct
import threading
from collections.abc import Callable, Sequence

import numpy as np

from ..runtime import knobs
from ..runtime import threads as _threads
from ..runtime.threads import default_num_threads, gomp_parallel_address, launch
from .amx import TileConfig, Tiles
from .cache import get_or_compile
from .compile import target_for
from .ir import Function, Module
from .plan import Capture, emit_launch_loop


class ArgBlock:
    """Named 8-byte fields (pointers or int64) after the counter and item count. Which fields are
    pointers is learnt from the kernels built on the block (:meth:`load_ptr`), or declared
    (``pointers``) for blocks whose kernels may be loaded from the disk cache without building
    their IR (see codegen/cache.py, ``get_or_compile`` with an IR builder); launch plans
    (codegen/plan.py) rely on it to tell addresses from numbers."""

    HEADER = ("counter", "n_items")

    def __init__(self, fields: Sequence[str], pointers: Sequence[str] | None = None) -> None:
        self.fields = tuple(self.HEADER) + tuple(fields)
        self.declared = pointers is not None
        # indices of the fields some kernel loads as a pointer
        self.pointers: frozenset[int] = frozenset(self.fields.index(f) for f in pointers or ())
        self.struct = type("KernelArgs", (ctypes.Structure,),
                           {"_fields_": [(f, ctypes.c_int64) for f in self.fields], "_arg_block": self})

    def offset(self, name: str) -> int:
        return 8 * self.fields.index(name)

    def load(self, fn: Function, ctx: str, name: str) -> str:
        return fn.load("i64", fn.gep(ctx, self.offset(name)), 8)

    def load_ptr(self, fn: Function, ctx: str, name: str) -> str:
        index = self.fields.index(name)
        if self.declared and index not in self.pointers:
            raise AssertionError(f"argument field {name!r} is loaded as a pointer but not declared as one")
        with _pointers_lock:  # (two threads may build kernels on one block)
            self.pointers |= {index}
        return fn.load("ptr", fn.gep(ctx, self.offset(name)), 8)

    def make(self, n_items: int, **values: int) -> ctypes.Structure:
        missing = set(self.fields[2:]) - set(values)
        if missing:
            raise TypeError(f"missing kernel arguments: {sorted(missing)}")
        return self.struct(counter=0, n_items=n_items, **values)

    def run(self, addr: int, n_items: int, num_threads: int | None = None, keep: tuple = (), **values: int) -> None:
        """Launch the compiled worker at ``addr`` over ``n_items`` work items (nothing when 0); inside
        a :class:`LaunchBatch` the launch is deferred, and ``keep`` (objects owning memory the
        arguments point into) is held until it ran."""
        if n_items:
            dispatch(addr, self.make(n_items, **values), num_threads, keep)


def f32_field(value: float) -> int:
    """An argument-block field holding a float: its fp32 bits (what ``avx512.splat_arg_f32`` reads)."""
    return struct.unpack("<I", struct.pack("<f", value))[0]


_batch = threading.local()
_pointers_lock = threading.Lock()


class LaunchBatch:
    """Defers this thread's kernel launches (made through :func:`dispatch`) and runs them in order,
    back to back, from one call into compiled code when the block exits (or at :meth:`flush`).

    A pass of the MoE layer is a chain of launches whose arguments are all known before the first
    one runs; between immediate launches the host work (Python, NumPy, ctypes) runs from caches
    that the previous kernel's weight stream has just flushed, which at decode sizes costs as much
    as the kernels. Code inside the block must not read what a deferred launch writes before
    calling :meth:`flush`. On an exception the pending launches are dropped.

    Only launches whose operands the caller keeps alive until the block ends may be deferred: the
    group-table kernels keep their tables (``keep=``), raw-address launches (row gather/combine,
    activation, row quantization) rely on their caller; functions that return what they compute
    (``kernels.gemm.linear``/``linear_t``, ``kernels.rowquant.quantize_rows``) run at once inside
    :func:`immediate_launches`. ``KT_JIT_DEFER_LAUNCHES=0`` turns deferral off."""

    def __init__(self, capture: Capture | None = None) -> None:
        self._pending: list[tuple[int, ctypes.Structure, tuple]] = []
        self._active = False
        self.capture = capture  # also records each launch (and the group tables built) into it

    def __enter__(self) -> LaunchBatch:
        if getattr(_batch, "current", None) is not None:
            raise RuntimeError("launch batches do not nest")
        if self.capture is not None:
            self.capture.__enter__()
            if not knobs.defer_launches():
                self.capture.fail("launches are not deferred (KT_JIT_DEFER_LAUNCHES=0)")
        if knobs.defer_launches():
            _batch.current, self._active = self, True
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.capture is not None:
            self.capture.__exit__(exc_type, exc, tb)
        if self._active:
            _batch.current, self._active = None, False
            if exc_type is None:
                self.flush()
        self._pending.clear()

    def add(self, addr: int, args: ctypes.Structure, keep: tuple) -> None:
        if self.capture is not None:
            block = getattr(type(args), "_arg_block", None)
            if block is None:
                self.capture.fail("a launch whose argument block is not an ArgBlock's")
            else:
                self.capture.launch(addr, args, block.pointers)
        self._pending.append((addr, args, keep))

    def flush(self) -> None:
        """Run the launches deferred so far (in order) and wait for them."""
        pending, self._pending = self._pending, []
        if pending:
            _run_launches([(addr, ctypes.addressof(args)) for addr, args, _ in pending])
        del pending  # (their arguments and kept objects lived until here)


class immediate_launches:  # noqa: N801 (a context manager used like a function)
    """Within this block launches run at once (after this thread's deferred ones): for code that
    reads what it launches, or whose operands do not outlive the call."""

    def __enter__(self) -> None:
        self._saved = getattr(_batch, "current", None)
        if self._saved is not None:
            _interrupts(self._saved, "launches ran immediately inside the pass")
            self._saved.flush()
            _batch.current = None

    def __exit__(self, exc_type, exc, tb) -> None:
        _batch.current = self._saved


def flush_launches() -> None:
    """Run this thread's deferred launches now (no-op outside a :class:`LaunchBatch`)."""
    batch = getattr(_batch, "current", None)
    if batch is not None:
        _interrupts(batch, "the pass waited for its launches midway")
        batch.flush()


def _interrupts(batch: LaunchBatch, why: str) -> None:
    """A pass broke its batch's sequence of deferred launches: a capture of it cannot be replayed."""
    if batch.capture is not None:
        batch.capture.fail(why)


def dispatch(addr: int, args: ctypes.Structure, num_threads: int | None = None, keep: tuple = ()) -> None:
    """Launch the worker at ``addr`` with the argument block ``args`` now, or defer it to the
    thread's :class:`LaunchBatch` (launches with an explicit thread count run now, after the
    deferred ones)."""
    batch = getattr(_batch, "current", None)
    if batch is None:
        launch(addr, ctypes.addressof(args), num_threads)
    elif num_threads is not None:
        _interrupts(batch, "a launch with its own thread count")
        batch.flush()
        launch(addr, ctypes.addressof(args), num_threads)
    else:
        batch.add(addr, args, keep)


_RUN_LAUNCHES = "kt_run_launches"


@functools.cache
def _launch_driver() -> Callable[[int, int, int, int], None]:
    """``run(gomp, table, n, threads)``: for each (worker, ctx) pair of ``table``, GOMP_parallel(worker,
    ctx, threads) (or worker(ctx) when ``threads`` <= 1 or there is no libgomp), in order."""
    target = target_for("avx512")
    mod = Module(_RUN_LAUNCHES, target.fn_attrs)
    fn = mod.function(_RUN_LAUNCHES, [("ptr", "%gomp"), ("ptr", "%table"), ("i64", "%n"), ("i64", "%threads")])
    emit_launch_loop(fn, "%gomp", "%table", "%n", "%threads")
    fn.ret()
    addr = get_or_compile(_RUN_LAUNCHES, "run_launches v1", mod.render(), target, [_RUN_LAUNCHES])[_RUN_LAUNCHES]
    return ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64)(addr)


def _run_launches(steps: list[tuple[int, int]]) -> None:
    threads = default_num_threads()
    gomp = gomp_parallel_address()
    if gomp is None and threads > 1:  # no libgomp: the Python-thread launcher, one by one
        for addr, ctx in steps:
            _threads.launch(addr, ctx, threads)
        return
    table = (ctypes.c_int64 * (2 * len(steps)))(*(v for step in steps for v in step))
    _launch_driver()(gomp or 0, ctypes.addressof(table), len(steps), threads)


def group_table(groups, fields: int) -> tuple[int, int]:
    """(rows, address) of a group-descriptor table: an int64 torch tensor or NumPy array of shape
    [G, fields] (C-contiguous), or a flat ctypes int64 array. The caller keeps it alive."""
    if isinstance(groups, np.ndarray):
        if groups.dtype != np.int64 or not groups.flags.c_contiguous or groups.shape[1:] != (fields,):
            raise ValueError(f"group table must be a C-contiguous int64 array [G, {fields}]")
        return groups.shape[0], groups.ctypes.data
    if isinstance(groups, ctypes.Array):
        if len(groups) % fields:
            raise ValueError(f"group table of {len(groups)} int64 fields is not a whole number of "
                             f"{fields}-field groups (this kernel's descriptor)")
        return len(groups) // fields, ctypes.addressof(groups)
    if groups.dtype.is_floating_point or groups.element_size() != 8 or not groups.is_contiguous() \
            or tuple(groups.shape[1:]) != (fields,):
        raise ValueError(f"group table must be a contiguous int64 tensor [G, {fields}]")
    return groups.shape[0], groups.data_ptr()


def listed_row(fn: Function, idx: str, j: str) -> str:
    """Row ``idx[j]`` of an optional int64 row list, or ``j`` itself when ``idx`` is null (kernels
    that may skip the padding rows of the per-expert buffers)."""
    row = fn.var("i64", j)
    with fn.if_then(fn.icmp("ne", fn.val(f"ptrtoint ptr {idx} to i64"), 0), name="listed"):
        row.set(fn.load("i64", fn.gep(idx, fn.mul(j, 8)), 8))
    return row.get()


def compile_worker(name: str, key: str, args: ArgBlock, body: Callable[[Function, str, str, Tiles | None], None],
                   isa: str = "avx512", tile_config: TileConfig | None = None, emulate_amx: bool = False) -> int:
    """Build the worker ``name`` (:func:`build_worker`) for ``isa``, compile it or load it from the
    disk cache (``key`` identifies what it was built from), and return its address."""
    mod = worker_module(name, args, body, isa, tile_config, emulate_amx)
    return get_or_compile(name, key, mod.render(), target_for(isa), [name])[name]


def worker_module(name: str, args: ArgBlock, body: Callable[[Function, str, str, Tiles | None], None],
                  isa: str = "avx512", tile_config: TileConfig | None = None, emulate_amx: bool = False) -> Module:
    """A module holding just the worker ``name`` (:func:`build_worker`) for ``isa``."""
    mod = Module(name, target_for(isa).fn_attrs)
    build_worker(mod, name, args, body, tile_config, emulate_amx)
    return mod


def build_worker(module: Module, name: str, args: ArgBlock,
                 body: Callable[..., None],
                 tile_config: TileConfig | None = None, emulate_amx: bool = False,
                 lookahead: bool = False) -> Function:
    """``void name(ptr ctx)``: claim items from the counter and run ``body(fn, ctx, item, tiles)``.

    With a tile config the worker loads it once on entry (tiles are per thread and do not survive
    across calls into other code) and releases the tiles on exit. With ``lookahead`` the body gets
    a fifth argument, ``claim_next()``: it emits code that claims the item this thread runs next
    (at most once per item; the claim then stands in for the one at the loop's head) and returns
    its index (``>= n_items`` when there is none), so the body can prefetch what that item reads
    first. Claiming late in an item keeps the others' share of the items: a claim at the item's
    start would hold an item back for the whole of the current one.
    """
    fn = module.function(name, [("ptr", "%ctx")])
    tiles = None
    if tile_config is not None:
        tiles = Tiles(fn, emulate_amx)
        tiles.configure(tile_config)
    n_items = args.load(fn, "%ctx", "n_items")
    head, body_bb, done = fn.new_block("claim"), fn.new_block("work"), fn.new_block("finish")

    def claim() -> str:
        return fn.val("atomicrmw add ptr %ctx, i64 1 monotonic")

    pending = fn.var("i64", "-1") if lookahead else None  # an item claimed ahead, or -1

    def claim_once(var) -> str:
        """``var`` if it holds a claim, else a fresh claim stored in it."""
        with fn.if_then(fn.icmp("slt", var.get(), 0), name="claim"):
            var.set(claim())
        return var.get()

    fn.br(head)
    fn.set_block(head)
    if pending is None:
        item = claim()
    else:
        item = claim_once(fn.var("i64", pending.get()))
        pending.set("-1")
    fn.cbr(fn.icmp("slt", item, n_items), body_bb, done)
    fn.set_block(body_bb)
    if pending is None:
        body(fn, "%ctx", item, tiles)
    else:
        body(fn, "%ctx", item, tiles, lambda: claim_once(pending))
    fn.br(head)
    fn.set_block(done)
    if tiles is not None:
        tiles.release()
    fn.ret()
    return fn

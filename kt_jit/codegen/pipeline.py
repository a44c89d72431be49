"""Pipelined launches: a native launcher thread runs a pass's kernels while Python prepares the rest.

At decode sizes the host side of an MoE pass (Python, NumPy, ctypes between launches) is a third
of it, and a :class:`~kt_jit.codegen.worker.LaunchBatch` that runs every launch after all are
prepared leaves the cores idle meanwhile. In pipelined mode each launch is *published* as soon as
it is prepared; a launcher thread (started once per process, blocked in native code: it never
needs the GIL) runs published launches in order with a team of ``threads - 1`` (on 2 threads: by
itself), and when the Python thread has prepared everything it *joins*: it claims the remaining
work items of each launch through the same atomic item counter the other threads use. Launches
stay ordered: nobody starts launch i+1 before every item of launch i is done (the workers count
finished items in the argument block's ``done`` field).

Process-wide state (int64 fields, shared by the compiled functions and Python):
``published`` (launches written to the ring), ``completed`` (launches the launcher has seen
finish), ``quit``, ``futex`` (0 while the launcher may sleep), the ring's address and capacity,
the launch thread count, GOMP_parallel's and libc ``syscall``'s addresses. Only one Python thread
pipelines at a time (:func:`acquire`); the others batch as before.
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading

from ..runtime.threads import gomp_parallel_address
from .cache import get_or_compile
from .compile import target_for
from .ir import Function, Module

RING = 64  # launches in flight at most (a pass has ~15)
SPINS = 20000  # pause loops (~0.1-1 ms) before the launcher sleeps on its futex
FIELDS = ("published", "completed", "quit", "futex", "ring", "threads", "gomp", "syscall")
_OFF = {f: 8 * i for i, f in enumerate(FIELDS)}
CTX_N_ITEMS, CTX_DONE = 8, 16  # argument block fields (codegen/worker.ArgBlock.HEADER)
SYS_FUTEX, FUTEX_WAIT_PRIVATE, FUTEX_WAKE_PRIVATE = 202, 128, 129


def _field(fn: Function, st: str, name: str) -> str:
    return fn.gep(st, _OFF[name])


def _pause(fn: Function) -> None:
    fn.emit(f"call void {fn.module.declare('llvm.x86.sse2.pause', 'declare void @llvm.x86.sse2.pause()')}()")


def _futex(fn: Function, st: str, op: int, val: int) -> None:
    sc = fn.load("ptr", _field(fn, st, "syscall"), 8)
    fn.emit(f"call i64 (i64, ...) {sc}(i64 {SYS_FUTEX}, ptr {_field(fn, st, 'futex')}, i64 {op}, i64 {val}, "
            f"ptr null)")


def _wait_done(fn: Function, ctx: str) -> None:
    """Spin until every work item of the launch at ``ctx`` has finished."""
    n = fn.load("i64", fn.gep(ctx, CTX_N_ITEMS), 8)
    head, body, out = fn.new_block("wd"), fn.new_block("wdp"), fn.new_block("wdx")
    fn.br(head)
    fn.set_block(head)
    done = fn.val(f"load atomic i64, ptr {fn.gep(ctx, CTX_DONE)} acquire, align 8")
    fn.cbr(fn.icmp("sge", done, n), out, body)
    fn.set_block(body)
    _pause(fn)
    fn.br(head)
    fn.set_block(out)


def _slot(fn: Function, st: str, i: str) -> tuple[str, str]:
    """(worker, ctx) of launch ``i`` in the ring."""
    entry = fn.gep(fn.load("ptr", _field(fn, st, "ring"), 8), fn.mul(fn.val(f"urem i64 {i}, {RING}"), 16))
    return fn.load("ptr", entry, 8), fn.load("ptr", fn.gep(entry, 8), 8)


def _build_launcher(fn: Function) -> None:
    """``void kt_pipe_launcher(ptr st)``: run published launches in order until ``quit``."""
    st = "%st"
    spins = fn.var("i64", "0")
    top, spin, idle, sleep, run = (fn.new_block(n) for n in ("top", "spin", "idle", "sleep", "run"))
    fn.br(top)
    fn.set_block(top)
    spins.set("0")
    fn.br(spin)
    fn.set_block(spin)
    i = fn.val(f"load atomic i64, ptr {_field(fn, st, 'completed')} acquire, align 8")
    p = fn.val(f"load atomic i64, ptr {_field(fn, st, 'published')} acquire, align 8")
    fn.cbr(fn.icmp("sgt", p, i), run, idle)
    fn.set_block(idle)
    quit_ = fn.val(f"load atomic i64, ptr {_field(fn, st, 'quit')} acquire, align 8")
    stop, more = fn.new_block("stop"), fn.new_block("more")
    fn.cbr(fn.icmp("ne", quit_, 0), stop, more)
    fn.set_block(stop)
    fn.ret()
    fn.set_block(more)
    n = fn.add(spins.get(), 1)
    spins.set(n)
    again = fn.new_block("again")
    fn.cbr(fn.icmp("slt", n, SPINS), again, sleep)
    fn.set_block(again)
    _pause(fn)
    fn.br(spin)
    fn.set_block(sleep)
    # announce the sleep, then look once more: a publisher stores `published` before it reads
    # `futex` (both sequentially consistent), so either we see its launch or it wakes us
    fn.emit(f"store atomic i32 0, ptr {_field(fn, st, 'futex')} seq_cst, align 8")
    p2 = fn.val(f"load atomic i64, ptr {_field(fn, st, 'published')} seq_cst, align 8")
    q2 = fn.val(f"load atomic i64, ptr {_field(fn, st, 'quit')} seq_cst, align 8")
    nap, wake = fn.new_block("nap"), fn.new_block("woke")
    fn.cbr(fn.val(f"or i1 {fn.icmp('sgt', p2, i)}, {fn.icmp('ne', q2, 0)}"), top, nap)
    fn.set_block(nap)
    _futex(fn, st, FUTEX_WAIT_PRIVATE, 0)
    fn.br(wake)
    fn.set_block(wake)
    fn.br(top)
    fn.set_block(run)
    worker, ctx = _slot(fn, st, i)
    threads = fn.load("i64", _field(fn, st, "threads"), 8)
    team, solo, ran = fn.new_block("team"), fn.new_block("solo"), fn.new_block("ran")
    fn.cbr(fn.icmp("sgt", threads, 2), team, solo)
    fn.set_block(team)
    gomp = fn.load("ptr", _field(fn, st, "gomp"), 8)
    fn.emit(f"call void {gomp}(ptr {worker}, ptr {ctx}, i32 {fn.val(f'trunc i64 {fn.sub(threads, 1)} to i32')}, "
            f"i32 0)")
    fn.br(ran)
    fn.set_block(solo)
    fn.emit(f"call void {worker}(ptr {ctx})")
    fn.br(ran)
    fn.set_block(ran)
    _wait_done(fn, ctx)  # (the joining thread may still run an item)
    fn.emit(f"store atomic i64 {fn.add(i, 1)}, ptr {_field(fn, st, 'completed')} release, align 8")
    fn.br(top)


def _build_publish(fn: Function) -> None:
    """``void kt_pipe_publish(ptr st, ptr worker, ptr ctx)``: append a launch and wake the launcher."""
    st = "%st"
    p = fn.load("i64", _field(fn, st, "published"), 8)  # (only the publishing thread writes it)
    entry = fn.gep(fn.load("ptr", _field(fn, st, "ring"), 8), fn.mul(fn.val(f"urem i64 {p}, {RING}"), 16))
    fn.store("ptr", "%worker", entry, 8)
    fn.store("ptr", "%ctx", fn.gep(entry, 8), 8)
    fn.emit(f"store atomic i64 {fn.add(p, 1)}, ptr {_field(fn, st, 'published')} seq_cst, align 8")
    f = fn.val(f"load atomic i32, ptr {_field(fn, st, 'futex')} seq_cst, align 8")
    with fn.if_then(fn.val(f"icmp eq i32 {f}, 0"), name="wake"):
        fn.emit(f"store atomic i32 1, ptr {_field(fn, st, 'futex')} seq_cst, align 8")
        _futex(fn, st, FUTEX_WAKE_PRIVATE, 1)
    fn.ret()


def _build_join(fn: Function) -> None:
    """``void kt_pipe_join(ptr st)``: help run every published launch, in order, until all are done."""
    st = "%st"
    upto = fn.load("i64", _field(fn, st, "published"), 8)
    start = fn.val(f"load atomic i64, ptr {_field(fn, st, 'completed')} acquire, align 8")
    with fn.loop(start, upto, name="j") as j:
        worker, ctx = _slot(fn, st, j)
        fn.emit(f"call void {worker}(ptr {ctx})")
        _wait_done(fn, ctx)
    head, body, out = fn.new_block("jc"), fn.new_block("jcp"), fn.new_block("jcx")
    fn.br(head)
    fn.set_block(head)
    c = fn.val(f"load atomic i64, ptr {_field(fn, st, 'completed')} acquire, align 8")
    fn.cbr(fn.icmp("sge", c, upto), out, body)
    fn.set_block(body)
    _pause(fn)
    fn.br(head)
    fn.set_block(out)
    fn.ret()


NAMES = ("kt_pipe_launcher", "kt_pipe_publish", "kt_pipe_join")


@functools.cache
def _functions() -> dict[str, int]:
    target = target_for("avx512")
    mod = Module("kt_pipe", target.fn_attrs)
    _build_launcher(mod.function("kt_pipe_launcher", [("ptr", "%st")]))
    _build_publish(mod.function("kt_pipe_publish", [("ptr", "%st"), ("ptr", "%worker"), ("ptr", "%ctx")]))
    _build_join(mod.function("kt_pipe_join", [("ptr", "%st")]))
    return get_or_compile("kt_pipe", "pipeline v1", mod.render(), target, list(NAMES))


_ONE_PTR = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


class Pipeline:
    """The process's launcher thread and its shared state (see the module docstring)."""

    def __init__(self, threads: int) -> None:
        fns = _functions()
        self.state = (ctypes.c_int64 * len(FIELDS))()
        self.ring = (ctypes.c_int64 * (2 * RING))()
        libc = ctypes.CDLL(None)
        gomp = gomp_parallel_address()
        if threads > 2 and gomp is None:
            raise RuntimeError("pipelined launches on more than 2 threads need libgomp's GOMP_parallel")
        for name, value in (("ring", ctypes.addressof(self.ring)), ("threads", threads), ("gomp", gomp or 0),
                            ("syscall", ctypes.cast(libc.syscall, ctypes.c_void_p).value)):
            self.state[FIELDS.index(name)] = value
        self.threads = threads
        self.addr = ctypes.addressof(self.state)
        self._publish = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)(
            fns["kt_pipe_publish"])
        self._join = _ONE_PTR(fns["kt_pipe_join"])
        launcher = _ONE_PTR(fns["kt_pipe_launcher"])
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=launcher, args=(self.addr,), name="kt_jit launcher", daemon=True)
        self.thread.start()

    def in_flight(self) -> int:
        return self.state[0] - self.state[1]

    def publish(self, worker: int, ctx: int) -> None:
        """Hand the launch (worker, argument block) to the launcher; the block must live until
        :meth:`join` returns."""
        if self.in_flight() >= RING - 1:
            self.join()
        self._publish(self.addr, worker, ctx)

    def join(self) -> None:
        """Run the published launches' remaining work items here too; return when all are done."""
        self._join(self.addr)

    def stop(self) -> None:
        """End the launcher thread (the caller holds the lock and has joined)."""
        self.state[FIELDS.index("quit")] = 1
        self._publish_nothing()
        self.thread.join()

    def _publish_nothing(self) -> None:  # wake the launcher if it sleeps (it then sees quit)
        self.state[FIELDS.index("futex")] = 1
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall(ctypes.c_long(SYS_FUTEX), ctypes.c_void_p(self.addr + _OFF["futex"]),
                     ctypes.c_long(FUTEX_WAKE_PRIVATE), ctypes.c_long(1), None)


_pipe: Pipeline | None = None
_pipe_lock = threading.Lock()


def acquire(threads: int) -> Pipeline | None:
    """The process's pipeline for a batch on ``threads`` threads, locked for the caller, or None
    when another thread holds it. A pipeline for another thread count is stopped and replaced
    (its launcher's team size is fixed)."""
    global _pipe
    with _pipe_lock:
        if _pipe is not None and _pipe.threads != threads:
            if not _pipe.lock.acquire(blocking=False):
                return None
            _pipe.stop()
            _pipe = None
        if _pipe is None:
            _pipe = Pipeline(threads)
        pipe = _pipe
    if not pipe.lock.acquire(blocking=False):
        return None
    return pipe


def release(pipe: Pipeline) -> None:
    pipe.lock.release()


def _after_fork_in_child() -> None:  # the launcher thread does not survive fork
    global _pipe
    _pipe = None


os.register_at_fork(after_in_child=_after_fork_in_child)

"""Launch plans: the launches of a pass captured for its configuration and replayed natively.

At decode sizes the host side of an MoE pass (Python building a dozen group tables and argument
blocks between kernel launches) costs as much as its kernels: each small step runs from caches
the previous weight stream has just emptied. But for a fixed configuration (shapes, flags, token
count, number of active experts) every launch is the same function of a few numbers known per call: the
addresses of the pass's operands (tensors, scratch) and the routing's per-expert basis rows
``(1, first row, expert id, row count)``. A :class:`Capture` records a pass while it runs for real:
each argument block as it is launched, and each group table as built by :func:`group_rows` (its
column coefficients, not just its values). :meth:`Capture.compile` then expresses every value
that is an address as (operand, offset) and produces a :class:`Plan`, which one compiled call
(``kt_run_plan``) turns back into tables, argument blocks and launches for any later call.

Which values are addresses is known, not guessed: the argument-block fields a kernel loads as
pointers (``ArgBlock.pointers``) and the bases of group-table columns (every column but the row
count is a pointer). Each non-null one must lie inside a registered operand or a captured table,
else the pass is unplannable (it keeps running through Python). Every plan is checked once against
the capture it came from: rebuilt from the capture's own operands it must reproduce every table and
argument block.
"""

from __future__ import annotations

import ctypes
import functools
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from ..runtime import threads as _threads
from ..runtime.buffers import array_address as _address
from ..runtime.threads import default_num_threads, gomp_parallel_address
from .cache import get_or_compile
from .compile import target_for
from .ir import Function, Module

HEAD = 4               # program header: tables, launches, steps offset (bytes into the work area), unused
TABLE_HEAD = 6         # table record: basis, rows, fields, parts, offset, slot; then parts*fields*5 columns
LAUNCH_HEAD = 3        # launch record: worker, fields (with the counter and item count), offset; then 2 per field
COL = 5                # column spec: slot (-1: none), constant, row pitch, expert pitch, per count

_capture = threading.local()


class Span(NamedTuple):
    """Memory a pass addresses that is not a tensor (scratch, routing arrays): where, how many bytes."""

    addr: int
    nbytes: int


def group_rows(basis: np.ndarray, parts: Sequence[Sequence[Sequence[int]]]) -> np.ndarray:
    """Group-descriptor table int64 [P * A, F] from ``basis`` [A, 4] (rows ``(1, first row, expert,
    count)``) and ``parts`` (P lists of F columns ``(base, row_pitch, expert_pitch, per_count)``):
    row ``p * A + a`` holds ``base + row_pitch * first + expert_pitch * expert + per_count * count``
    of each column of part p for basis row a. Noted by the thread's active :class:`Capture`."""
    coef = np.array(parts, dtype=np.int64)  # [P, F, 4]
    table = (basis @ coef.transpose(0, 2, 1)).reshape(-1, coef.shape[1])
    cap = getattr(_capture, "current", None)
    if cap is not None:
        cap.tables.append((table, basis, coef))
    return table


class Capture:
    """What one pass launched (argument blocks as launched) and the group tables it built."""

    def __init__(self) -> None:
        self.tables: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.launches: list[tuple[int, np.ndarray, frozenset[int]]] = []  # worker, fields, pointer fields
        self.failed: str | None = None

    def __enter__(self) -> Capture:
        if getattr(_capture, "current", None) is not None:
            raise RuntimeError("launch captures do not nest")
        _capture.current = self
        return self

    def __exit__(self, *exc) -> None:
        _capture.current = None

    def launch(self, worker: int, args: ctypes.Structure, pointers: frozenset[int]) -> None:
        """Note a launch: its worker, argument block and which of its fields are pointers."""
        self.launches.append((worker, np.frombuffer(args, dtype=np.int64).copy(), pointers))

    def fail(self, why: str) -> None:
        self.failed = self.failed or why

    def compile(self, operands: Sequence[tuple[int, int]], bases: Sequence[np.ndarray]) -> Plan | str:
        """The plan replaying this capture, given the pass's operands as ``(address, bytes)`` (in
        the order later calls will pass their addresses) and its bases (the basis arrays the tables
        were built from, by identity); or why it cannot be planned."""
        if self.failed:
            return self.failed
        try:
            plan = _Compiler(operands, bases, self).program()
        except _Unplannable as e:
            return str(e)
        values = [a for a, _ in operands]
        work = plan.build(values, bases)
        for (table, _, _), (off, size) in zip(self.tables, plan.table_places, strict=True):
            if size and not np.array_equal(work[off:off + size].view(np.int64), table.reshape(-1)):
                return "a group table was changed after it was built"
        # argument blocks: as captured, except that addresses into group tables now point into the
        # work area, where the tables were rebuilt
        for (_, args, _), off, specs in zip(self.launches, plan.launch_places, plan.launch_specs, strict=True):
            if off < 0:
                continue
            want = args.copy()
            for f, (slot, const) in enumerate(specs):
                if slot >= len(operands):  # (a table's slot)
                    want[f] = work.ctypes.data + plan.table_places[slot - len(operands)][0] + const
            if not np.array_equal(work[off:off + args.nbytes].view(np.int64), want):
                return "an argument block does not follow from the operands"
        plan.table_places = plan.launch_places = plan.launch_specs = []  # (only the check needs them)
        return plan


class _Unplannable(Exception):
    pass


class _Compiler:
    def __init__(self, operands: Sequence[tuple[int, int]], bases: Sequence[np.ndarray], cap: Capture) -> None:
        self.cap, self.bases = cap, bases
        if len(bases) > 2:
            raise _Unplannable("more than two bases (the runner takes two)")
        self.ranges = [(a, n) for a, n in operands]
        for i, (a, n) in enumerate(self.ranges):  # overlapping operands would make an address ambiguous
            for b, m in self.ranges[:i]:
                if a < b + m and b < a + n:
                    raise _Unplannable("two operands overlap")
        self.n_operands = len(operands)
        self.tables = [(t.ctypes.data, t.nbytes) for t, _, _ in cap.tables]

    def address(self, value: int, what: str) -> tuple[int, int]:
        """(slot, offset) of a captured address: an operand or table slot and the offset into it
        (null: no slot)."""
        if value == 0:
            return -1, 0
        for slot, (a, n) in enumerate(self.ranges):
            if a <= value < a + n:
                return slot, value - a
        for i, (a, n) in enumerate(self.tables):
            if a <= value < a + n:
                return self.n_operands + i, value - a
        for slot, (a, n) in enumerate(self.ranges):  # one past an operand's end (an empty slice of it)
            if value == a + n:
                return slot, n
        raise _Unplannable(f"{what} {value:#x} is in no operand")

    def program(self) -> Plan:
        prog = [0] * HEAD
        work = 0
        used = {self.address(int(args[f]), "a pointer argument")[0] for _, args, pointers in self.cap.launches
                for f in pointers}
        table_places = []
        n_tables = 0
        for i, (table, basis, coef) in enumerate(self.cap.tables):
            if self.n_operands + i not in used:  # built but never launched
                table_places.append((0, 0))
                continue
            sel = next((j for j, b in enumerate(self.bases) if b is basis), None)
            if sel is None:
                raise _Unplannable("a group table was built from an unregistered basis")
            parts, fields = coef.shape[0], coef.shape[1]
            prog += [sel, basis.shape[0], fields, parts, work, self.n_operands + i]
            for p in range(parts):
                for f in range(fields):
                    base, row_pitch, expert_pitch, per_count = (int(c) for c in coef[p, f])
                    prog += [*self.address(base, "a table column"), row_pitch, expert_pitch, per_count]
            table_places.append((work, table.nbytes))
            work += -(-table.nbytes // 64) * 64
            n_tables += 1
        launch_places, launch_specs = [], []
        n_launches = 0
        for worker, args, pointers in self.cap.launches:
            if args[1] == 0:  # no work items: nothing to replay
                launch_places.append(-1)
                launch_specs.append([])
                continue
            prog += [worker, len(args), work]
            specs = [self.address(int(v), "a pointer argument") if f in pointers else (-1, int(v))
                     for f, v in enumerate(args)]
            specs[0] = (-1, 0)  # the item counter starts at 0
            for spec in specs:
                prog += spec
            launch_places.append(work)
            launch_specs.append(specs)
            work += -(-args.nbytes // 64) * 64
            n_launches += 1
        prog[:3] = [n_tables, n_launches, work]
        work += 16 * n_launches  # the (worker, argument block) steps
        return Plan(np.array(prog, dtype=np.int64), self.n_operands, tuple(b.shape[0] for b in self.bases),
                    self.n_operands + len(self.cap.tables), work, n_launches, table_places, launch_places,
                    launch_specs)


_work = threading.local()


@dataclass
class Plan:
    """A compiled launch sequence (see the module docstring); :meth:`run` replays it."""

    program: np.ndarray  # int64, the format the HEAD / TABLE_HEAD / LAUNCH_HEAD constants describe
    operands: int        # the addresses a call passes
    basis_rows: tuple[int, ...]  # rows of each basis (the tables are built for exactly these)
    slots: int           # operands + tables
    work_bytes: int      # tables, argument blocks, then the steps
    n_launches: int
    # for the check against the capture (emptied after it): per captured table (offset, bytes) in the
    # work area or (0, 0); per captured launch the offset of its argument block or -1, and the
    # (slot, constant) of each field
    table_places: list[tuple[int, int]]
    launch_places: list[int]
    launch_specs: list[list[tuple[int, int]]]

    def _call(self, values: Sequence[int], bases: Sequence[np.ndarray], work: np.ndarray, run: bool) -> None:
        if len(values) != self.operands or tuple(b.shape[0] for b in bases) != self.basis_rows:
            raise ValueError(f"a launch plan of {self.operands} operands and bases of {self.basis_rows} rows got "
                             f"{len(values)} operands and bases of {tuple(b.shape[0] for b in bases)} rows")
        v = np.array([*values, *[0] * (self.slots - self.operands)], dtype=np.int64)  # (table slots: filled there)
        b = [_address(x) for x in bases] + [0] * (2 - len(bases))
        threads = default_num_threads() if run else 0
        gomp = gomp_parallel_address() or 0
        serial_python = run and not gomp and threads > 1  # no libgomp: Python threads launch each step
        _plan_runner()(_address(self.program), _address(v), b[0], b[1], _address(work), gomp,
                       0 if serial_python else threads)
        if serial_python:
            steps = work[self.program[2]:].view(np.int64)
            for i in range(self.n_launches):
                _threads.launch(int(steps[2 * i]), int(steps[2 * i + 1]), threads)

    def build(self, values: Sequence[int], bases: Sequence[np.ndarray]) -> np.ndarray:
        """The work area (tables, argument blocks, steps) for these operand addresses, not run."""
        work = np.zeros(self.work_bytes, dtype=np.uint8)
        self._call(values, bases, work, run=False)
        return work

    def run(self, values: Sequence[int], bases: Sequence[np.ndarray]) -> None:
        """Build and run the launches for this call's operand addresses (the order of
        :meth:`Capture.compile`) and bases (up to two basis arrays, as captured)."""
        work = getattr(_work, "buf", None)
        if work is None or work.size < self.work_bytes:
            work = _work.buf = np.empty(max(self.work_bytes, 16384), dtype=np.uint8)
        self._call(values, bases, work, run=True)


_RUN_PLAN = "kt_run_plan"


def emit_launch_loop(fn: Function, gomp: str, steps: str, n: str, threads: str) -> None:
    """For each (worker, ctx) pair at ``steps``: GOMP_parallel(worker, ctx, threads), or worker(ctx)
    when ``threads`` <= 1 or ``gomp`` is null."""
    serial = fn.val(f"or i1 {fn.icmp('sle', threads, 1)}, {fn.val(f'icmp eq ptr {gomp}, null')}")
    nt = fn.val(f"trunc i64 {threads} to i32")
    with fn.loop(0, n, name="l") as i:
        entry = fn.gep(steps, fn.mul(i, 16))
        worker, ctx = fn.load("ptr", entry, 8), fn.load("ptr", fn.gep(entry, 8), 8)
        par, one, done = fn.new_block("par"), fn.new_block("one"), fn.new_block("next")
        fn.cbr(serial, one, par)
        fn.set_block(par)
        fn.emit(f"call void {gomp}(ptr {worker}, ptr {ctx}, i32 {nt}, i32 0)")
        fn.br(done)
        fn.set_block(one)
        fn.emit(f"call void {worker}(ptr {ctx})")
        fn.br(done)
        fn.set_block(done)


def _slot_value(fn: Function, v: str, spec: str) -> str:
    """constant + (v[slot] when slot >= 0) of a (slot, constant) spec at ``spec``."""
    slot = fn.load("i64", spec, 8)
    has = fn.icmp("sge", slot, 0)
    sym = fn.load("i64", fn.gep(v, fn.mul(fn.val(f"select i1 {has}, i64 {slot}, i64 0"), 8)), 8)
    return fn.add(fn.load("i64", fn.gep(spec, 8), 8), fn.val(f"select i1 {has}, i64 {sym}, i64 0"))


def _build_runner(fn: Function) -> None:
    prog, v, b0, b1, work, gomp, threads = (a for _, a in fn.args)

    def at(ptr: str, i: int | str) -> str:
        return fn.load("i64", fn.gep(ptr, fn.mul(i, 8) if isinstance(i, str) else 8 * i), 8)

    n_tables, n_launches, steps_off = at(prog, 0), at(prog, 1), at(prog, 2)
    p = fn.var("ptr", fn.gep(prog, 8 * HEAD))
    with fn.loop(0, n_tables, name="tab"):
        rec = p.get()
        sel, rows, fields, parts, off, slot = (at(rec, i) for i in range(TABLE_HEAD))
        basis = fn.val(f"select i1 {fn.icmp('ne', sel, 0)}, ptr {b1}, ptr {b0}")
        dst = fn.gep(work, off)
        fn.store("i64", fn.val(f"ptrtoint ptr {dst} to i64"), fn.gep(v, fn.mul(slot, 8)), 8)
        cols = fn.gep(rec, 8 * TABLE_HEAD)
        with fn.loop(0, parts, name="part") as part:
            with fn.loop(0, rows, name="row") as row:
                brow = fn.gep(basis, fn.mul(row, 32))
                first, expert, count = (at(brow, i) for i in (1, 2, 3))
                out = fn.gep(dst, fn.mul(fn.mul(fn.add(fn.mul(part, rows), row), fields), 8))
                with fn.loop(0, fields, name="col") as f:
                    spec = fn.gep(cols, fn.mul(fn.add(fn.mul(part, fields), f), 8 * COL))
                    val = fn.add(_slot_value(fn, v, spec), fn.add(
                        fn.mul(at(spec, 2), first), fn.add(fn.mul(at(spec, 3), expert), fn.mul(at(spec, 4), count))))
                    fn.store("i64", val, fn.gep(out, fn.mul(f, 8)), 8)
        p.set(fn.gep(rec, fn.mul(fn.add(TABLE_HEAD, fn.mul(fn.mul(parts, fields), COL)), 8)))
    steps = fn.gep(work, steps_off)
    with fn.loop(0, n_launches, name="launch") as li:
        rec = p.get()
        worker, nf, off = (at(rec, i) for i in range(LAUNCH_HEAD))
        args = fn.gep(work, off)
        with fn.loop(0, nf, name="field") as f:
            fn.store("i64", _slot_value(fn, v, fn.gep(rec, fn.add(8 * LAUNCH_HEAD, fn.mul(f, 16)))),
                     fn.gep(args, fn.mul(f, 8)), 8)
        step = fn.gep(steps, fn.mul(li, 16))
        fn.store("i64", worker, step, 8)
        fn.store("i64", fn.val(f"ptrtoint ptr {args} to i64"), fn.gep(step, 8), 8)
        p.set(fn.gep(rec, fn.mul(fn.add(LAUNCH_HEAD, fn.mul(nf, 2)), 8)))
    with fn.if_then(fn.icmp("ne", threads, 0), name="run"):
        emit_launch_loop(fn, gomp, steps, n_launches, threads)
    fn.ret()


@functools.cache
def _plan_runner():
    """``run(program, values, basis0, basis1, work, gomp, threads)``: build the plan's tables,
    argument blocks and steps in ``work`` (values: int64 [slots], the table slots filled here), then
    launch the steps (``threads`` = 0: build only)."""
    target = target_for("avx512")
    mod = Module(_RUN_PLAN, target.fn_attrs)
    fn = mod.function(_RUN_PLAN, [("ptr", "%prog"), ("ptr", "%v"), ("ptr", "%b0"), ("ptr", "%b1"), ("ptr", "%work"),
                                  ("ptr", "%gomp"), ("i64", "%threads")])
    _build_runner(fn)
    addr = get_or_compile(_RUN_PLAN, "run_plan v1", mod.render(), target, [_RUN_PLAN])[_RUN_PLAN]
    c = ctypes.c_void_p
    return ctypes.CFUNCTYPE(None, c, c, c, c, c, c, ctypes.c_int64)(addr)

"""The work-stealing worker every kernel is wrapped in, and its argument block ABI.

A kernel's entry point is ``void <name>(ptr %ctx)``. ``ctx`` is an array of 8-byte fields: field 0
is the item counter (atomically incremented by every thread), field 1 the number of items, then
the kernel's own fields. The same field list builds the ctypes Structure on the Python side and
the field offsets on the IR side, so the two cannot drift apart.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Sequence

import numpy as np

from ..runtime.threads import launch
from .amx import TileConfig, Tiles
from .cache import get_or_compile
from .compile import target_for
from .ir import Function, Module


class ArgBlock:
    """Named 8-byte fields (pointers or int64) after the counter and item count."""

    HEADER = ("counter", "n_items")

    def __init__(self, fields: Sequence[str]) -> None:
        self.fields = tuple(self.HEADER) + tuple(fields)
        self.struct = type("KernelArgs", (ctypes.Structure,),
                           {"_fields_": [(f, ctypes.c_int64) for f in self.fields]})

    def offset(self, name: str) -> int:
        return 8 * self.fields.index(name)

    def load(self, fn: Function, ctx: str, name: str) -> str:
        return fn.load("i64", fn.gep(ctx, self.offset(name)), 8)

    def load_ptr(self, fn: Function, ctx: str, name: str) -> str:
        return fn.load("ptr", fn.gep(ctx, self.offset(name)), 8)

    def make(self, n_items: int, **values: int) -> ctypes.Structure:
        missing = set(self.fields[2:]) - set(values)
        if missing:
            raise TypeError(f"missing kernel arguments: {sorted(missing)}")
        return self.struct(counter=0, n_items=n_items, **values)

    def run(self, addr: int, n_items: int, num_threads: int | None = None, **values: int) -> None:
        """Launch the compiled worker at ``addr`` over ``n_items`` work items (nothing when 0)."""
        if n_items:
            args = self.make(n_items, **values)
            launch(addr, ctypes.addressof(args), num_threads)


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
    target = target_for(isa)
    mod = Module(name, target.fn_attrs)
    build_worker(mod, name, args, body, tile_config, emulate_amx)
    return get_or_compile(name, key, mod.render(), target, [name])[name]


def build_worker(module: Module, name: str, args: ArgBlock,
                 body: Callable[[Function, str, str, Tiles | None], None],
                 tile_config: TileConfig | None = None, emulate_amx: bool = False) -> Function:
    """``void name(ptr ctx)``: claim items from the counter and run ``body(fn, ctx, item, tiles)``.

    With a tile config the worker loads it once on entry (tiles are per thread and do not survive
    across calls into other code) and releases the tiles on exit.
    """
    fn = module.function(name, [("ptr", "%ctx")])
    tiles = None
    if tile_config is not None:
        tiles = Tiles(fn, emulate_amx)
        tiles.configure(tile_config)
    n_items = args.load(fn, "%ctx", "n_items")
    head, body_bb, done = fn.new_block("claim"), fn.new_block("work"), fn.new_block("finish")
    fn.br(head)
    fn.set_block(head)
    item = fn.val("atomicrmw add ptr %ctx, i64 1 monotonic")
    fn.cbr(fn.icmp("slt", item, n_items), body_bb, done)
    fn.set_block(body_bb)
    body(fn, "%ctx", item, tiles)
    fn.br(head)
    fn.set_block(done)
    if tiles is not None:
        tiles.release()
    fn.ret()
    return fn

"""Token routing as one compiled call: a stable counting sort of the routed (token, k) pairs by expert.

The host side of a decode-sized MoE call is dominated by many small operations, each of which runs
from cold caches right after the previous layer's weights streamed through them; the dozen NumPy
calls this replaces cost ~120 us there (14 us warm). This is one serial pass over the T*K ids
plus one over the E experts, called directly (no thread launch).

Output, one int64 buffer of ``out_size(n, e)`` fields (n = T*K pairs, e experts)::

    [0] active experts A      [1] rows (sum of the counts, each rounded up to ``align``)
    [2] 1 if an id is outside [0, e) (then the rest is unset)   [3] unused
    basis[e, 4]                          per active expert, in id order (first A rows used):
                                         (1, first row, expert id, row count)
    scratch[2e]                          per-expert row and slot cursors
    slot_token[n] slot_k[n] slot_row[n]  pair j of expert order: token, k, row in the buffers
    row_of[n]                            the row of pair t*K + k
    ids[n]                               the kernel's own copy of the ids
    slot_expert[n]                       pair j of expert order: its expert
"""

from __future__ import annotations

import ctypes
import functools

from ..codegen.cache import get_or_compile
from ..codegen.compile import target_for
from ..codegen.ir import Function, Module

NAME = "kt_route"
HEADER = 4
_SIG = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                        ctypes.c_void_p)


def out_size(n: int, e: int) -> int:
    """int64 fields of the output buffer for n routed pairs over e experts."""
    return HEADER + 6 * e + 6 * n


# the per-pair regions after the header and the 6e per-expert fields, in order
PAIR_REGIONS = ("slot_token", "slot_k", "slot_row", "row_of", "ids", "slot_expert")


def pair_region(name: str, n: int, e: int) -> int:
    """Index (in int64 fields) of the per-pair region ``name`` in the output buffer."""
    return HEADER + 6 * e + n * PAIR_REGIONS.index(name)


def basis_view(buf):
    """The basis rows [A, 4] of a filled output buffer (NumPy int64)."""
    active = int(buf[0])
    return buf[HEADER:HEADER + 4 * active].reshape(active, 4)


def regions(buf, n: int, e: int) -> dict:
    """Views of a filled output buffer (NumPy int64): ``basis`` [A, 4] and the per-pair regions."""
    views = {name: buf[pair_region(name, n, e):pair_region(name, n, e) + n] for name in PAIR_REGIONS}
    views["basis"] = basis_view(buf)
    return views


def _build(fn: Function) -> None:
    ids, n, k, e, align, out = (a for _, a in fn.args)

    def at(base: str, i: str | int) -> str:
        return fn.gep(base, fn.mul(i, 8))

    def region(first: str | int) -> str:
        return at(out, first)

    basis = region(HEADER)
    row_cur = region(fn.add(HEADER, fn.mul(e, 4)))
    slot_cur = region(fn.add(HEADER, fn.mul(e, 5)))
    base = fn.add(HEADER, fn.mul(e, 6))

    slot_token, slot_k, slot_row, row_of, own, slot_expert = (
        region(fn.add(base, fn.mul(n, i))) for i in range(len(PAIR_REGIONS)))

    # the ids are read once, checked (one unsigned compare also catches negative ids) and copied:
    # everything below indexes with the copy, so a caller changing its tensor meanwhile cannot
    # make this or a later kernel write out of bounds
    bad_bb = fn.new_block("bad")
    fn.store("i64", "0", fn.gep(out, 16), 8)
    with fn.loop(0, n, name="copy") as j:
        x = fn.load("i64", at(ids, j), 8)
        ok_bb = fn.new_block("idok")
        fn.cbr(fn.icmp("uge", x, e), bad_bb, ok_bb)
        fn.set_block(ok_bb)
        fn.store("i64", x, at(own, j), 8)

    with fn.loop(0, e, name="zero") as x:
        fn.store("i64", "0", at(row_cur, x), 8)
    with fn.loop(0, n, name="count") as j:  # histogram (in the row cursors for now)
        c = at(row_cur, fn.load("i64", at(own, j), 8))
        fn.store("i64", fn.add(fn.load("i64", c, 8), 1), c, 8)
    active, rows, slots = fn.var("i64", "0"), fn.var("i64", "0"), fn.var("i64", "0")
    mask = fn.sub(0, align)
    with fn.loop(0, e, name="scan") as x:
        cnt = fn.load("i64", at(row_cur, x), 8)
        with fn.if_then(fn.icmp("sgt", cnt, 0), name="used"):
            a = active.get()
            for f, v in enumerate(("1", rows.get(), x, cnt)):
                fn.store("i64", v, at(basis, fn.add(fn.mul(a, 4), f)), 8)
            active.set(fn.add(a, 1))
        fn.store("i64", rows.get(), at(row_cur, x), 8)
        fn.store("i64", slots.get(), at(slot_cur, x), 8)
        rows.set(fn.add(rows.get(), fn.val(f"and i64 {fn.add(cnt, fn.sub(align, 1))}, {mask}")))
        slots.set(fn.add(slots.get(), cnt))
    with fn.loop(0, n, name="place") as j:  # ids in order: stable within each expert
        x = fn.load("i64", at(own, j), 8)
        rc, sc = at(row_cur, x), at(slot_cur, x)
        row, slot = fn.load("i64", rc, 8), fn.load("i64", sc, 8)
        fn.store("i64", fn.add(row, 1), rc, 8)
        fn.store("i64", fn.add(slot, 1), sc, 8)
        fn.store("i64", row, at(row_of, j), 8)
        fn.store("i64", row, at(slot_row, slot), 8)
        fn.store("i64", fn.val(f"udiv i64 {j}, {k}"), at(slot_token, slot), 8)
        fn.store("i64", fn.val(f"urem i64 {j}, {k}"), at(slot_k, slot), 8)
        fn.store("i64", x, at(slot_expert, slot), 8)
    fn.store("i64", active.get(), out, 8)
    fn.store("i64", rows.get(), fn.gep(out, 8), 8)
    fn.ret()
    fn.set_block(bad_bb)
    fn.store("i64", "1", fn.gep(out, 16), 8)
    fn.ret()


@functools.cache
def _kernel() -> ctypes._CFuncPtr:
    target = target_for("avx512")
    mod = Module(NAME, target.fn_attrs)
    _build(mod.function(NAME, [("ptr", "%ids"), ("i64", "%n"), ("i64", "%k"), ("i64", "%e"), ("i64", "%align"),
                               ("ptr", "%out")]))
    return _SIG(get_or_compile(NAME, "route v5", mod.render(), target, [NAME])[NAME])


def route_into(ids_addr: int, n: int, k: int, e: int, align: int, out_addr: int) -> None:
    """Sort the ``n`` int64 expert ids at ``ids_addr`` (pairs t*k + j) into the int64 buffer at
    ``out_addr`` (``out_size(n, e)`` fields, layout in the module docstring); each expert's rows
    start at a multiple of ``align`` (a power of two). An id outside [0, e) stops it and sets field 2
    (the caller checks it)."""
    _kernel()(ids_addr, n, k, e, align, out_addr)

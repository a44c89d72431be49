"""The idle experts a backward must zero in the LoRA gradients, as one compiled call.

A backward writes every active expert's slices of the six gradients; the other experts' slices must
read zero. Reused gradient buffers (moe/gradbuf.py) hold zeros except where the last backward
wrote, so only those experts need zeroing; fresh buffers need every idle expert zeroed. A few of
them ride along in the gradient launches as zero-row groups (rows ``(1, 0, expert, 0)`` appended
to the routing's basis). The dozen NumPy steps this replaces cost ~40 us at decode sizes (each
small step runs 5-10x its warm time right after a weight stream); this is one direct call.

``idle_experts(basis, written, reuse, fold_max, to_zero, folded, after)``: ``basis`` the routing's
[A, 4] int64 basis rows (expert id in column 2), ``written`` bool [E] (the experts the buffers may
hold non-zero values for; updated in place to ``active | to_zero``), ``reuse`` whether the buffers
are the reused ones (else every idle expert is to zero), ``to_zero`` bool [E] (out), ``folded``
int64 [A + fold_max, 4] (out: the basis rows then a zero-row group per expert to zero, written when
there are at most ``fold_max`` of them), ``after`` bool [E] (out: the active experts, what
``written`` becomes once the caller has zeroed ``to_zero``). Returns how many experts are to zero.
"""

from __future__ import annotations

import ctypes
import functools

import numpy as np

from ..codegen.cache import get_or_compile
from ..codegen.compile import target_for
from ..codegen.ir import Function, Module
from ..runtime.buffers import array_address

NAME = "kt_idle_experts"
_SIG = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)


def _build(fn: Function) -> None:
    basis, a, written, e, reuse, fold_max, to_zero, folded, after = (v for _, v in fn.args)

    def byte(ptr: str, i: str) -> str:
        return fn.gep(ptr, i)

    def expert(row: str) -> str:
        return fn.load("i64", fn.gep(basis, fn.add(fn.mul(row, 32), 16)), 8)

    keep = fn.icmp("ne", reuse, 0)
    with fn.loop(0, e, name="init") as x:  # to zero: what may be non-zero (all, for fresh buffers)
        w = fn.load("i8", byte(written, x), 1)
        fn.store("i8", fn.val(f"select i1 {keep}, i8 {w}, i8 1"), byte(to_zero, x), 1)
        fn.store("i8", "0", byte(after, x), 1)
    with fn.loop(0, a, name="active") as j:  # ... but not the active experts, which get written
        fn.store("i8", "0", byte(to_zero, expert(j)), 1)
    count = fn.var("i64", "0")
    with fn.loop(0, e, name="count") as x:
        z = fn.load("i8", byte(to_zero, x), 1)
        fn.store("i8", z, byte(written, x), 1)  # written = to_zero | active (active: below)
        count.set(fn.add(count.get(), fn.val(f"zext i8 {z} to i64")))
    with fn.loop(0, a, name="mark") as j:
        fn.store("i8", "1", byte(written, expert(j)), 1)
        fn.store("i8", "1", byte(after, expert(j)), 1)
    n = count.get()
    with fn.if_then(fn.icmp("sle", n, fold_max), name="fold"):
        with fn.loop(0, fn.mul(a, 4), name="copy") as f:
            fn.store("i64", fn.load("i64", fn.gep(basis, fn.mul(f, 8)), 8), fn.gep(folded, fn.mul(f, 8)), 8)
        row = fn.var("i64", a)
        with fn.loop(0, e, name="zrow") as x:
            with fn.if_then(fn.val(f"icmp ne i8 {fn.load('i8', byte(to_zero, x), 1)}, 0"), name="idle"):
                r = row.get()
                for col, v in enumerate(("1", "0", x, "0")):
                    fn.store("i64", v, fn.gep(folded, fn.mul(fn.add(fn.mul(r, 4), col), 8)), 8)
                row.set(fn.add(r, 1))
    fn.ret(n)


@functools.cache
def _kernel() -> ctypes._CFuncPtr:
    target = target_for("avx512")
    mod = Module(NAME, target.fn_attrs)
    _build(mod.function(NAME, [("ptr", "%basis"), ("i64", "%a"), ("ptr", "%written"), ("i64", "%e"),
                               ("i64", "%reuse"), ("i64", "%fold_max"), ("ptr", "%to_zero"), ("ptr", "%folded"),
                               ("ptr", "%after")],
                        ret="i64"))
    return _SIG(get_or_compile(NAME, "idle experts v2", mod.render(), target, [NAME])[NAME])


def idle_experts(basis: np.ndarray, written: np.ndarray, reuse: bool, fold_max: int, to_zero: np.ndarray,
                 folded: np.ndarray, after: np.ndarray) -> int:
    """See the module docstring (arrays C-contiguous, of the dtypes and sizes given there)."""
    return _kernel()(array_address(basis), basis.shape[0], array_address(written), written.size, int(reuse), fold_max,
                     array_address(to_zero), array_address(folded), array_address(after))

"""AVX-512 helpers over the text IR builder: loads, broadcasts, bf16 dot products, shuffles.

Generic IR is used wherever LLVM lowers it well (shufflevector, fptrunc to bfloat, fadd); the
bf16 dot product, which has no generic form, is the ``llvm.x86.avx512bf16.dpbf16ps.512`` intrinsic.
"""

from __future__ import annotations

from collections.abc import Sequence

from .ir import BF16x32, F32x16, Function, I16x32, I32x16, shuffle_mask, vec_const

_DPBF16 = "llvm.x86.avx512bf16.dpbf16ps.512"


def zero_f32x16() -> str:
    return "zeroinitializer"


def dpbf16(fn: Function, acc: str, a: str, b: str) -> str:
    """acc[i] += a[2i]*b[2i] + a[2i+1]*b[2i+1] (fp32 accumulate of bf16 pairs)."""
    sym = fn.module.declare(
        _DPBF16, f"declare {F32x16} @{_DPBF16}({F32x16}, {BF16x32}, {BF16x32})")
    return fn.val(f"call {F32x16} {sym}({F32x16} {acc}, {BF16x32} {a}, {BF16x32} {b})")


def load_bf16x32(fn: Function, ptr: str, align: int = 64) -> str:
    return fn.load(BF16x32, ptr, align)


def bcast_pair(fn: Function, ptr: str) -> str:
    """Broadcast the bf16 pair (one dword) at ``ptr`` to all 16 lanes, as <32 x bfloat>."""
    d = fn.load("i32", ptr, 4)
    v = fn.val(f"insertelement {I32x16} poison, i32 {d}, i64 0")
    s = fn.val(f"shufflevector {I32x16} {v}, {I32x16} poison, <16 x i32> zeroinitializer")
    return fn.val(f"bitcast {I32x16} {s} to {BF16x32}")


def shuffle(fn: Function, ty: str, a: str, b: str | None, indices: Sequence[int]) -> str:
    other = b if b is not None else "poison"
    return fn.val(f"shufflevector {ty} {a}, {ty} {other}, {shuffle_mask(indices)}")


def fadd(fn: Function, a: str, b: str, ty: str = F32x16) -> str:
    return fn.val(f"fadd {ty} {a}, {b}")


def fmul(fn: Function, a: str, b: str, ty: str = F32x16) -> str:
    return fn.val(f"fmul {ty} {a}, {b}")


def bitcast(fn: Function, v: str, src: str, dst: str) -> str:
    return fn.val(f"bitcast {src} {v} to {dst}")


def swap_k_n_pairs(fn: Function, ptr: str) -> str:
    """Load one packed weight row and regroup its 2x2 (n, k) blocks from k-pairs to n-pairs.

    A packed row holds, per dword lane i, the pair (W[n_i][2r], W[n_i][2r+1]). Swapping the middle
    two words of every qword gives dword 2q+e = (W[n_2q][2r+e], W[n_2q+1][2r+e]): bf16 pairs along
    n, which is what the transposed GEMM (reduction over n) multiplies against.
    """
    w = fn.load(I16x32, ptr, 64)
    idx = [q * 4 + j for q in range(8) for j in (0, 2, 1, 3)]
    s = shuffle(fn, I16x32, w, None, idx)
    return bitcast(fn, s, I16x32, BF16x32)


def dup_dwords(fn: Function, ptr: str) -> str:
    """Load 8 dwords (16 bf16) at ``ptr`` and return [d0,d0,d1,d1,...,d7,d7] as <32 x bfloat>."""
    v = fn.load("<8 x i32>", ptr, 4)
    s = fn.val(f"shufflevector <8 x i32> {v}, <8 x i32> poison, "
               f"{shuffle_mask([i // 2 for i in range(16)])}")
    return bitcast(fn, s, I32x16, BF16x32)


def reduce_pair_lanes(fn: Function, accs: Sequence[str]) -> str:
    """Fold 8 accumulators whose lane 2q+e holds a partial sum for output (row r, parity e).

    Returns one <16 x float> with lane 2r+e = sum over q of accs[r][2q+e] (three halving steps of
    shuffle+add, ~2.6 ops per accumulator).
    """
    assert len(accs) == 8

    def fold(vs: Sequence[str], group: int) -> list[str]:
        # each vector is made of 16/group groups; fold the lower and upper half of each group
        half = group // 2
        out = []
        for a, b in zip(vs[0::2], vs[1::2], strict=True):
            lo = [g * group + j for g in range(16 // group) for j in range(half)]
            hi = [g * group + half + j for g in range(16 // group) for j in range(half)]
            lo = lo + [16 + i for i in lo]
            hi = hi + [16 + i for i in hi]
            out.append(fadd(fn, shuffle(fn, F32x16, a, b, lo), shuffle(fn, F32x16, a, b, hi)))
        return out

    # step 1: groups of 16 lanes (q 0..7) -> 8 lanes per acc; step 2: groups of 8; step 3: of 4
    vs = fold(accs, 16)
    vs = fold(vs, 8)
    vs = fold(vs, 4)
    return vs[0]


def i32x16_const(values: Sequence[int]) -> str:
    return vec_const("i32", values)


def prefetch(fn: Function, ptr: str, locality: int = 3) -> None:
    """Software prefetch of the cache line at ``ptr`` (locality 3 = prefetcht0, 2 = prefetcht1)."""
    sym = fn.module.declare("llvm.prefetch.p0", "declare void @llvm.prefetch.p0(ptr, i32, i32, i32)")
    fn.emit(f"call void {sym}(ptr {ptr}, i32 0, i32 {locality}, i32 1)")

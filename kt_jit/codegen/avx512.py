"""AVX-512 helpers over the text IR builder: loads, broadcasts, bf16 dot products, shuffles.

Generic IR is used wherever LLVM lowers it well (shufflevector, fptrunc to bfloat, fadd); the
bf16 dot product, which has no generic form, is the ``llvm.x86.avx512bf16.dpbf16ps.512`` intrinsic
(and the int16 one ``llvm.x86.avx512.vpdpwssd.512``).
"""

from __future__ import annotations

from collections.abc import Sequence

from .ir import BF16x32, F32x16, Function, I16x32, I32x16, shuffle_mask, vec_const

_DPBF16 = "llvm.x86.avx512bf16.dpbf16ps.512"
_DPWSSD = "llvm.x86.avx512.vpdpwssd.512"


def dpbf16(fn: Function, acc: str, a: str, b: str) -> str:
    """acc[i] += a[2i]*b[2i] + a[2i+1]*b[2i+1] (fp32 accumulate of bf16 pairs)."""
    sym = fn.module.declare(
        _DPBF16, f"declare {F32x16} @{_DPBF16}({F32x16}, {BF16x32}, {BF16x32})")
    return fn.val(f"call {F32x16} {sym}({F32x16} {acc}, {BF16x32} {a}, {BF16x32} {b})")


def dpwssd(fn: Function, acc: str, a: str, b: str) -> str:
    """acc[i] += a[2i]*b[2i] + a[2i+1]*b[2i+1] (int16 pairs, int32 accumulate, wrapping)."""
    sym = fn.module.declare(
        _DPWSSD, f"declare {I32x16} @{_DPWSSD}({I32x16}, {I16x32}, {I16x32})")
    return fn.val(f"call {I32x16} {sym}({I32x16} {acc}, {I16x32} {a}, {I16x32} {b})")


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


# word order of a row regrouped from k-pairs to n-pairs: the middle two words of every qword swap
SWAP_K_N_WORDS = tuple(q * 4 + j for q in range(8) for j in (0, 2, 1, 3))


def interleave_words_at(fn: Function, lo: str, hi: str) -> str:
    """The 16 words at ``lo`` and the 16 at ``hi`` as the <32 x i16> ``[lo0, hi0, lo1, hi1, ...]``:
    two rows (e.g. k and k+1) of a row-major bf16 matrix as pairs along that dimension."""
    rows = [fn.load("<16 x i16>", p, 2) for p in (lo, hi)]
    return shuffle(fn, "<16 x i16>", rows[0], rows[1], [i // 2 + 16 * (i % 2) for i in range(32)])


def swap_k_n_pairs(fn: Function, row: str) -> str:
    """Regroup a packed weight row (<32 x bfloat>) from k-pairs to n-pairs.

    A packed row holds, per dword lane i, the pair (W[n_i][2r], W[n_i][2r+1]). Swapping the middle
    two words of every qword gives dword 2q+e = (W[n_2q][2r+e], W[n_2q+1][2r+e]): bf16 pairs along
    n, which is what the transposed GEMM (reduction over n) multiplies against.
    """
    w = bitcast(fn, row, BF16x32, I16x32)
    s = shuffle(fn, I16x32, w, None, SWAP_K_N_WORDS)
    return bitcast(fn, s, I16x32, BF16x32)


def swap_k_n_pairs_at(fn: Function, ptr: str) -> str:
    """:func:`swap_k_n_pairs` of the packed row at ``ptr``, as one ``vpermw`` whose data operand is
    the load itself (the index vector comes from a module global LLVM cannot constant-fold, so the
    permute is not turned back into a load plus an in-lane ``vpshufb``). Such globals are ``weak``:
    each part of a module (codegen/ir.py Module.part) defines its own, linked into one library."""
    table = fn.module.declare("kt_swap_k_n_idx", "@kt_swap_k_n_idx = weak global " + I16x32 + " "
                              + vec_const("i16", SWAP_K_N_WORDS) + ", align 64")
    sym = fn.module.declare("llvm.x86.avx512.permvar.hi.512",
                            f"declare {I16x32} @llvm.x86.avx512.permvar.hi.512({I16x32}, {I16x32})")
    w = fn.load(I16x32, ptr, 2)
    s = fn.val(f"call {I16x32} {sym}({I16x32} {w}, {I16x32} {fn.load(I16x32, table, 64)})")
    return bitcast(fn, s, I16x32, BF16x32)


def transpose_qwords_8x8(fn: Function, rows: Sequence[str]) -> list[str]:
    """Transpose 8 vectors of 8 qwords: ``out[q]`` qword ``r`` = ``rows[r]`` qword ``q``.

    Inputs and outputs are <32 x bfloat> (4 bf16 per qword); three stages of two-source shuffles
    (1-, 2- then 4-qword blocks), 24 shuffles for the 8 vectors.
    """
    vs = [bitcast(fn, r, BF16x32, "<8 x i64>") for r in rows]
    for b in (1, 2, 4):
        out = list(vs)
        for r in range(8):
            if r & b:
                continue
            # lo: A's and B's even b-blocks interleaved; hi: their odd b-blocks
            lo = [(c // (2 * b)) * 2 * b + c % b + (8 if (c // b) % 2 else 0) for c in range(8)]
            hi = [i + b for i in lo]
            out[r] = shuffle(fn, "<8 x i64>", vs[r], vs[r + b], lo)
            out[r + b] = shuffle(fn, "<8 x i64>", vs[r], vs[r + b], hi)
        vs = out
    return [bitcast(fn, v, "<8 x i64>", BF16x32) for v in vs]


def transpose_dwords_16x8(fn: Function, rows: Sequence[str]) -> list[str]:
    """Transpose a 16 x 8 dword matrix M held as 8 <16 x i32> (``rows[a]`` = rows 2a and 2a+1 of M,
    8 dwords each) into ``out[p]`` lane ``l`` = M[l][p].

    Three stages of two-source shuffles (24 in all); stage s swaps bit s of the vector index with
    bit s of the lane index, and the last stage also puts the lanes in row order.
    """
    vs = list(rows)
    labels = [[(2 * a + lane // 8, lane % 8) for lane in range(16)] for a in range(8)]  # (row, p) per lane
    for s in range(3):
        out, out_labels = list(vs), [list(lb) for lb in labels]
        for v in range(8):
            if v >> s & 1:
                continue
            pair = (v, v | 1 << s)
            for beta, dst in enumerate(pair):
                if s < 2:  # lane l' takes lane (l' with bit s = beta) of source (bit s = bit s of l')
                    src = [((lane >> s & 1) * 16) + (lane & ~(1 << s) | beta << s) for lane in range(16)]
                else:  # last stage: lane l must hold (row l, p = dst), found in one of the two sources
                    both = labels[pair[0]] + labels[pair[1]]
                    src = [both.index((lane, dst)) for lane in range(16)]
                out[dst] = shuffle(fn, I32x16, vs[pair[0]], vs[pair[1]], src)
                out_labels[dst] = [(labels[pair[0]] + labels[pair[1]])[i] for i in src]
        vs, labels = out, out_labels
    assert all(labels[p] == [(lane, p) for lane in range(16)] for p in range(8))
    return vs


def transpose_dwords_16x16(fn: Function, rows: Sequence[str], ty: str = I32x16) -> list[str]:
    """Transpose 16 vectors of 16 dwords (``ty``: <16 x i32> or <16 x float>): ``out[p]`` lane
    ``l`` = ``rows[l]`` lane ``p``. Four stages of two-source shuffles (64 in all); stage s swaps
    bit s of the vector index with bit s of the lane index."""
    vs = list(rows)
    for s in range(4):
        b = 1 << s
        out = list(vs)
        for v in range(16):
            if v & b:
                continue
            for beta, dst in enumerate((v, v | b)):
                # lane l of dst: lane (l with bit s = beta) of the source whose bit s is l's
                src = [(lane >> s & 1) * 16 + (lane & ~b | beta << s) for lane in range(16)]
                out[dst] = shuffle(fn, ty, vs[v], vs[v | b], src)
        vs = out
    return vs


def lane_mask(fn: Function, count: str) -> str:
    """<16 x i1> with the first ``count`` lanes set (``count`` an i64 in 0..16)."""
    bits = fn.sub(fn.val(f"shl i64 1, {count}"), 1)
    return fn.val(f"bitcast i16 {fn.val(f'trunc i64 {bits} to i16')} to <16 x i1>")


def masked_load(fn: Function, ty: str, ptr: str, mask: str) -> str:
    """The lanes of ``mask`` loaded from ``ptr`` (a 16-lane dword vector type), the others zero;
    masked-off lanes are not read (no fault past the end of a buffer)."""
    assert ty in (I32x16, F32x16), ty
    suffix = "v16f32" if ty == F32x16 else "v16i32"
    sym = fn.module.declare(f"llvm.masked.load.{suffix}.p0",
                            f"declare {ty} @llvm.masked.load.{suffix}.p0(ptr, i32 immarg, <16 x i1>, {ty})")
    return fn.val(f"call {ty} {sym}(ptr {ptr}, i32 4, <16 x i1> {mask}, {ty} zeroinitializer)")


def masked_store(fn: Function, ty: str, v: str, ptr: str, mask: str) -> None:
    """Store the lanes of ``mask`` of ``v`` (a 16-lane dword vector type) to ``ptr``."""
    assert ty in (I32x16, F32x16), ty
    suffix = "v16f32" if ty == F32x16 else "v16i32"
    sym = fn.module.declare(f"llvm.masked.store.{suffix}.p0",
                            f"declare void @llvm.masked.store.{suffix}.p0({ty}, ptr, i32 immarg, <16 x i1>)")
    fn.emit(f"call void {sym}({ty} {v}, ptr {ptr}, i32 4, <16 x i1> {mask})")


def opaque_zero(fn: Function) -> str:
    """An i64 zero LLVM cannot see through (a module global): an offset that keeps a load a load
    (e.g. a broadcast from a scratch buffer LLVM would otherwise forward the stored vector into,
    as shuffles, instead of a broadcast operand of the instruction that uses it)."""
    zero = fn.module.declare("kt_zero_i64", "@kt_zero_i64 = weak global i64 0, align 8")
    return fn.load("i64", zero, 8)


def dup_pairs(fn: Function, v: str, halves: bool = False) -> str:
    """8 dwords (<8 x i32> ``v``, 16 bf16 as pairs) each twice as <32 x bfloat>: [d0,d0,d1,d1,...,d7,d7],
    or with ``halves`` [d0..d7, d0..d7]."""
    order = list(range(8)) * 2 if halves else [i // 2 for i in range(16)]
    return bitcast(fn, fn.val(f"shufflevector <8 x i32> {v}, <8 x i32> poison, {shuffle_mask(order)}"), I32x16,
                   BF16x32)


def dup_dwords(fn: Function, ptr: str) -> str:
    """:func:`dup_pairs` of the 8 dwords at ``ptr``: [d0,d0,d1,d1,...,d7,d7]."""
    return dup_pairs(fn, fn.load("<8 x i32>", ptr, 4))


def dup_halves(fn: Function, ptr: str) -> str:
    """:func:`dup_pairs` of the 8 dwords at ``ptr``, halves: [d0..d7, d0..d7]."""
    return dup_pairs(fn, fn.load("<8 x i32>", ptr, 4), halves=True)


def reduce_half_lanes(fn: Function, accs: Sequence[str], order: Sequence[int]) -> str:
    """Fold 8 accumulators whose lanes 8h..8h+7 hold partial sums of one output (accumulator m,
    half h) into one <16 x float>: output lane ``order[2 * m + h]`` is the sum of accs[m]'s half h
    (three halving steps of shuffle+add, then one permutation)."""
    assert len(accs) == 8 and sorted(order) == list(range(16))
    vs = fold_groups(fn, accs, 8)
    vs = fold_groups(fn, vs, 4)
    out = fold_groups(fn, vs, 2)[0]
    # where each (accumulator, half) ended up: replay the folds on lane labels
    vecs = [[(m, lane // 8) for lane in range(16)] for m in range(8)]
    for group in (8, 4, 2):  # (a lane's label: the lower half of its group, which fold_groups keeps)
        lo = _fold_lanes(group)[0]
        vecs = [[(a + b)[i] for i in lo] for a, b in zip(vecs[0::2], vecs[1::2], strict=True)]
    where = {lab: lane for lane, lab in enumerate(vecs[0])}
    perm = [0] * 16
    for m in range(8):
        for h in range(2):
            perm[order[2 * m + h]] = where[(m, h)]
    return shuffle(fn, F32x16, out, None, perm)


def reduce_pair_lanes(fn: Function, accs: Sequence[str]) -> str:
    """Fold 8 accumulators whose lane 2q+e holds a partial sum for output (row r, parity e).

    Returns one <16 x float> with lane 2r+e = sum over q of accs[r][2q+e] (three halving steps of
    shuffle+add, ~2.6 ops per accumulator).
    """
    assert len(accs) == 8
    vs = fold_groups(fn, accs, 16)
    vs = fold_groups(fn, vs, 8)
    return fold_groups(fn, vs, 4)[0]


def i32x16_const(values: Sequence[int]) -> str:
    return vec_const("i32", values)


def prefetch(fn: Function, ptr: str, locality: int = 3, write: bool = False) -> None:
    """Software prefetch of the cache line at ``ptr`` (locality 3 = prefetcht0, 2 = prefetcht1;
    ``write``: for writing, prefetchw)."""
    sym = fn.module.declare("llvm.prefetch.p0", "declare void @llvm.prefetch.p0(ptr, i32, i32, i32)")
    fn.emit(f"call void {sym}(ptr {ptr}, i32 {int(write)}, i32 {locality}, i32 1)")


def fold_groups(fn: Function, vs: Sequence[str], group: int) -> list[str]:
    """One halving step of a multi-accumulator reduction.

    Each input vector is made of 16/group lane groups; the lower and upper half of every group are
    added, and pairs of inputs are packed into one output (so the output count halves too).
    """
    lo, hi = _fold_lanes(group)
    return [fadd(fn, shuffle(fn, F32x16, a, b, lo), shuffle(fn, F32x16, a, b, hi))
            for a, b in zip(vs[0::2], vs[1::2], strict=True)]


def _fold_lanes(group: int) -> tuple[list[int], list[int]]:
    """The lanes of a pair of vectors (the second one's numbered from 16) whose sums one
    :func:`fold_groups` step makes: the lower and the upper half of every group of ``group`` lanes."""
    half = group // 2
    lo = [g * group + j for g in range(16 // group) for j in range(half)]
    hi = [g * group + half + j for g in range(16 // group) for j in range(half)]
    return lo + [16 + i for i in lo], hi + [16 + i for i in hi]


def reduce_lanes(fn: Function, accs: Sequence[str]) -> str:
    """Sum partial lanes of several accumulators into one vector.

    Accumulator a holds 16/len(accs) outputs, each spread over len(accs) consecutive lanes; the
    result has output (a, j) at lane a*(16/len(accs)) + j, the sum of its partials.
    """
    vs, group = list(accs), len(accs)
    while group > 1:
        vs = fold_groups(fn, vs, group)
        group //= 2
    return vs[0]


def load_f32x16(fn: Function, ptr: str, dtype: str) -> str:
    """16 consecutive values at ``ptr`` as <16 x float>; ``dtype`` is "f32" or "bf16"."""
    if dtype == "f32":
        return fn.load(F32x16, ptr, 4)
    v = fn.load("<16 x bfloat>", ptr, 2)
    return fn.val(f"fpext <16 x bfloat> {v} to {F32x16}")


def store_f32x16(fn: Function, v: str, ptr: str, dtype: str) -> None:
    """Store <16 x float> at ``ptr`` as "f32" or, rounded to nearest even, as "bf16"."""
    if dtype == "f32":
        fn.store(F32x16, v, ptr, 4)
    else:
        fn.store("<16 x bfloat>", fn.val(f"fptrunc {F32x16} {v} to <16 x bfloat>"), ptr, 2)


NONTEMPORAL_MD = "!7001"


def store_nontemporal(fn: Function, ty: str, v: str, ptr: str, align: int) -> None:
    """A streaming store: the line is written without being read first. ``ptr`` must be aligned to
    the vector's size; the stores are weakly ordered, so the kernel :func:`sfence`-s after them."""
    fn.module.declare("kt_jit.nontemporal", f"{NONTEMPORAL_MD} = !{{i32 1}}")
    fn.emit(f"store {ty} {v}, ptr {ptr}, align {align}, !nontemporal {NONTEMPORAL_MD}")


def store_bf16_streaming(fn: Function, v: str, ptr: str) -> None:
    """``v`` (<16 x float>) rounded to bf16 and written to ``ptr`` (32-byte aligned) with a streaming
    store. LLVM drops the non-temporal hint on stores of values that come from bfloat vectors (even
    through a bitcast or a ``freeze``: plain ``vmovaps`` in the assembly); an ``xor`` with a zero it
    cannot see through (a module global) keeps it."""
    zero = fn.module.declare("kt_zero_v4i64", "@kt_zero_v4i64 = weak global <4 x i64> zeroinitializer, align 32")
    h = fn.val(f"fptrunc {F32x16} {v} to <16 x bfloat>")
    bits = fn.val(f"xor <4 x i64> {bitcast(fn, h, '<16 x bfloat>', '<4 x i64>')}, {fn.load('<4 x i64>', zero, 32)}")
    store_nontemporal(fn, "<4 x i64>", bits, ptr, 32)


def sfence(fn: Function) -> None:
    """Order this thread's streaming stores before everything it does next."""
    fn.emit(f"call void {fn.module.declare('llvm.x86.sse.sfence', 'declare void @llvm.x86.sse.sfence()')}()")


def splat_f32(fn: Function, ptr: str, dtype: str, lanes: int = 16) -> str:
    """The scalar at ``ptr`` (f32 or bf16) broadcast to <lanes x float>."""
    if dtype == "f32":
        s = fn.load("float", ptr, 4)
    else:
        s = fn.val(f"fpext bfloat {fn.load('bfloat', ptr, 2)} to float")
    ty = f"<{lanes} x float>"
    v = fn.val(f"insertelement {ty} poison, float {s}, i64 0")
    return fn.val(f"shufflevector {ty} {v}, {ty} poison, <{lanes} x i32> zeroinitializer")


def fma(fn: Function, a: str, b: str, c: str) -> str:
    """a * b + c on <16 x float> (vfmadd)."""
    sym = fn.module.declare("llvm.fma.v16f32", f"declare {F32x16} @llvm.fma.v16f32({F32x16}, {F32x16}, {F32x16})")
    return fn.val(f"call {F32x16} {sym}({F32x16} {a}, {F32x16} {b}, {F32x16} {c})")


def splat_arg_f32(fn: Function, bits_i64: str) -> str:
    """A float passed as the low 32 bits of an i64 field, broadcast to <16 x float>."""
    s = fn.val(f"bitcast i32 {fn.val(f'trunc i64 {bits_i64} to i32')} to float")
    v = fn.val(f"insertelement {F32x16} poison, float {s}, i64 0")
    return fn.val(f"shufflevector {F32x16} {v}, {F32x16} poison, <16 x i32> zeroinitializer")


def f32_const(value: float) -> str:
    """A float constant operand: ``value`` rounded to float, written as LLVM's exact hex form."""
    import struct

    as_f32 = struct.unpack("<f", struct.pack("<f", value))[0]
    return f"0x{struct.unpack('<Q', struct.pack('<d', as_f32))[0]:016X}"


def f32_splat(value: float) -> str:
    """A constant <16 x float> operand (see :func:`f32_const`)."""
    return "<" + ", ".join([f"float {f32_const(value)}"] * 16) + ">"


def i32_splat_value(fn: Function, scalar: str) -> str:
    """A run-time i32 broadcast to <16 x i32>."""
    v = fn.val(f"insertelement {I32x16} poison, i32 {scalar}, i64 0")
    return fn.val(f"shufflevector {I32x16} {v}, {I32x16} poison, <16 x i32> zeroinitializer")


def i64_splat_value(fn: Function, scalar: str) -> str:
    """A run-time i64 broadcast to <8 x i64>."""
    v = fn.val(f"insertelement <8 x i64> poison, i64 {scalar}, i64 0")
    return fn.val(f"shufflevector <8 x i64> {v}, <8 x i64> poison, <8 x i32> zeroinitializer")


def f32_splat_value(fn: Function, scalar: str) -> str:
    """A run-time float broadcast to <16 x float>."""
    v = fn.val(f"insertelement {F32x16} poison, float {scalar}, i64 0")
    return fn.val(f"shufflevector {F32x16} {v}, {F32x16} poison, <16 x i32> zeroinitializer")


def exp_f32x16(fn: Function, x: str) -> str:
    """e^x on <16 x float>: 2^n * p(f) with x = n ln2 + f, |f| <= ln2/2, degree-6 polynomial
    (Cephes expf coefficients; ~1 ulp). Inputs are clamped to [-87.3, 88.0]."""
    x = fn.val(f"call {F32x16} @llvm.maxnum.v16f32({F32x16} {x}, {F32x16} {f32_splat(-87.3)})")
    x = fn.val(f"call {F32x16} @llvm.minnum.v16f32({F32x16} {x}, {F32x16} {f32_splat(88.0)})")
    for name in ("maxnum", "minnum", "roundeven"):
        args = ", ".join([F32x16] * (1 if name == "roundeven" else 2))
        fn.module.declare(f"llvm.{name}.v16f32", f"declare {F32x16} @llvm.{name}.v16f32({args})")
    n = fn.val(f"call {F32x16} @llvm.roundeven.v16f32({F32x16} {fmul(fn, x, f32_splat(1.4426950408889634))})")
    f = fma(fn, n, f32_splat(-0.693359375), x)
    f = fma(fn, n, f32_splat(2.12194440e-4), f)
    p = f32_splat(1.9875691500e-4)
    for c in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
        p = fma(fn, p, f, f32_splat(c))
    f2 = fmul(fn, f, f)
    p = fma(fn, p, f2, fadd(fn, f, f32_splat(1.0)))
    ni = fn.val(f"fptosi {F32x16} {n} to {I32x16}")
    biased = fn.val(f"add {I32x16} {ni}, <{i32x16_const([127] * 16)[1:-1]}>")
    bits = fn.val(f"shl {I32x16} {biased}, <{i32x16_const([23] * 16)[1:-1]}>")
    return fmul(fn, p, bitcast(fn, bits, I32x16, F32x16))


def sigmoid_f32x16(fn: Function, x: str) -> str:
    """1 / (1 + e^-x) on <16 x float>."""
    e = exp_f32x16(fn, fn.val(f"fneg {F32x16} {x}"))
    return fn.val(f"fdiv {F32x16} {f32_splat(1.0)}, {fadd(fn, e, f32_splat(1.0))}")

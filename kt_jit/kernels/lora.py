"""Grouped small GEMMs for LoRA, reading adapter weights in their native (PyTorch) layout.

LoRA tensors are trainable Parameters that an optimizer updates in place, so these kernels never
pack or copy them: every call reads the current storage through a pointer. Three forms cover every
LoRA product of the forward and backward pass (r = rank, small; m = tokens of one expert):

- ``xat``: ``Y[m, N] (+)= alpha * X[m, K] @ W^T`` with ``W [N, K]`` row-major (nn.Linear layout).
  Dot form: both operands run along K, so ``vdpbf16ps`` accumulates partial sums in lanes that a
  shuffle fold reduces per 16 outputs. K = 16 (two W rows per vector) or a multiple of 32.
- ``xb``: ``Y[m, N] (+)= alpha * X[m, K] @ B`` with ``B [K, N]`` row-major (bf16). Outer form: with
  bf16 X and even K, the pair (X[m, k], X[m, k+1]) broadcast against rows k and k+1 of B
  interleaved into pairs (``vdpbf16ps``; X rows then 4-byte aligned); else X[m, k] broadcast times
  a row of B, fp32 FMA. X is fp32 or bf16. Non-accumulating, it may also store a bf16 copy of Y
  (``copy_bf16``: a 5th group field, the copy's first row; its pitch is ``ldz``).
- ``xty``: ``C[A, B] = alpha * P[m, A]^T @ diag(s) Q[m, B]`` (reduction over the tokens; ``s`` an
  optional fp32 weight per token, else 1): LoRA weight gradients. Outer form with fp32 FMA; P and Q
  fp32 or bf16. With ``token_pairs`` (the MoE backward's gradients) the products are bf16 over
  pairs of tokens instead (``vdpbf16ps``, two tokens per instruction): P and s Q (or s P for fp32
  P) are rounded to bf16 first, the sums stay fp32.

Non-accumulating ``xat`` and ``xty`` may store bf16 (rounded once from the fp32 sums).

Groups are ``(x, w, y, m)`` as in kernels/gemm.py (for ``xty``: ``(p, q, c, m)``, with row weights
``(p, q, c, m, s)``: s the address of the group's first weight); row pitches in bytes and ``alpha``
travel in the argument block. These run on AVX-512 (every AMX CPU has it).
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

import numpy as np

from ..codegen import avx512 as vx
from ..codegen.ir import BF16x32, F32x16, Function, I16x32
from ..codegen.worker import ArgBlock, compile_worker, f32_field, group_table, worker_module
from .gemm import either, row_blocks

ARGS = ArgBlock(["groups", "ldx", "ldw", "ldy", "alpha", "ldz"])
DTYPES = ("f32", "bf16")


@dataclass(frozen=True)
class LoraSpec:
    """One small-GEMM kernel: ``form`` in {"xat", "xb", "xty"}, output dims, operand dtypes."""

    form: str
    n: int               # output columns (xat, xb) / B dim (xty)
    k: int               # reduction (xat, xb) / A dim (xty)
    x_dtype: str = "bf16"
    w_dtype: str = "bf16"
    accumulate: bool = False
    y_dtype: str = "f32"  # xat / xty may store bf16 directly
    row_scale: bool = False  # xty: a per-token fp32 factor on Q's rows (P's with token_pairs and fp32 P; a 5th field)
    copy_bf16: bool = False  # xb: also store bf16(Y) (a 5th group field)
    token_pairs: bool = False  # xty: bf16 products over token pairs (operands rounded to bf16 first)

    def __post_init__(self) -> None:
        if self.form not in ("xat", "xb", "xty"):
            raise ValueError(f"unknown LoRA kernel form {self.form!r}")
        if self.y_dtype == "bf16" and (self.form == "xb" or self.accumulate):
            raise ValueError("bf16 output is only for non-accumulating xat and xty kernels")
        if self.x_dtype not in DTYPES or self.w_dtype not in DTYPES or self.y_dtype not in DTYPES:
            raise ValueError(f"dtypes must be in {DTYPES}")
        if self.n % 16 or self.n <= 0:
            raise ValueError(f"{self.form}: N={self.n} must be a positive multiple of 16")
        if self.form == "xat" and not (self.k == 16 or self.k % 32 == 0):
            raise ValueError(f"xat: K={self.k} must be 16 or a multiple of 32")
        if self.form == "xty" and self.k % 8:
            raise ValueError(f"xty: A={self.k} must be a multiple of 8")
        if self.row_scale and self.form != "xty":
            raise ValueError("row weights are only for xty kernels")
        if self.form == "xb" and self.w_dtype != "bf16":
            raise ValueError("xb kernels read B as bf16")
        if self.token_pairs and self.form != "xty":
            raise ValueError("token pairs are only for xty kernels")
        if self.copy_bf16 and (self.form != "xb" or self.accumulate or self.y_dtype != "f32"):
            raise ValueError("a bf16 copy of the output is only for non-accumulating xb kernels")

    @property
    def name(self) -> str:
        acc = "_acc" if self.accumulate else ""
        rs = "_rs" if self.row_scale else ""
        cp = "_cp16" if self.copy_bf16 else ""
        tp = "_tp" if self.token_pairs else ""
        return f"lora_{self.form}_n{self.n}_k{self.k}_{self.x_dtype}_{self.w_dtype}_{self.y_dtype}{acc}{rs}{cp}{tp}"

    @property
    def group_fields(self) -> int:
        return 5 if self.row_scale or self.copy_bf16 else 4

    @property
    def nb(self) -> int:
        """16-wide output vectors per column block (xat, xb) or per tile row (xty; the 8 x 32 shape
        of a 64-column tile)."""
        if self.form == "xat":
            return 1
        return 4 if self.n % 64 == 0 and self.form == "xb" else (2 if self.n % 32 == 0 else 1)

    @property
    def a_block(self) -> int:
        """xty: rows of C per tile."""
        return 8 if self.nb == 2 else 16 if self.k % 16 == 0 else 8

    @property
    def tile_cols(self) -> int:
        """xty: columns of C per tile (a_block rows): 64 when B is a multiple of 1024 (see
        XTY_WIDE_MAX), else 16 * nb."""
        return 64 if self.nb == 2 and self.n % 1024 == 0 else 16 * self.nb

    @property
    def units(self) -> int:
        """xty: (a-block, b-block) output tiles per group."""
        return self.n // self.tile_cols * (self.k // self.a_block)

    @property
    def units_per_item(self) -> int:
        """xty: tiles per work item: up to XTY_ITEM_OUTPUTS outputs (each claim is a contended atomic)."""
        return max(1, min(XTY_ITEM_OUTPUTS // (self.a_block * self.tile_cols), self.units))

    @property
    def col_blocks(self) -> int:
        """xat/xb: output column blocks (of 16 * nb) per group."""
        return self.n // (16 * self.nb)

    @property
    def blocks_per_item(self) -> int:
        """xat/xb: column blocks per work item (items must not be tiny: each claim is a contended atomic)."""
        return min(8, self.col_blocks)

    @property
    def items_per_group(self) -> int:
        if self.form == "xty":
            return -(-self.units // self.units_per_item)
        return -(-self.col_blocks // self.blocks_per_item)


def _group(fn: Function, ctx: str, item: str, ipg: int, fields: int = 4):
    """(item within its group, x, w, y, m[, s]) of the claimed item's group descriptor."""
    g = fn.val(f"udiv i64 {item}, {ipg}")
    c = fn.val(f"urem i64 {item}, {ipg}")
    desc = fn.gep(ARGS.load_ptr(fn, ctx, "groups"), fn.mul(g, 8 * fields))
    ptrs = [fn.load("ptr", fn.gep(desc, 8 * f), 8) for f in (0, 1, 2)]
    extra = [fn.load("ptr", fn.gep(desc, 32), 8)] if fields > 4 else []
    return (c, *ptrs, fn.load("i64", fn.gep(desc, 24), 8), *extra)


def _finish(fn: Function, spec: LoraSpec, v: str, alpha: str, ptr: str) -> None:
    v = vx.fmul(fn, v, alpha)
    if spec.y_dtype == "bf16":
        vx.store_f32x16(fn, v, ptr, "bf16")
        return
    if spec.accumulate:
        v = vx.fadd(fn, v, fn.load(F32x16, ptr, 4))
    fn.store(F32x16, v, ptr, 4)


def _blocked_body(spec: LoraSpec, block):
    """Worker body for xat/xb: run ``block`` on each output column block of the claimed item."""
    def body(fn: Function, ctx: str, item: str, tiles) -> None:
        item_c, x, w, y, m, *z = _group(fn, ctx, item, spec.items_per_group, spec.group_fields)
        ldx, ldy = ARGS.load(fn, ctx, "ldx"), ARGS.load(fn, ctx, "ldy")
        alpha = vx.splat_arg_f32(fn, ARGS.load(fn, ctx, "alpha"))
        copy = (z[0], ARGS.load(fn, ctx, "ldz")) if z else None
        b0 = fn.mul(item_c, spec.blocks_per_item)
        with fn.loop(b0, fn.min(fn.add(b0, spec.blocks_per_item), spec.col_blocks), name="cb") as c:
            block(fn, spec, c, x, w, y, m, ldx, ldy, alpha, *([copy] if copy else []))

    return body


def row_a_product(fn: Function, xrow: str, a: str, k: int, rank: int, hrow: str, alpha: str) -> None:
    """``hrow[:rank] = bf16(alpha * xrow[:k] @ A^T)`` for one bf16 row (``k`` a multiple of 32)
    against ``A [rank, k]`` bf16 (row-major, ``rank`` a multiple of 16); ``alpha`` a splat vector.
    For kernels that compute an adapter's A-product of each row they write (one row at a time:
    fine while an expert has few rows, as each row rereads A). Dot form: 16 adapter rows per pass,
    their partial sums in the lanes of 16 accumulators over 32-wide chunks, folded once."""
    for a0 in range(0, rank, 16):
        accs = [fn.var(F32x16, "zeroinitializer", 64) for _ in range(16)]
        with fn.loop(0, k, 32, name="ac") as c:
            xv = fn.load(BF16x32, fn.gep(xrow, fn.mul(c, 2)), 2)
            for i, acc in enumerate(accs):
                w = fn.load(BF16x32, fn.gep(a, fn.add(fn.mul(c, 2), (a0 + i) * k * 2)), 2)
                acc.set(vx.dpbf16(fn, acc.get(), w, xv))
        out = vx.fmul(fn, vx.reduce_lanes(fn, [acc.get() for acc in accs]), alpha)
        vx.store_f32x16(fn, out, fn.gep(hrow, a0 * 2), "bf16")


XAT_MR = 8  # xat: token rows per pass over a W row (their X rows stay in L1)
XAT_PREFETCH = 1024  # xat: bytes ahead along the W row being streamed


def _xat_block(fn: Function, spec: LoraSpec, c: str, x: str, w: str, y: str, m: str, ldx: str, ldy: str,
               alpha: str) -> None:
    """Outputs 16c .. 16c+15 of every row."""
    if spec.k == 16:
        _xat_pairs_block(fn, spec, c, x, w, y, m, ldx, ldy, alpha)
        return
    # W rows are read one at a time, front to back (one contiguous stream, not 16 interleaved
    # ones): each row's dot products with up to XAT_MR token rows stay as lane partials, staged
    # per (token, output); the 16 staged vectors of a token row then fold to its 16 outputs.
    chunks = spec.k // 32
    wb = fn.gep(w, fn.mul(c, 16 * spec.k * 2))
    stage = fn.alloca("i8", 64, XAT_MR * 16 * 64)
    ysz = 4 if spec.y_dtype == "f32" else 2

    def micro(m0: str, rows: int) -> None:
        xrows = [fn.gep(x, fn.mul(fn.add(m0, i), ldx)) for i in range(rows)]
        wa = 8 if rows == 1 else 16 // rows  # W rows side by side: 8-16 dpbf16 chains hide its latency
        with fn.loop(0, 16, wa, name="wa") as a0:
            wrow = fn.gep(wb, fn.mul(a0, spec.k * 2))
            accs = [[fn.var(F32x16, "zeroinitializer", 64) for _ in range(wa)] for _ in range(rows)]
            with fn.loop(0, chunks, name="kc") as kc:
                wps = [fn.gep(wrow, fn.add(fn.mul(kc, 64), a * spec.k * 2)) for a in range(wa)]
                for wp in wps:
                    vx.prefetch(fn, fn.gep(wp, XAT_PREFETCH))
                wv = [fn.load(BF16x32, wp, 2) for wp in wps]
                for xrow, row_accs in zip(xrows, accs, strict=True):
                    xv = fn.load(BF16x32, fn.gep(xrow, fn.mul(kc, 64)), 2)
                    for acc, w_a in zip(row_accs, wv, strict=True):
                        acc.set(vx.dpbf16(fn, acc.get(), w_a, xv))
            for i, row_accs in enumerate(accs):
                for a, acc in enumerate(row_accs):
                    fn.store(F32x16, acc.get(), fn.gep(stage, fn.mul(fn.add(a0, 16 * i + a), 64)), 64)
        for i in range(rows):
            out = vx.reduce_lanes(fn, [fn.load(F32x16, fn.gep(stage, (16 * i + a) * 64), 64) for a in range(16)])
            _finish(fn, spec, out, alpha, fn.gep(y, fn.add(fn.mul(fn.add(m0, i), ldy), fn.mul(c, 16 * ysz))))

    row_blocks(fn, m, XAT_MR, micro)


def _xat_pairs_block(fn: Function, spec: LoraSpec, c: str, x: str, w: str, y: str, m: str, ldx: str, ldy: str,
                     alpha: str) -> None:
    """K = 16: two W rows per vector against the token row twice; 8 accumulators fold to 16 outputs."""
    wb = fn.gep(w, fn.mul(c, 16 * spec.k * 2))
    with fn.loop(0, m, name="row") as i:
        xrow = fn.gep(x, fn.mul(i, ldx))
        h = fn.load("<16 x bfloat>", xrow, 2)
        xv = fn.val(f"shufflevector <16 x bfloat> {h}, <16 x bfloat> poison, "
                    f"<32 x i32> <{', '.join(f'i32 {j % 16}' for j in range(32))}>")
        accs = [vx.dpbf16(fn, "zeroinitializer", fn.load(BF16x32, fn.gep(wb, a * 2 * spec.k * 2), 2), xv)
                for a in range(8)]
        out = vx.reduce_lanes(fn, accs)
        ysz = 4 if spec.y_dtype == "f32" else 2
        _finish(fn, spec, out, alpha, fn.gep(y, fn.add(fn.mul(i, ldy), fn.mul(c, 16 * ysz))))


# xb pair form: rows of B ahead to request, tuned for N = the LoRA rank (B one stream per work item;
# kernel A/B, rank 16, cold B, against no prefetch: 32 rows -5..-20%, 128 -7..-27%; 64 and 256 no
# better than 128)
XB_PREFETCH_ROWS = 128


def _xb_pair_form(spec: LoraSpec) -> bool:
    """Whether an xb kernel takes two k per step (bf16 pair dot products)."""
    return spec.form == "xb" and spec.x_dtype == "bf16" and spec.k % 2 == 0


def _xb_pairs(fn: Function, spec: LoraSpec, brow: str, j: int) -> str:
    """B rows k and k+1 (at ``brow``), columns 16j .. 16j+15 of the block, as 16 lanes of (B[k, l],
    B[k+1, l]) pairs: what ``vdpbf16ps`` multiplies against a broadcast (X[i, k], X[i, k+1])."""
    pairs = vx.interleave_words_at(fn, fn.gep(brow, j * 32), fn.gep(brow, spec.n * 2 + j * 32))
    return vx.bitcast(fn, pairs, I16x32, BF16x32)


def _xb_block(fn: Function, spec: LoraSpec, c: str, x: str, w: str, y: str, m: str, ldx: str, ldy: str,
              alpha: str, copy: tuple[str, str] | None = None) -> None:
    """Output columns 16*nb*c .. of every row (``copy``: the bf16 copy's first row and pitch).

    bf16 X and B, K even (the MoE backward's T = dY B): two k per step as a bf16 pair dot product
    against a broadcast pair of X, B rows interleaved into pairs by one shuffle per 16 columns, and
    the B stream prefetched. Otherwise one k per step: X[i, k] broadcast times B's row, fp32 FMA."""
    nb = spec.nb
    mr = max(1, min(8, 24 // nb))
    xsz = 4 if spec.x_dtype == "f32" else 2
    wb = fn.gep(w, fn.mul(c, nb * 32))
    yb = fn.gep(y, fn.mul(c, nb * 64))
    pairs = _xb_pair_form(spec)
    # the lines of B one step reads: two rows of the block, one run when the block is the whole row
    lines = range(0, 2 * nb * 32, 64) if spec.n == 16 * nb else \
        sorted({r * spec.n * 2 + o for r in (0, 1) for o in range(0, nb * 32, 64)})

    def micro(m0: str, rows: int) -> None:
        accs = {(i, j): fn.var(F32x16, "zeroinitializer", 64) for i in range(rows) for j in range(nb)}
        with fn.loop(0, spec.k, 2 if pairs else 1, name="k") as kk:
            brow = fn.gep(wb, fn.mul(kk, spec.n * 2))
            if pairs:
                for off in lines:
                    vx.prefetch(fn, fn.gep(brow, XB_PREFETCH_ROWS * spec.n * 2 + off))
                bv = [_xb_pairs(fn, spec, brow, j) for j in range(nb)]
            else:
                bv = [vx.load_f32x16(fn, fn.gep(brow, j * 32), "bf16") for j in range(nb)]
            for i in range(rows):
                xp = fn.gep(x, fn.add(fn.mul(fn.add(m0, i), ldx), fn.mul(kk, xsz)))
                xs = vx.bcast_pair(fn, xp) if pairs else vx.splat_f32(fn, xp, spec.x_dtype)
                for j in range(nb):
                    acc = accs[i, j]
                    acc.set(vx.dpbf16(fn, acc.get(), bv[j], xs) if pairs else vx.fma(fn, xs, bv[j], acc.get()))
        for (i, j), acc in accs.items():
            _finish(fn, spec, acc.get(), alpha, fn.gep(yb, fn.add(fn.mul(fn.add(m0, i), ldy), j * 64)))
            if copy is not None:
                zrow = fn.gep(copy[0], fn.add(fn.mul(fn.add(m0, i), copy[1]), fn.mul(c, nb * 32)))
                vx.store_f32x16(fn, vx.fmul(fn, acc.get(), alpha), fn.gep(zrow, j * 32), "bf16")

    row_blocks(fn, m, mr, micro)


# xty: outputs per work item (at rank 16 and hidden size 2048, a group's whole A or B gradient; 7168:
# 4 items). Kernel alone on Zen 4 (2 threads), qwen3's A gradients into cold memory, against 4096:
# 81 experts x 1-3 tokens -15..-17%, 128 x ~8 tokens -13%; MoE backward (int4, qwen3) qlen 1 -1..-3%,
# 16 -2%, 128 -1%. Hosts with many threads get fewer items than threads only where the gradients are
# small (e.g. qlen 1: 16 items of 64 KB, a few microseconds either way).
XTY_ITEM_OUTPUTS = 32768
XTY_PREFETCH_UNITS = 2  # xty: prefetch distance along a token row, in tiles
# xty with B a multiple of 1024 (an adapter A's gradient, B = hidden size): in a group of at most
# this many tokens an item's tiles are 4 x 64 (numbered row by row over the group, so they cover
# whole rows or runs of rows, stored a full line at a time), with more tokens 8 x 32 (half as many Q
# vectors converted from bf16 per FMA); either way XTY_ITEM_OUTPUTS outputs per item.
# Kernel alone on Zen 5, B=2048, 256 experts' gradients into cold memory, steady state (each variant
# also pays the write-back of its own earlier output): 4 x 64 against 8 x 32, 1 token -3..-6%,
# 4 -11%, 8 -24..-29%, 16 -15%, 32 +5%, 64 +10%. B=768 (runs of 1.5 KB cross rows): no gain.
XTY_WIDE_MAX = 16
# The bf16 outputs of xty (the LoRA weight gradients) are written with streaming stores (32 bytes,
# vx.store_bf16_streaming): each gradient line is written once, so a normal store's
# read-for-ownership only doubles the traffic. MoE backward, qwen3, two package copies with the
# variant in either copy (Zen 5), for the A gradients' tiles: fast memory mode qlen 1 and 16
# -2.5..-4%, slow mode -0.1..-0.8%, qlen 128 +-0%; the demo's training step (optimizer included)
# the same; the B gradients' 32-byte rows too: another -0.9..-1.2% at qlen 1 and 16 (both
# orderings). Earlier sessions saw no gain because LLVM had dropped the hint (see that function).
# The output must be 32-byte aligned (checked at launch; tests check the assembly).


def _xty_unit(fn: Function, spec: LoraSpec, ops: tuple, a0: str, b0: str, ab: int, nb: int, prefetch: int) -> None:
    """C[a0:a0+ab, b0:b0+16nb] = alpha * sum over the m tokens of P[t, a] s[t] Q[t, b] (fp32 sums;
    bf16 output is rounded once and written with 32-byte streaming stores).
    ``prefetch``: bytes ahead along each token's Q row to request (0: P's row instead)."""
    p, q, out, m, rs, ldp, ldq, alpha = ops
    psz = 4 if spec.x_dtype == "f32" else 2
    qsz = 4 if spec.w_dtype == "f32" else 2
    accs = {(a, j): fn.var(F32x16, "zeroinitializer", 64) for a in range(ab) for j in range(nb)}
    with fn.loop(0, m, name="tok") as t:
        qrow = fn.gep(q, fn.add(fn.mul(t, ldq), fn.mul(b0, qsz)))
        qv = [vx.load_f32x16(fn, fn.gep(qrow, j * 16 * qsz), spec.w_dtype) for j in range(nb)]
        if rs:
            wt = vx.splat_f32(fn, fn.gep(rs[0], fn.mul(t, 4)), "f32")
            qv = [vx.fmul(fn, v, wt) for v in qv]
        prow = fn.gep(p, fn.add(fn.mul(t, ldp), fn.mul(a0, psz)))
        # the rows are far apart (a token's row is K or N wide): the next tiles' slices of this
        # row are prefetched, else every tile waits on m cold lines in m pages
        vx.prefetch(fn, fn.gep(qrow, prefetch) if prefetch else fn.gep(prow, XTY_PREFETCH_UNITS * ab * psz))
        for a in range(ab):
            pv = vx.splat_f32(fn, fn.gep(prow, a * psz), spec.x_dtype)
            for j in range(nb):
                acc = accs[a, j]
                acc.set(vx.fma(fn, pv, qv[j], acc.get()))
    _xty_store(fn, spec, accs, out, a0, b0, ab, nb, alpha)


def _pair_rows(fn: Function, row0: str, row1: str | None, count: int, dtype: str,
               scales: tuple[str, str] | None) -> str:
    """``count`` values of two token rows (f32 or bf16; ``row1`` None: zeros) interleaved into bf16
    pairs, element 2i = row0[i], 2i+1 = row1[i], as <2 count x bfloat>; with ``scales`` (two
    <count x float> splats) each row is first multiplied by its own, in fp32, and rounded once."""
    half, full = f"<{count} x float>", f"<{2 * count} x float>"
    interleave = [i // 2 + (count if i % 2 else 0) for i in range(2 * count)]
    if dtype == "bf16" and scales is None:
        ty = f"<{count} x bfloat>"
        second = fn.load(ty, row1, 2) if row1 is not None else "zeroinitializer"
        return vx.shuffle(fn, ty, fn.load(ty, row0, 2), second, interleave)

    def load(row: str, scale: str | None) -> str:
        if dtype == "f32":
            v = fn.load(half, row, 4)
        else:
            v = fn.val(f"fpext <{count} x bfloat> {fn.load(f'<{count} x bfloat>', row, 2)} to {half}")
        return fn.val(f"fmul {half} {v}, {scale}") if scale is not None else v

    first = load(row0, scales[0] if scales else None)
    second = load(row1, scales[1] if scales else None) if row1 is not None else "zeroinitializer"
    pairs = vx.shuffle(fn, half, first, second, interleave)
    return fn.val(f"fptrunc {full} {pairs} to <{2 * count} x bfloat>")


XTY_PAIR_CHUNK = 32  # token pairs whose P pairs are staged before their products (see below)


def _xty_pairs_unit(fn: Function, spec: LoraSpec, ops: tuple, a0: str, b0: str, ab: int, nb: int,
                    prefetch: int) -> None:
    """:func:`_xty_unit` with bf16 products over token pairs (``LoraSpec.token_pairs``): per pair
    (t, t+1), P's ab values of both tokens interleaved into bf16 pairs and Q's 16 nb likewise;
    ``vdpbf16ps`` adds both tokens' products per lane, two per instruction where the fp32 form has
    one FMA per token. The row weights scale P's rows when P is fp32 (one rounding of the
    product), else Q's.

    P's pairs are staged on the stack for up to XTY_PAIR_CHUNK token pairs before their products
    run, each read back as the embedded-broadcast operand of its dots (one copy per Q vector:
    LLVM would merge two reads of one address into a separate broadcast instruction, 1.3x slower
    on Zen 4). Staging each pair just before its dots made every broadcast wait on the store it
    reads from: kernel alone on Zen 4, A 16 x B 2048 in L2, 128 tokens, 0.22 TF against 0.38 with
    the broadcasts not waiting on a store (wrong numbers, as a bound); staged per chunk 0.27 (the
    fp32 form 0.18-0.20)."""
    p, q, out, m, rs, ldp, ldq, alpha = ops
    psz = 4 if spec.x_dtype == "f32" else 2
    qsz = 4 if spec.w_dtype == "f32" else 2
    scale_p = bool(rs) and spec.x_dtype == "f32"
    accs = {(a, j): fn.var(F32x16, "zeroinitializer", 64) for a in range(ab) for j in range(nb)}
    staged = fn.alloca("i8", 64, XTY_PAIR_CHUNK * nb * 64)
    # the broadcasts read the stage through an offset LLVM cannot see (else it forwards the
    # stored pairs into shuffles; see kernels/gemm._bwd_lanes_item)
    bcast = fn.gep(staged, vx.opaque_zero(fn))

    def splats(t: str, pair: bool, count: int) -> tuple[str, str]:
        """The row weights of tokens t and t+1 (zero without a second token)."""
        return (vx.splat_f32(fn, fn.gep(rs[0], fn.mul(t, 4)), "f32", count),
                vx.splat_f32(fn, fn.gep(rs[0], fn.mul(fn.add(t, 1), 4)), "f32", count) if pair else "zeroinitializer")

    def stage(t: str, pair: bool, slot: str) -> None:
        """P's pairs of tokens t, t+1 into stage slot ``slot`` (nb copies)."""
        prows = [fn.gep(p, fn.add(fn.mul(r, ldp), fn.mul(a0, psz))) for r in ((t, fn.add(t, 1)) if pair else (t,))]
        if not prefetch:
            for pr in prows:
                vx.prefetch(fn, fn.gep(pr, XTY_PREFETCH_UNITS * ab * psz))
        ppairs = _pair_rows(fn, prows[0], prows[1] if pair else None, ab, spec.x_dtype,
                            splats(t, pair, ab) if scale_p else None)
        for j in range(nb):
            fn.store(f"<{2 * ab} x bfloat>", ppairs, fn.gep(staged, fn.add(fn.mul(slot, nb * 64), 64 * j)), 64)

    def products(t: str, pair: bool, slot: str) -> None:
        """accs += the products of tokens t, t+1 (P's pairs from stage slot ``slot``)."""
        qrows = [fn.gep(q, fn.add(fn.mul(r, ldq), fn.mul(b0, qsz))) for r in ((t, fn.add(t, 1)) if pair else (t,))]
        if prefetch:
            for qr in qrows:
                vx.prefetch(fn, fn.gep(qr, prefetch))
        scales = splats(t, pair, 16) if rs and not scale_p else None
        qpairs = [_pair_rows(fn, fn.gep(qrows[0], 16 * j * qsz), fn.gep(qrows[1], 16 * j * qsz) if pair else None,
                             16, spec.w_dtype, scales)
                  for j in range(nb)]
        slot_bytes = fn.gep(bcast, fn.mul(slot, nb * 64))
        for a in range(ab):
            for j in range(nb):
                acc = accs[a, j]
                acc.set(vx.dpbf16(fn, acc.get(), qpairs[j], vx.bcast_pair(fn, fn.gep(slot_bytes, 64 * j + 4 * a))))

    pairs = fn.val(f"udiv i64 {m}, 2")
    with fn.loop(0, pairs, XTY_PAIR_CHUNK, name="tpc") as c0:
        count = fn.min(fn.sub(pairs, c0), XTY_PAIR_CHUNK)
        with fn.loop(0, count, name="tps") as i:
            stage(fn.mul(fn.add(c0, i), 2), True, i)
        with fn.loop(0, count, name="tpp") as i:
            products(fn.mul(fn.add(c0, i), 2), True, i)
    with fn.if_then(fn.icmp("ne", fn.val(f"and i64 {m}, 1"), 0), name="todd"):
        stage(fn.sub(m, 1), False, "0")
        products(fn.sub(m, 1), False, "0")
    _xty_store(fn, spec, accs, out, a0, b0, ab, nb, alpha)


def _xty_store(fn: Function, spec: LoraSpec, accs: dict, out: str, a0: str, b0: str, ab: int, nb: int,
               alpha: str) -> None:
    """C[a0:a0+ab, b0:b0+16nb] = alpha * accs (bf16: rounded once, 32-byte streaming stores)."""
    ysz = 4 if spec.y_dtype == "f32" else 2
    for a in range(ab):
        row = fn.gep(out, fn.mul(fn.add(fn.mul(fn.add(a0, a), spec.n), b0), ysz))
        if spec.y_dtype == "bf16":
            for j in range(nb):
                vx.store_bf16_streaming(fn, vx.fmul(fn, accs[a, j].get(), alpha), fn.gep(row, j * 32))
            continue
        for j in range(nb):
            _finish(fn, spec, accs[a, j].get(), alpha, fn.gep(row, j * 16 * ysz))


def _xty_body(spec: LoraSpec):
    nb, ab, tc = spec.nb, spec.a_block, spec.tile_cols
    cols = spec.n // tc
    qsz = 4 if spec.w_dtype == "f32" else 2
    ahead = XTY_PREFETCH_UNITS * tc * qsz if cols > 1 else 0

    unit_form = _xty_pairs_unit if spec.token_pairs else _xty_unit

    def body(fn: Function, ctx: str, item: str, tiles) -> None:
        c, p, q, out, m, *rs = _group(fn, ctx, item, spec.items_per_group, spec.group_fields)
        ops = (p, q, out, m, rs, ARGS.load(fn, ctx, "ldx"), ARGS.load(fn, ctx, "ldw"),
               vx.splat_arg_f32(fn, ARGS.load(fn, ctx, "alpha")))
        u0 = fn.mul(c, spec.units_per_item)
        u1 = fn.min(fn.add(u0, spec.units_per_item), spec.units)

        def each_tile(first: str, end: str, rows: int, width: int, emit) -> None:
            """emit(a0, b0) for tiles first..end-1 of ``rows`` x ``width``, in row-major order."""
            per_row = spec.n // width
            with fn.loop(first, end, name="unit") as u:
                a0, b0 = fn.val(f"udiv i64 {u}, {per_row}"), fn.val(f"urem i64 {u}, {per_row}")
                emit(fn.mul(a0, rows), fn.mul(b0, width))

        def wide_or_narrow(wide: bool) -> None:
            # twice as many tiles of half the size, numbered row by row over the group: 4 x 64
            # (half the rows, twice the run per row) or 8 x 32
            h, w = (4, 64) if wide else (8, 32)
            each_tile(fn.mul(u0, 2), fn.mul(u1, 2), h, w,
                  lambda a0, b0: unit_form(fn, spec, ops, a0, b0, h, w // 16, XTY_PREFETCH_UNITS * w * qsz))

        if tc == 16 * nb:
            each_tile(u0, u1, ab, tc, lambda a0, b0: unit_form(fn, spec, ops, a0, b0, ab, nb, ahead))
        else:
            either(fn, fn.icmp("ule", m, XTY_WIDE_MAX), wide_or_narrow)
        if spec.y_dtype == "bf16":  # (the streaming stores are weakly ordered)
            vx.sfence(fn)

    return body


def _body_of(spec: LoraSpec):
    return {"xat": lambda sp: _blocked_body(sp, _xat_block), "xb": lambda sp: _blocked_body(sp, _xb_block),
            "xty": _xty_body}[spec.form](spec)


def build_ir(spec: LoraSpec) -> str:
    """The kernel's LLVM IR module text (for inspection and assembly tests)."""
    return worker_module(spec.name, ARGS, _body_of(spec)).render()


class LoraKernel:
    def __init__(self, spec: LoraSpec) -> None:
        self.spec = spec
        self.addr = compile_worker(spec.name, repr(spec), ARGS, _body_of(spec))
        self.pair_x = _xb_pair_form(spec)
        self.streams_out = spec.form == "xty" and spec.y_dtype == "bf16"

    def launch(self, groups, ldx: int, ldw: int, ldy: int, alpha: float, num_threads: int | None = None,
               ldz: int = 0) -> None:
        """Run over ``groups`` (int64 [G, spec.group_fields], torch or NumPy); pitches in bytes (``ldz``:
        of the bf16 copy); ``alpha`` scales the product. The xb pair form (bf16 X, even K) reads X's
        pairs as 4-byte words: X's rows must start 4-byte aligned (``ldx`` a multiple of 4); xty's
        bf16 outputs are written with 32-byte streaming stores: each must start 32-byte aligned."""
        if self.pair_x and ldx % 4:
            raise ValueError(f"{self.spec.name}: ldx={ldx} must be a multiple of 4 bytes (X is read in bf16 pairs)")
        n_groups, addr = group_table(groups, self.spec.group_fields)
        if self.streams_out and n_groups:
            table = np.ctypeslib.as_array((ctypes.c_int64 * (n_groups * self.spec.group_fields)).from_address(addr))
            if (table.reshape(n_groups, -1)[:, 2] % 32).any():
                raise ValueError(f"{self.spec.name}: every output must start 32-byte aligned (streaming stores)")
        ARGS.run(self.addr, n_groups * self.spec.items_per_group, num_threads, keep=(groups,), groups=addr,
                 ldx=ldx, ldw=ldw, ldy=ldy, alpha=f32_field(alpha), ldz=ldz)


@functools.cache
def get_kernel(spec: LoraSpec) -> LoraKernel:
    """The compiled kernel for ``spec`` (memoised; compiled or loaded from the disk cache once)."""
    return LoraKernel(spec)


@functools.cache
def kernel_for(form: str, n: int, k: int, x_dtype: str = "bf16", w_dtype: str = "bf16", accumulate: bool = False,
               y_dtype: str = "f32", row_scale: bool = False, copy_bf16: bool = False,
               token_pairs: bool = False) -> LoraKernel:
    """:func:`get_kernel` of ``LoraSpec(form, n, k, ...)``, memoised on the arguments."""
    return get_kernel(LoraSpec(form, n, k, x_dtype, w_dtype, accumulate, y_dtype, row_scale, copy_bf16, token_pairs))

"""Per-row int16 quantization of bf16 activation rows, the input of the integer GEMMs.

The GEMMs of quantized weights multiply integer weight codes by int16 activations with
``vpdpwssd`` (int16 pairs, int32 accumulate): the weight row needs one sign extension instead of a
conversion to bf16 through fp32, which measured 1.2-1.7x faster than the bf16 path at 6-16 rows
per expert. Activations are quantized per row:

``q[i, :] = round(x[i, :] / s[i])`` with ``s[i] = max|x[i, :]| / ACT_MAX`` (round to nearest even).
With column scales (the transposed GEMMs of per-channel quantized weights, ``dX = (dY diag(c)) Q``),
each row is first multiplied by its own vector ``c`` (the row's expert's channel scales).

The error ``|x - q s| <= s / 2 = max|x| / 32766`` is far below bf16's own rounding of the row's large
elements (1/512 relative), so the forward stays within ~1e-4 of the computation on the bf16 input.
``ACT_MAX`` is 2^14 - 1, not 2^15 - 1, so that 2 * kc products of a K-chunk cannot overflow int32
(see ``gemm.GemmSpec``). A row whose largest magnitude is below ``TINY`` (2^-112, about 1.9e-34;
all-zero rows included) is scaled as if it were ``TINY``, so ``1/s`` stays finite: such rows keep
an absolute error below 6e-39 but lose their relative precision. A row holding inf gets
``s = inf`` and one holding NaN ``s = NaN`` (codes are clamped to ``±ACT_MAX``, never undefined), so
the GEMM output is not finite either, never a silently wrong number.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from ..codegen import avx512 as vx
from ..codegen.ir import F32x16, Function
from ..codegen.worker import ArgBlock, compile_worker, immediate_launches, listed_row
from ..runtime.buffers import aligned_empty

ACT_MAX = 16383
TINY = 2.0**-112  # smallest row maximum used for the scale: ACT_MAX / TINY is still a finite float
ROWS_PER_ITEM = 8
ARGS = ArgBlock(["dst", "src", "scales", "n", "idx", "cbase", "cstride", "cidx", "ld"])


@dataclass(frozen=True)
class RowQuantSpec:
    """Rows of ``cols`` bf16 (a multiple of 32; the row pitch is a launch argument); int16 out with
    the same pitch. ``col_scaled``: listed row j is first multiplied by the fp32 vector at
    ``cbase + cstride * cidx[j]`` (``cidx`` int64 per listed row, e.g. each row's expert)."""

    cols: int
    col_scaled: bool = False

    def __post_init__(self) -> None:
        if self.cols <= 0 or self.cols % 32:
            raise ValueError(f"cols={self.cols} must be a positive multiple of 32")

    @property
    def name(self) -> str:
        return f"rowquant_i16_c{self.cols}" + ("_cs" if self.col_scaled else "")


def _body(spec: RowQuantSpec):
    def body(fn: Function, ctx: str, item: str, tiles) -> None:
        dst, src, scales = (ARGS.load_ptr(fn, ctx, f) for f in ("dst", "src", "scales"))
        n, idx = ARGS.load(fn, ctx, "n"), ARGS.load_ptr(fn, ctx, "idx")
        cbase, cidx = ARGS.load_ptr(fn, ctx, "cbase"), ARGS.load_ptr(fn, ctx, "cidx")
        cstride, ld = ARGS.load(fn, ctx, "cstride"), ARGS.load(fn, ctx, "ld")
        fabs = fn.module.declare("llvm.fabs.v16f32", f"declare {F32x16} @llvm.fabs.v16f32({F32x16})")
        # maximum (not maxnum) propagates NaN, so a NaN row gets a NaN scale
        vmax = fn.module.declare("llvm.maximum.v16f32", f"declare {F32x16} @llvm.maximum.v16f32({F32x16}, {F32x16})")
        rmax = fn.module.declare("llvm.vector.reduce.fmaximum.v16f32",
                                 f"declare float @llvm.vector.reduce.fmaximum.v16f32({F32x16})")
        rint = fn.module.declare("llvm.roundeven.v16f32", f"declare {F32x16} @llvm.roundeven.v16f32({F32x16})")
        vmin_n = fn.module.declare("llvm.minnum.v16f32", f"declare {F32x16} @llvm.minnum.v16f32({F32x16}, {F32x16})")
        vmax_n = fn.module.declare("llvm.maxnum.v16f32", f"declare {F32x16} @llvm.maxnum.v16f32({F32x16}, {F32x16})")
        j0 = fn.mul(item, ROWS_PER_ITEM)
        with fn.loop(j0, fn.min(fn.add(j0, ROWS_PER_ITEM), n), name="j") as jj:
            j = listed_row(fn, idx, jj)
            srow = fn.gep(src, fn.mul(j, ld))
            crow = None
            if spec.col_scaled:
                crow = fn.gep(cbase, fn.mul(fn.load("i64", fn.gep(cidx, fn.mul(jj, 8)), 8), cstride))

            def load(col: str) -> str:
                v = vx.load_f32x16(fn, fn.gep(srow, fn.mul(col, 2)), "bf16")
                return vx.fmul(fn, v, fn.load(F32x16, fn.gep(crow, fn.mul(col, 4)), 4)) if crow else v
            drow = fn.gep(dst, fn.mul(j, ld))
            accs = [fn.var(F32x16, "zeroinitializer", 64) for _ in range(2)]  # two max chains
            with fn.loop(0, spec.cols, 32, name="c") as c:
                for h, acc in enumerate(accs):
                    a = fn.val(f"call {F32x16} {fabs}({F32x16} {load(fn.add(c, 16 * h))})")
                    acc.set(fn.val(f"call {F32x16} {vmax}({F32x16} {acc.get()}, {F32x16} {a})"))
            both = fn.val(f"call {F32x16} {vmax}({F32x16} {accs[0].get()}, {F32x16} {accs[1].get()})")
            amax = fn.val(f"call float {rmax}({F32x16} {both})")
            # below TINY (zero rows too): scale as TINY; "olt" is false for NaN, which stays
            tiny = vx.f32_const(TINY)
            amax = fn.val(f"select i1 {fn.val(f'fcmp olt float {amax}, {tiny}')}, float {tiny}, float {amax}")
            fn.store("float", fn.val(f"fdiv float {amax}, {float(ACT_MAX):e}"), fn.gep(scales, fn.mul(j, 4)), 4)
            inv = fn.val(f"fdiv float {float(ACT_MAX):e}, {amax}")  # 0 for inf, NaN for NaN
            invv = vx.f32_splat_value(fn, inv)
            lo, hi = vx.f32_splat(-float(ACT_MAX)), vx.f32_splat(float(ACT_MAX))
            with fn.loop(0, spec.cols, 16, name="q") as c:
                r = fn.val(f"call {F32x16} {rint}({F32x16} {vx.fmul(fn, load(c), invv)})")
                # clamped (NaN becomes a bound) so the conversion is always defined
                r = fn.val(f"call {F32x16} {vmin_n}({F32x16} {r}, {F32x16} {hi})")
                r = fn.val(f"call {F32x16} {vmax_n}({F32x16} {r}, {F32x16} {lo})")
                q = fn.val(f"fptosi {F32x16} {r} to <16 x i32>")
                fn.store("<16 x i16>", fn.val(f"trunc <16 x i32> {q} to <16 x i16>"), fn.gep(drow, fn.mul(c, 2)), 2)

    return body


class RowQuantKernel:
    def __init__(self, spec: RowQuantSpec) -> None:
        self.spec = spec
        self.addr = compile_worker(spec.name, repr(spec), ARGS, _body(spec))

    def launch(self, dst: int, src: int, scales: int, n: int, num_threads: int | None = None, idx: int = 0,
               col_scales: tuple[int, int, int] = (0, 0, 0), ld: int = 0) -> None:
        """Quantize ``n`` rows at ``src`` (bf16) into ``dst`` (int16) and ``scales`` (fp32): rows
        0..n-1, or with ``idx`` (address of int64 [n]) the rows listed there; ``col_scales``
        (``col_scaled`` kernels): (base address, stride in bytes, address of int64 [n]) placing the
        column-scale vector of each listed row; ``ld``: the row pitch of src and dst in bytes (0:
        contiguous)."""
        cbase, cstride, cidx = col_scales
        ARGS.run(self.addr, -(-n // ROWS_PER_ITEM), num_threads, dst=dst, src=src, scales=scales, n=n, idx=idx,
                 cbase=cbase, cstride=cstride, cidx=cidx, ld=ld or self.spec.cols * 2)


@functools.cache
def get_kernel(spec: RowQuantSpec) -> RowQuantKernel:
    """The compiled kernel for ``spec`` (memoised; from the disk cache after the first compile)."""
    return RowQuantKernel(spec)


def quantize_rows_into(src: int, ld: int, cols: int, dst: int, scales: int, n: int, idx: int = 0,
                       col_scales: tuple[int, int, int] | None = None) -> None:
    """Launch the row quantization on raw addresses (trusted): ``n`` bf16 rows of ``cols`` at
    ``src`` (pitch ``ld`` bytes; with ``idx``, the address of int64 [n], the rows listed there) into
    int16 rows at ``dst`` (same pitch) and fp32 ``scales``; ``col_scales`` = (base, stride in
    bytes, address of int64 [n] indices) first multiplies listed row j by the fp32 vector at
    ``base + stride * index[j]``."""
    get_kernel(RowQuantSpec(cols, col_scales is not None)).launch(dst, src, scales, n, idx=idx,
                                                                  col_scales=col_scales or (0, 0, 0), ld=ld)


def quantize_rows(x: torch.Tensor, rows: np.ndarray | None = None,
                  col_scales: tuple[torch.Tensor, np.ndarray] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [M, C]`` bf16 with unit column stride (C a multiple of 32) -> (``q [M, C]`` int16 with
    x's row stride, ``s [M]`` fp32) with ``x ~ q * s[:, None]``; 64-byte aligned outputs. ``rows``
    (int64, contiguous, values in [0, M), trusted): quantize only these rows (the others of q and s
    are left unset).
    ``col_scales = (vectors, which)``: quantized row j is first multiplied by ``vectors[which[j]]``
    (vectors fp32 [V, C] contiguous, which int64 NumPy [rows quantized], values in [0, V), trusted)."""
    if x.dim() != 2 or x.dtype != torch.bfloat16 or x.stride(1) != 1 or x.stride(0) < x.shape[1] \
            or x.device.type != "cpu":
        raise ValueError("quantize_rows takes a 2-D bfloat16 CPU tensor with contiguous rows")
    q = aligned_empty((x.shape[0], x.stride(0)), torch.int16)[:, :x.shape[1]]
    s = aligned_empty((x.shape[0],), torch.float32)
    if rows is not None and (not isinstance(rows, np.ndarray) or rows.dtype != np.int64 or rows.ndim != 1
                             or not rows.flags.c_contiguous):
        raise ValueError("rows must be a contiguous 1-D int64 NumPy array of row indices")
    n, idx = (x.shape[0], 0) if rows is None else (rows.size, rows.ctypes.data)
    cs = None
    if col_scales is not None:
        vectors, which = col_scales
        if not isinstance(which, np.ndarray) or which.dtype != np.int64 or which.shape != (n,) \
                or not which.flags.c_contiguous:
            raise ValueError(f"col_scales: which must be a contiguous int64 array [{n}] of vector indices")
        if vectors.dtype != torch.float32 or vectors.dim() != 2 or vectors.shape[1] != x.shape[1] \
                or not vectors.is_contiguous():
            raise ValueError(f"col_scales: vectors must be a contiguous float32 [V, {x.shape[1]}] tensor")
        cs = (vectors.data_ptr(), vectors.stride(0) * 4, which.ctypes.data)
    with immediate_launches():  # (returns what it computed)
        quantize_rows_into(x.data_ptr(), x.stride(0) * 2, x.shape[1], q.data_ptr(), s.data_ptr(), n, idx, cs)
    return q, s

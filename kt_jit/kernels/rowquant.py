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
ARGS = ArgBlock(["dst", "src", "scales", "n", "idx", "cscales", "ld"])


@dataclass(frozen=True)
class RowQuantSpec:
    """Rows of ``cols`` bf16 (a multiple of 32; the row pitch is a launch argument); int16 out with
    the same pitch. ``col_scaled``: row j is multiplied by the fp32 vector at ``cscales[j]`` (a
    pointer per listed row) first."""

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
        cscales, ld = ARGS.load_ptr(fn, ctx, "cscales"), ARGS.load(fn, ctx, "ld")
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
            crow = fn.load("ptr", fn.gep(cscales, fn.mul(jj, 8)), 8) if spec.col_scaled else None

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
               cscales: int = 0, ld: int = 0, keep: tuple = ()) -> None:
        """Quantize ``n`` rows at ``src`` (bf16) into ``dst`` (int16) and ``scales`` (fp32): rows
        0..n-1, or with ``idx`` (address of int64 [n]) the rows listed there; ``cscales``: address
        of int64 [n], the column-scale vector of each listed row (``col_scaled`` kernels); ``ld``: the
        row pitch of src and dst in bytes (0: contiguous)."""
        ARGS.run(self.addr, -(-n // ROWS_PER_ITEM), num_threads, keep, dst=dst, src=src, scales=scales, n=n, idx=idx,
                 cscales=cscales, ld=ld or self.spec.cols * 2)


@functools.cache
def get_kernel(spec: RowQuantSpec) -> RowQuantKernel:
    """The compiled kernel for ``spec`` (memoised; from the disk cache after the first compile)."""
    return RowQuantKernel(spec)


def quantize_rows_into(src: int, ld: int, cols: int, dst: int, scales: int, n: int, idx: int = 0,
                       col_scales=None) -> None:
    """Launch the row quantization on raw addresses (trusted): ``n`` bf16 rows of ``cols`` at
    ``src`` (pitch ``ld`` bytes; with ``idx``, the address of int64 [n], the rows listed there) into
    int16 rows at ``dst`` (same pitch) and fp32 ``scales``; ``col_scales`` (int64 NumPy [n] of
    vector addresses, kept alive by a deferred launch) first multiplies each row by its vector."""
    cs = col_scales.ctypes.data if col_scales is not None else 0
    get_kernel(RowQuantSpec(cols, col_scales is not None)).launch(dst, src, scales, n, idx=idx, cscales=cs, ld=ld,
                                                                  keep=(col_scales,))


def quantize_rows(x: torch.Tensor, rows: np.ndarray | None = None,
                  col_scales: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [M, C]`` bf16 with unit column stride (C a multiple of 32) -> (``q [M, C]`` int16 with
    x's row stride, ``s [M]`` fp32) with ``x ~ q * s[:, None]``; 64-byte aligned outputs. ``rows``
    (int64, contiguous, values in [0, M), trusted): quantize only these rows (the others of q and s
    are left unset).
    ``col_scales`` (int64 NumPy array, one entry per quantized row, trusted): the address of the
    fp32 [C] vector that row is multiplied by first."""
    if x.dim() != 2 or x.dtype != torch.bfloat16 or x.stride(1) != 1 or x.stride(0) < x.shape[1] \
            or x.device.type != "cpu":
        raise ValueError("quantize_rows takes a 2-D bfloat16 CPU tensor with contiguous rows")
    q = aligned_empty((x.shape[0], x.stride(0)), torch.int16)[:, :x.shape[1]]
    s = aligned_empty((x.shape[0],), torch.float32)
    if rows is not None and (not isinstance(rows, np.ndarray) or rows.dtype != np.int64 or rows.ndim != 1
                             or not rows.flags.c_contiguous):
        raise ValueError("rows must be a contiguous 1-D int64 NumPy array of row indices")
    n, idx = (x.shape[0], 0) if rows is None else (rows.size, rows.ctypes.data)
    if col_scales is not None and (col_scales.dtype != np.int64 or col_scales.shape != (n,)
                                   or not col_scales.flags.c_contiguous):
        raise ValueError(f"col_scales must be a contiguous int64 array [{n}] of vector addresses")
    with immediate_launches():  # (returns what it computed)
        quantize_rows_into(x.data_ptr(), x.stride(0) * 2, x.shape[1], q.data_ptr(), s.data_ptr(), n, idx, col_scales)
    return q, s

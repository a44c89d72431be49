"""Row gather and weighted row combine: the token <-> per-expert-row traffic around the expert GEMMs.

- ``gather``: ``dst[dst_idx[j], :] = src[src_idx[j], :]`` for ``j < n`` (src fp32 or bf16, dst bf16;
  fp32 is rounded to nearest even). Moves tokens into the per-expert row buffers.
- ``combine``: ``out[t, :] = sum_k w[t, k] * y[rows[t, k], :]`` for ``t < T`` (y fp32, w fp32
  ``[T, K]`` or all ones when absent, out fp32 or bf16). Each token owns its output row and sums its
  K expert rows in k order, so no atomics and no zero-fill are needed; one pass over y replaces
  torch's gather + multiply + ``index_add_`` (three passes and two temporaries).

Indices are trusted (the callers build them from a validated routing).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from ..codegen import avx512 as vx
from ..codegen.ir import F32x16, Function
from ..codegen.worker import ArgBlock, compile_worker

GATHER_ROWS_PER_ITEM = 16
COMBINE_TOKENS_PER_ITEM = 4
GATHER_ARGS = ArgBlock(["dst", "src", "dst_idx", "src_idx", "n", "ldd"])
COMBINE_ARGS = ArgBlock(["out", "y", "rows", "w", "t", "k", "ldy"])
DTYPES = ("f32", "bf16")


@dataclass(frozen=True)
class RowsSpec:
    """op "gather" (src_dtype -> bf16 rows) or "combine" (fp32 rows -> out_dtype), ``cols`` wide
    (a multiple of 32); ``weighted``: combine multiplies by ``w`` (else sums)."""

    op: str
    cols: int
    src_dtype: str = "f32"
    out_dtype: str = "bf16"
    weighted: bool = True

    def __post_init__(self) -> None:
        if self.op not in ("gather", "combine"):
            raise ValueError(f"op must be 'gather' or 'combine', got {self.op!r}")
        if self.cols <= 0 or self.cols % 32:
            raise ValueError(f"cols={self.cols} must be a positive multiple of 32")
        if self.src_dtype not in DTYPES or self.out_dtype not in DTYPES:
            raise ValueError(f"dtypes must be among {DTYPES}")
        if self.op == "gather" and self.out_dtype != "bf16":
            raise ValueError("gather writes bf16 rows")
        if self.op == "combine" and self.src_dtype != "f32":
            raise ValueError("combine reads fp32 rows")

    @property
    def name(self) -> str:
        w = "w" if self.weighted and self.op == "combine" else ""
        return f"rows_{self.op}{w}_{self.src_dtype}_{self.out_dtype}_c{self.cols}"


def _size(dtype: str) -> int:
    return 4 if dtype == "f32" else 2


def _gather_body(spec: RowsSpec):
    def body(fn: Function, ctx: str, item: str, tiles) -> None:
        a = {f: GATHER_ARGS.load_ptr(fn, ctx, f) for f in ("dst", "src", "dst_idx", "src_idx")}
        n, ldd = GATHER_ARGS.load(fn, ctx, "n"), GATHER_ARGS.load(fn, ctx, "ldd")
        j0 = fn.mul(item, GATHER_ROWS_PER_ITEM)
        with fn.loop(j0, fn.min(fn.add(j0, GATHER_ROWS_PER_ITEM), n), name="j") as j:
            d = fn.load("i64", fn.gep(a["dst_idx"], fn.mul(j, 8)), 8)
            s = fn.load("i64", fn.gep(a["src_idx"], fn.mul(j, 8)), 8)
            drow = fn.gep(a["dst"], fn.mul(d, ldd))
            srow = fn.gep(a["src"], fn.mul(s, spec.cols * _size(spec.src_dtype)))
            with fn.loop(0, spec.cols, 32, name="c") as c:
                if spec.src_dtype == "bf16":  # a plain copy of 64 bytes
                    fn.store("<32 x i16>", fn.load("<32 x i16>", fn.gep(srow, fn.mul(c, 2)), 2),
                             fn.gep(drow, fn.mul(c, 2)), 2)
                else:
                    for h in range(2):
                        col = fn.add(c, 16 * h)
                        v = vx.load_f32x16(fn, fn.gep(srow, fn.mul(col, 4)), "f32")
                        vx.store_f32x16(fn, v, fn.gep(drow, fn.mul(col, 2)), "bf16")

    return body


def _combine_body(spec: RowsSpec):
    step = 64 if spec.cols % 64 == 0 else 32  # columns per pass: 4 (or 2) independent accumulators
    steps = step // 16

    def body(fn: Function, ctx: str, item: str, tiles) -> None:
        a = {f: COMBINE_ARGS.load_ptr(fn, ctx, f) for f in ("out", "y", "rows", "w")}
        t, k = COMBINE_ARGS.load(fn, ctx, "t"), COMBINE_ARGS.load(fn, ctx, "k")
        ldy = COMBINE_ARGS.load(fn, ctx, "ldy")
        t0 = fn.mul(item, COMBINE_TOKENS_PER_ITEM)
        with fn.loop(t0, fn.min(fn.add(t0, COMBINE_TOKENS_PER_ITEM), t), name="tok") as tok:
            orow = fn.gep(a["out"], fn.mul(tok, spec.cols * _size(spec.out_dtype)))
            slot0 = fn.mul(tok, k)
            with fn.loop(0, spec.cols, step, name="c") as c:
                accs = [fn.var(F32x16, "zeroinitializer", 64) for _ in range(steps)]
                with fn.loop(0, k, name="k") as kk:
                    slot = fn.add(slot0, kk)
                    row = fn.load("i64", fn.gep(a["rows"], fn.mul(slot, 8)), 8)
                    yp = fn.gep(a["y"], fn.add(fn.mul(row, ldy), fn.mul(c, 4)))
                    wv = vx.splat_f32(fn, fn.gep(a["w"], fn.mul(slot, 4)), "f32") if spec.weighted else None
                    for i, acc in enumerate(accs):
                        v = fn.load(F32x16, fn.gep(yp, 64 * i), 4)
                        acc.set(vx.fma(fn, v, wv, acc.get()) if wv else vx.fadd(fn, acc.get(), v))
                for i, acc in enumerate(accs):
                    col = fn.add(c, 16 * i)
                    vx.store_f32x16(fn, acc.get(), fn.gep(orow, fn.mul(col, _size(spec.out_dtype))), spec.out_dtype)

    return body


class RowsKernel:
    def __init__(self, spec: RowsSpec) -> None:
        self.spec = spec
        args, body = (GATHER_ARGS, _gather_body) if spec.op == "gather" else (COMBINE_ARGS, _combine_body)
        self.addr = compile_worker(spec.name, repr(spec), args, body(spec))

    def gather(self, dst: int, src: int, dst_idx: int, src_idx: int, n: int, num_threads: int | None = None,
               ldd: int = 0) -> None:
        """Copy ``n`` rows (pointers to the row buffers and the two int64 index arrays); ``ldd``: the
        destination's row pitch in bytes (0: ``cols`` bf16, contiguous)."""
        GATHER_ARGS.run(self.addr, -(-n // GATHER_ROWS_PER_ITEM), num_threads, dst=dst, src=src, dst_idx=dst_idx,
                        src_idx=src_idx, n=n, ldd=ldd or self.spec.cols * 2)

    def combine(self, out: int, y: int, rows: int, w: int, t: int, k: int, num_threads: int | None = None,
                ldy: int = 0) -> None:
        """Write ``t`` output rows, each the (weighted) sum of its ``k`` rows of y (row pitch ``ldy``
        bytes; 0: ``cols`` fp32, contiguous)."""
        COMBINE_ARGS.run(self.addr, -(-t // COMBINE_TOKENS_PER_ITEM), num_threads, out=out, y=y, rows=rows, w=w,
                         t=t, k=k, ldy=ldy or self.spec.cols * 4)


@functools.cache
def get_kernel(spec: RowsSpec) -> RowsKernel:
    """The compiled kernel for ``spec`` (memoised; from the disk cache after the first compile)."""
    return RowsKernel(spec)

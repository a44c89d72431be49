"""Row gather and weighted row combine: the token <-> per-expert-row traffic around the expert GEMMs.

- ``gather``: ``dst[dst_idx[j], :] = src[src_idx[j], :]`` for ``j < n`` (src fp32 or bf16, dst bf16;
  fp32 is rounded to nearest even). Moves tokens into the per-expert row buffers. With
  ``lora_rank`` r it also writes the gate and up adapters' A-products of each row it copies,
  ``h[d, :r] = bf16(alpha dst[d] A0_e^T)`` and ``h[d, r:2r] = bf16(alpha dst[d] A1_e^T)`` (d =
  dst_idx[j], e = eid[j], A [E, r, cols] bf16), instead of a separate LoRA launch: each row rereads
  its expert's A, so this is for few rows per expert (decode sizes).
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
from ..codegen.worker import ArgBlock, compile_worker, f32_field
from .lora import row_a_product

GATHER_ROWS_PER_ITEM = 16
GATHER_LORA_ROWS_PER_ITEM = 1  # each row reads 2 r x cols of A: one row per item spreads them
COMBINE_TOKENS_PER_ITEM = 4
GATHER_ARGS = ArgBlock(["dst", "src", "dst_idx", "src_idx", "n", "ldd"])
GATHER_LORA_ARGS = ArgBlock(["dst", "src", "dst_idx", "src_idx", "n", "ldd", "eid", "a0", "a1", "astride", "h",
                             "ldh", "alpha"])
COMBINE_ARGS = ArgBlock(["out", "y", "rows", "w", "t", "k", "ldy"])
DTYPES = ("f32", "bf16")


@dataclass(frozen=True)
class RowsSpec:
    """op "gather" (src_dtype -> bf16 rows) or "combine" (fp32 rows -> out_dtype), ``cols`` wide
    (a multiple of 32); ``weighted``: combine multiplies by ``w`` (else sums); ``lora_rank``:
    gather also writes each copied row's A-products with two adapters (module docstring)."""

    op: str
    cols: int
    src_dtype: str = "f32"
    out_dtype: str = "bf16"
    weighted: bool = True
    lora_rank: int = 0  # gather: also the rows' A-products with two adapters (a multiple of 16)

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
        if self.lora_rank and (self.op != "gather" or self.lora_rank % 16 or self.lora_rank < 0):
            raise ValueError(f"lora_rank={self.lora_rank}: the fused A-products are for gather, at a rank that is "
                             "a positive multiple of 16")

    @property
    def name(self) -> str:
        w = "w" if self.weighted and self.op == "combine" else ""
        lora = f"_lora{self.lora_rank}" if self.lora_rank else ""
        return f"rows_{self.op}{w}_{self.src_dtype}_{self.out_dtype}_c{self.cols}{lora}"

    @property
    def rows_per_item(self) -> int:
        return GATHER_LORA_ROWS_PER_ITEM if self.lora_rank else GATHER_ROWS_PER_ITEM


def _size(dtype: str) -> int:
    return 4 if dtype == "f32" else 2


def _gather_body(spec: RowsSpec):
    args = GATHER_LORA_ARGS if spec.lora_rank else GATHER_ARGS

    def body(fn: Function, ctx: str, item: str, tiles) -> None:
        a = {f: args.load_ptr(fn, ctx, f) for f in ("dst", "src", "dst_idx", "src_idx")}
        n, ldd = args.load(fn, ctx, "n"), args.load(fn, ctx, "ldd")
        j0 = fn.mul(item, spec.rows_per_item)
        with fn.loop(j0, fn.min(fn.add(j0, spec.rows_per_item), n), name="j") as j:
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
            if spec.lora_rank:  # from the bf16 row just written (what the GEMMs read)
                e = fn.load("i64", fn.gep(args.load_ptr(fn, ctx, "eid"), fn.mul(j, 8)), 8)
                aoff = fn.mul(e, args.load(fn, ctx, "astride"))
                hrow = fn.gep(args.load_ptr(fn, ctx, "h"), fn.mul(d, args.load(fn, ctx, "ldh")))
                alpha = vx.splat_arg_f32(fn, args.load(fn, ctx, "alpha"))
                for half, name in enumerate(("a0", "a1")):
                    row_a_product(fn, drow, fn.gep(args.load_ptr(fn, ctx, name), aoff), spec.cols, spec.lora_rank,
                                  fn.gep(hrow, half * spec.lora_rank * 2), alpha)

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
        if spec.op == "gather":
            args, body = (GATHER_LORA_ARGS if spec.lora_rank else GATHER_ARGS), _gather_body
        else:
            args, body = COMBINE_ARGS, _combine_body
        self.args = args
        self.addr = compile_worker(spec.name, repr(spec), args, body(spec))

    def gather(self, dst: int, src: int, dst_idx: int, src_idx: int, n: int, num_threads: int | None = None,
               ldd: int = 0, alpha: float = 1.0, **lora: int) -> None:
        """Copy ``n`` rows (pointers to the row buffers and the two int64 index arrays); ``ldd``: the
        destination's row pitch in bytes (0: ``cols`` bf16, contiguous). With ``lora_rank``,
        ``lora`` names ``eid`` (int64 [n], each listed row's expert), ``a0`` and ``a1`` (the two
        adapters' A [E, rank, cols] bf16), ``astride`` (bytes per expert of both), ``h`` and
        ``ldh`` (the [rows, 2 rank] bf16 products and their row pitch in bytes); ``alpha`` scales
        the products (unused without ``lora_rank``)."""
        if self.spec.lora_rank:
            lora["alpha"] = f32_field(alpha)
        self.args.run(self.addr, -(-n // self.spec.rows_per_item), num_threads, dst=dst, src=src, dst_idx=dst_idx,
                      src_idx=src_idx, n=n, ldd=ldd or self.spec.cols * 2, **lora)

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


@functools.cache
def kernel_for(op: str, cols: int, src_dtype: str = "f32", out_dtype: str = "bf16", weighted: bool = True,
               lora_rank: int = 0) -> RowsKernel:
    """:func:`get_kernel` of ``RowsSpec(op, cols, ...)``, memoised on the arguments (a pass looks
    kernels up on every call, and building and hashing a spec costs a microsecond warm, several
    with cold caches)."""
    return get_kernel(RowsSpec(op, cols, src_dtype, out_dtype, weighted, lora_rank))

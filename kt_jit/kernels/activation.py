"""Row-wise MoE activation kernels between the GEMMs (AVX-512, every row independent).

- ``fwd``: ``A[r, :] = bf16(silu(G[r, :]) * U[r, :])`` where row r of ``gu`` is ``[G | U]`` (fp32).
  With ``keep_gu``, also ``gu16[j, :] = bf16([G | U])`` for the j-th listed row: what the backward
  keeps (half the bytes of the fp32 rows, A recomputed from it, one row per routed pair without the
  segments' padding: 4I bytes per pair instead of 10I per padded row).
  With ``lora_rank``, also the down adapter's A-product of the row just written,
  ``H[r, :] = bf16(alpha A[r, :] Ad_e^T)`` (Ad_e [rank, I] bf16, the row's expert's; dot form: 16
  adapter rows at a time in lane partials, folded to 16 outputs), instead of a separate LoRA launch.
- ``bwd``: given ``D[r, :]`` (the unweighted gradient reaching A) and ``gu16[j, :] = [G | U]`` (bf16,
  as the forward kept it; j the row's place in the list) of the row r of routed pair p = (t, k), and
  the routing weights ``w [T, K]``: A = silu(G) U recomputed (fp32), ``dw[p] = <D, A>`` (the router
  gradient, written straight into its [T, K] place), ``dA = w[p] D`` and ``[dG | dU] = bf16([dA U
  silu'(G) | dA silu(G)])`` with ``silu'(g) = s (1 + g (1 - s))``, s = sigmoid(g); with
  ``write_act`` also ``act[r, :] = bf16(A)`` (for the down adapter's A gradient); optionally
  ``wrow[r] = w[p]`` (each row's weight, for the kernels that weight rows afterwards).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from ..codegen import avx512 as vx
from ..codegen.ir import F32x16, Function
from ..codegen.worker import ArgBlock, compile_worker, f32_field, listed_row
from .lora import row_a_product

ROWS_PER_ITEM = 8
FWD_ARGS = ArgBlock(["gu", "act", "gu16", "rows", "idx"])
FWD_LORA_ARGS = ArgBlock(["gu", "act", "gu16", "rows", "idx", "eid", "a", "astride", "h", "ldh", "alpha"])
BWD_ARGS = ArgBlock(["d", "act", "gu16", "w", "dw", "wrow", "dgu", "rows", "idx", "tok", "kk", "k", "ldd", "lddgu"])


@dataclass(frozen=True)
class ActSpec:
    op: str   # "fwd" or "bwd"
    i: int    # intermediate size (multiple of 16; of 32 with lora_rank)
    lora_rank: int = 0  # fwd: also the down adapter's A-product (a multiple of 16)
    keep_gu: bool = False  # fwd: also write [G | U] as bf16 (gu16) for the backward
    write_act: bool = False  # bwd: also write the recomputed A (act)

    def __post_init__(self) -> None:
        if self.op not in ("fwd", "bwd") or self.i % 16 or self.i <= 0:
            raise ValueError(f"bad activation spec {self}")
        if (self.keep_gu and self.op != "fwd") or (self.write_act and self.op != "bwd"):
            raise ValueError(f"bad activation spec {self}: keep_gu is for fwd, write_act for bwd")
        if self.lora_rank and (self.op != "fwd" or self.lora_rank % 16 or self.i % 32):
            raise ValueError(f"bad activation spec {self}: the fused A-product is for fwd, rank a multiple of 16, "
                             "I a multiple of 32")

    @property
    def name(self) -> str:
        lora = f"_lora{self.lora_rank}" if self.lora_rank else ""
        flags = "_keep" * self.keep_gu + "_act" * self.write_act
        return f"silu_mul_{self.op}_i{self.i}{lora}{flags}"

    @property
    def args(self) -> ArgBlock:
        return BWD_ARGS if self.op == "bwd" else FWD_LORA_ARGS if self.lora_rank else FWD_ARGS


def _bf16(fn: Function, v: str) -> str:
    return fn.val(f"fptrunc {F32x16} {v} to <16 x bfloat>")


def _rows(fn: Function, args: ArgBlock, ctx: str, item: str, body) -> None:
    """``body(row, j)`` for the item's rows (j: the index in the row list)."""
    rows, idx = args.load(fn, ctx, "rows"), args.load_ptr(fn, ctx, "idx")
    r0 = fn.mul(item, ROWS_PER_ITEM)
    with fn.loop(r0, fn.min(fn.add(r0, ROWS_PER_ITEM), rows), name="row") as j:
        body(listed_row(fn, idx, j), j)


def _fwd_body(spec: ActSpec):
    args = spec.args

    def body(fn: Function, ctx: str, item: str, tiles) -> None:
        gu, act, gu16 = (args.load_ptr(fn, ctx, f) for f in ("gu", "act", "gu16"))

        def row(r: str, j: str) -> None:
            grow = fn.gep(gu, fn.mul(r, spec.i * 8))
            arow = fn.gep(act, fn.mul(r, spec.i * 2))
            krow = fn.gep(gu16, fn.mul(j, spec.i * 4))  # (one row per listed row: no padding)
            with fn.loop(0, spec.i, 16, name="c") as c:
                g = fn.load(F32x16, fn.gep(grow, fn.mul(c, 4)), 4)
                u = fn.load(F32x16, fn.gep(grow, fn.add(fn.mul(c, 4), spec.i * 4)), 4)
                a = vx.fmul(fn, vx.fmul(fn, g, vx.sigmoid_f32x16(fn, g)), u)
                fn.store("<16 x bfloat>", _bf16(fn, a), fn.gep(arow, fn.mul(c, 2)), 2)
                if spec.keep_gu:
                    fn.store("<16 x bfloat>", _bf16(fn, g), fn.gep(krow, fn.mul(c, 2)), 2)
                    fn.store("<16 x bfloat>", _bf16(fn, u), fn.gep(krow, fn.add(fn.mul(c, 2), spec.i * 2)), 2)
            if spec.lora_rank:
                _a_product(fn, spec, ctx, arow, r, j)

        _rows(fn, args, ctx, item, row)

    return body


def _a_product(fn: Function, spec: ActSpec, ctx: str, arow: str, r: str, j: str) -> None:
    """H[r, :] = bf16(alpha * A[r, :] Ad_e^T), e = eid[j], from the bf16 row just stored."""
    args = FWD_LORA_ARGS
    e = fn.load("i64", fn.gep(args.load_ptr(fn, ctx, "eid"), fn.mul(j, 8)), 8)
    ad = fn.gep(args.load_ptr(fn, ctx, "a"), fn.mul(e, args.load(fn, ctx, "astride")))
    hrow = fn.gep(args.load_ptr(fn, ctx, "h"), fn.mul(r, args.load(fn, ctx, "ldh")))
    row_a_product(fn, arow, ad, spec.i, spec.lora_rank, hrow, vx.splat_arg_f32(fn, args.load(fn, ctx, "alpha")))


def _bwd_body(spec: ActSpec):
    one = vx.f32_splat(1.0)

    def body(fn: Function, ctx: str, item: str, tiles) -> None:
        p = {f: BWD_ARGS.load_ptr(fn, ctx, f) for f in ("d", "act", "gu16", "w", "dw", "wrow", "dgu", "tok", "kk")}
        ldd, lddgu = BWD_ARGS.load(fn, ctx, "ldd"), BWD_ARGS.load(fn, ctx, "lddgu")
        topk = BWD_ARGS.load(fn, ctx, "k")

        def row(r: str, j: str) -> None:
            drow = fn.gep(p["d"], fn.mul(r, ldd))
            arow = fn.gep(p["act"], fn.mul(r, spec.i * 2))
            grow = fn.gep(p["gu16"], fn.mul(j, spec.i * 4))
            orow = fn.gep(p["dgu"], fn.mul(r, lddgu))
            tok, kk = (fn.load("i64", fn.gep(p[f], fn.mul(j, 8)), 8) for f in ("tok", "kk"))
            pair = fn.add(fn.mul(tok, topk), kk)
            wp = fn.gep(p["w"], fn.mul(pair, 4))
            with fn.if_then(fn.icmp("ne", fn.val(f"ptrtoint ptr {p['wrow']} to i64"), 0), name="wrow"):
                fn.store("float", fn.load("float", wp, 4), fn.gep(p["wrow"], fn.mul(r, 4)), 4)
            w = vx.splat_f32(fn, wp, "f32")
            dot = fn.var(F32x16, "zeroinitializer", 64)
            with fn.loop(0, spec.i, 16, name="c") as c:
                off2 = fn.mul(c, 2)
                d = fn.load(F32x16, fn.gep(drow, fn.mul(c, 4)), 4)
                g = vx.load_f32x16(fn, fn.gep(grow, off2), "bf16")
                u = vx.load_f32x16(fn, fn.gep(grow, fn.add(off2, spec.i * 2)), "bf16")
                s = vx.sigmoid_f32x16(fn, g)
                a = vx.fmul(fn, vx.fmul(fn, g, s), u)  # (the forward's A up to rounding)
                if spec.write_act:
                    fn.store("<16 x bfloat>", _bf16(fn, a), fn.gep(arow, off2), 2)
                dot.set(vx.fma(fn, d, a, dot.get()))
                da = vx.fmul(fn, d, w)
                du = vx.fmul(fn, da, vx.fmul(fn, g, s))
                dsilu = vx.fmul(fn, s, vx.fma(fn, g, fn.val(f"fsub {F32x16} {one}, {s}"), one))
                dg = vx.fmul(fn, vx.fmul(fn, da, u), dsilu)
                fn.store("<16 x bfloat>", _bf16(fn, dg), fn.gep(orow, fn.mul(c, 2)), 2)
                fn.store("<16 x bfloat>", _bf16(fn, du), fn.gep(orow, fn.add(fn.mul(c, 2), spec.i * 2)), 2)
            total = fn.val(f"call reassoc float @llvm.vector.reduce.fadd.v16f32(float 0.0, {F32x16} {dot.get()})")
            fn.module.declare("llvm.vector.reduce.fadd.v16f32",
                              f"declare float @llvm.vector.reduce.fadd.v16f32(float, {F32x16})")
            fn.store("float", total, fn.gep(p["dw"], fn.mul(pair, 4)), 4)

        _rows(fn, BWD_ARGS, ctx, item, row)

    return body


class ActKernel:
    def __init__(self, spec: ActSpec) -> None:
        self.spec = spec
        self.args = spec.args
        self.addr = compile_worker(spec.name, repr(spec), self.args,
                                   (_fwd_body if spec.op == "fwd" else _bwd_body)(spec))

    def launch(self, rows: int, num_threads: int | None = None, idx: int = 0, ldd: int = 0, lddgu: int = 0,
               alpha: float = 1.0, **ptrs: int) -> None:
        """Process ``rows`` rows: rows 0..rows-1, or with ``idx`` (address of int64 [rows]) the rows
        listed there; ``ptrs`` are the data pointers named in the module docstring. ``bwd``: ``ldd``
        and ``lddgu`` are the row pitches of D and [dG | dU] in bytes (0: contiguous); ``tok`` and
        ``kk`` (int64 [rows]) the token and slot of each listed row's pair, ``k`` the slots per token
        (w and dw: fp32 [T, k]); ``wrow`` (fp32 per row) may be 0; ``act`` is written with
        ``write_act`` only (0 otherwise). ``fwd``: ``gu16`` is written with ``keep_gu`` only. ``fwd`` with
        ``lora_rank``: ``eid`` (int64 [rows], each listed row's expert), ``a`` (Ad [E, rank, I] bf16),
        ``astride`` (bytes per expert), ``h`` and ``ldh`` (its row pitch in bytes), ``alpha``."""
        if self.spec.op == "bwd":
            ptrs.update(ldd=ldd or self.spec.i * 4, lddgu=lddgu or self.spec.i * 4)
        if self.spec.lora_rank:
            ptrs["alpha"] = f32_field(alpha)
        self.args.run(self.addr, -(-rows // ROWS_PER_ITEM), num_threads, rows=rows, idx=idx, **ptrs)


@functools.cache
def get_kernel(spec: ActSpec) -> ActKernel:
    return ActKernel(spec)


@functools.cache
def kernel_for(op: str, i: int, lora_rank: int = 0, keep_gu: bool = False, write_act: bool = False) -> ActKernel:
    """:func:`get_kernel` of ``ActSpec(op, i, lora_rank, keep_gu, write_act)``, memoised on the arguments."""
    return get_kernel(ActSpec(op, i, lora_rank, keep_gu, write_act))

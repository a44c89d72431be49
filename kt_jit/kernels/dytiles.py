"""dY rows into the B tiles of the AMX transposed GEMM, per expert group, in one launch.

The AMX transposed GEMM (``dX = dY W``, kernels/gemm.py) reads dY pre-arranged as two B tiles per
(16 tokens, 16 n): for row tile ``mt`` and n-block ``s``, tile ``e`` row ``i`` holds for each token
``j`` the bf16 pair whose element ``e`` is ``dY[16 mt + j, 16 s + i]`` and whose other element is
zero (the layout :func:`kernels.gemm.pack_dy_for_amx` builds with torch ops). This kernel writes
that layout for each group ``(dY rows, tiles, m)`` of a group table, a group per work item: the
tiles of its ``ceil(m / 16)`` row tiles (tokens past ``m`` are zero), so an MoE backward packs
every expert's rows inside its launch batch (and its launch plan) instead of in torch between
launches.

Per (row tile, n-block): 16 token rows of 32 bytes (8 dwords: n-pairs 2p, 2p+1) are transposed as
a 16 x 8 dword matrix into G_p (lane j = the pair of token j), then tile 0 row 2p = G_p & 0xffff,
row 2p+1 = G_p >> 16, tile 1 row 2p = G_p << 16, row 2p+1 = G_p & 0xffff0000.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from ..codegen import avx512 as vx
from ..codegen.ir import Function, I32x16
from ..codegen.worker import ArgBlock, compile_worker, group_table

ARGS = ArgBlock(["groups", "ldx"])
GROUP_FIELDS = 3  # dY rows, tiles, m


@dataclass(frozen=True)
class DyTilesSpec:
    """dY rows of ``n`` bf16 columns (a multiple of 16; the row pitch is a launch argument)."""

    n: int

    def __post_init__(self) -> None:
        if self.n <= 0 or self.n % 16:
            raise ValueError(f"dY tiles: n={self.n} must be a positive multiple of 16")

    @property
    def name(self) -> str:
        return f"amx_dy_tiles_n{self.n}"


def _body(spec: DyTilesSpec):
    blocks = spec.n // 16

    def body(fn: Function, ctx: str, item: str, tiles) -> None:
        desc = fn.gep(ARGS.load_ptr(fn, ctx, "groups"), fn.mul(item, 8 * GROUP_FIELDS))
        x, out = (fn.load("ptr", fn.gep(desc, 8 * f), 8) for f in (0, 1))
        m = fn.load("i64", fn.gep(desc, 16), 8)
        ldx = ARGS.load(fn, ctx, "ldx")
        lo16, hi16 = vx.i32x16_const([0xFFFF] * 16), vx.i32x16_const([-0x10000] * 16)
        sixteen = vx.i32x16_const([16] * 16)
        with fn.loop(0, fn.val(f"udiv i64 {fn.add(m, 15)}, 16"), name="mt") as mt:
            valid = fn.sub(m, fn.mul(mt, 16))  # tokens of this row tile (16 or fewer in the last)
            xt = fn.gep(x, fn.mul(fn.mul(mt, 16), ldx))
            ot = fn.gep(out, fn.mul(mt, blocks * 2048))
            with fn.loop(0, blocks, name="s") as s:
                halves = []
                for j in range(16):
                    row = fn.load("<8 x i32>", fn.gep(xt, fn.add(fn.mul(ldx, j), fn.mul(s, 32))), 4)
                    keep = fn.icmp("sgt", valid, j)
                    halves.append(fn.val(f"select i1 {keep}, <8 x i32> {row}, <8 x i32> zeroinitializer"))
                rows = [vx.shuffle(fn, "<8 x i32>", halves[2 * a], halves[2 * a + 1], list(range(16)))
                        for a in range(8)]
                ob = fn.gep(ot, fn.mul(s, 2048))
                for p, g in enumerate(vx.transpose_dwords_16x8(fn, rows)):
                    parts = ((0, 2 * p, f"and {I32x16} {g}, {lo16}"), (0, 2 * p + 1, f"lshr {I32x16} {g}, {sixteen}"),
                             (1, 2 * p, f"shl {I32x16} {g}, {sixteen}"), (1, 2 * p + 1, f"and {I32x16} {g}, {hi16}"))
                    for tile, i, op in parts:
                        fn.store(I32x16, fn.val(op), fn.gep(ob, tile * 1024 + i * 64), 64)

    return body


class DyTilesKernel:
    def __init__(self, spec: DyTilesSpec) -> None:
        self.spec = spec
        self.addr = compile_worker(spec.name, repr(spec), ARGS, _body(spec))

    def launch(self, groups, ldx: int, num_threads: int | None = None) -> None:
        """Pack each group of ``groups`` (int64 [G, 3]: dY rows (bf16, pitch ``ldx`` bytes, readable
        up to the next multiple of 16 rows), tiles (64-byte aligned, ``ceil(m/16) * n/16 * 2048``
        bytes), m)."""
        n_groups, addr = group_table(groups, GROUP_FIELDS)
        ARGS.run(self.addr, n_groups, num_threads, keep=(groups,), groups=addr, ldx=ldx)


@functools.cache
def get_kernel(spec: DyTilesSpec) -> DyTilesKernel:
    """The compiled kernel for ``spec`` (memoised; compiled or loaded from the disk cache once)."""
    return DyTilesKernel(spec)


@functools.cache
def kernel_for(n: int) -> DyTilesKernel:
    """:func:`get_kernel` of ``DyTilesSpec(n)``, memoised on the argument."""
    return get_kernel(DyTilesSpec(n))

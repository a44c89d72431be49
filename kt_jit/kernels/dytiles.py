"""dY rows rearranged for a transposed GEMM, per expert group, in one launch: into the B tiles of
the AMX kernels (form "amx") or into token-lane vectors for the AVX-512 tokens-in-lanes form
(form "lanes").

The AMX transposed GEMM (``dX = dY W``, kernels/gemm.py) reads dY pre-arranged as two B tiles per
(16 tokens, 16 n): for row tile ``mt`` and n-block ``s``, tile ``e`` row ``i`` holds for each token
``j`` the bf16 pair whose element ``e`` is ``dY[16 mt + j, 16 s + i]`` and whose other element is
zero (the layout :func:`kernels.gemm.pack_dy_for_amx` builds with torch ops). This kernel writes
that layout for each group ``(dY rows, tiles, m)`` of a group table, a group per work item: the
tiles of its ``ceil(m / 16)`` row tiles (tokens past ``m`` are zero), so an MoE backward packs
every expert's rows inside its launch batch (and its launch plan) instead of in torch between
launches.

Form "lanes" (:func:`pack_dy_lanes` builds it with torch ops): a group of ``m`` rows takes ``m * n``
bf16 (``2 m n`` bytes, the size of its rows). Row tile ``mt`` (16 tokens; the last one has
``mt_rows = m - 16 mt`` of them) starts at byte ``32 n mt``; in it, n-pair ``q`` is ``mt_rows``
dwords at byte ``4 mt_rows q``, dword ``t`` the pair ``(dY[16 mt + t, 2q], dY[16 mt + t, 2q+1])``.
Only groups :func:`lanes_rows` admits are written (the others take other forms).

Form "amx" with ``scaled`` (the AMX transposed GEMMs of per-channel quantized weights): each group
also gives fp32 column scales, and its tiles hold dY diag(scales) rounded to bf16.

Form "amx", per (row tile, n-block): 16 token rows of 32 bytes (8 dwords: n-pairs 2p, 2p+1) are
transposed as a 16 x 8 dword matrix into G_p (lane j = the pair of token j), then tile 0 row 2p =
G_p & 0xffff, row 2p+1 = G_p >> 16, tile 1 row 2p = G_p << 16, row 2p+1 = G_p & 0xffff0000 (form
"lanes" stores G_p itself, its first ``mt_rows`` lanes).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..codegen import avx512 as vx
from ..codegen.ir import F32x16, Function, I32x16
from ..codegen.worker import ArgBlock, compile_worker, group_table

ARGS = ArgBlock(["groups", "ldx"])
GROUP_FIELDS = 3  # dY rows, destination (tiles or lanes), m; form "amx" with ``scaled``: + fp32 scales [n]


FORMS = ("amx", "lanes")


LANES_TAIL_MIN = 12  # fewest tokens in a group's last 16-row tile for the tokens-in-lanes form


def lanes_rows(m: int, min_rows: int) -> bool:
    """Whether a group of ``m`` rows takes the tokens-in-lanes form whose smallest group is
    ``min_rows`` (0 = never): at least that many rows, and a last row tile that is full or holds at
    least LANES_TAIL_MIN tokens (a tile's 16 lanes cost the same however many tokens fill them)."""
    return 0 < min_rows <= m and (m % 16 == 0 or m % 16 >= LANES_TAIL_MIN)


def lanes_rows_ir(fn: Function, m: str, min_rows: int) -> str:
    """:func:`lanes_rows` as an i1 of the i64 ``m`` (``min_rows`` > 0)."""
    tail = fn.val(f"and i64 {m}, 15")
    full_tail = fn.val(f"or i1 {fn.icmp('eq', tail, 0)}, {fn.icmp('sge', tail, LANES_TAIL_MIN)}")
    return fn.val(f"and i1 {fn.icmp('sge', m, min_rows)}, {full_tail}")


@dataclass(frozen=True)
class DyTilesSpec:
    """dY rows of ``n`` bf16 columns (a multiple of 16; the row pitch is a launch argument) into
    ``form``'s layout; "lanes" writes the groups :func:`lanes_rows` admits for ``min_rows``.
    ``scaled`` (form "amx"): each group also gives fp32 column scales [n], and the tiles hold
    dY diag(scales) rounded to bf16 (the AMX transposed GEMMs of per-channel quantized weights)."""

    n: int
    form: str = "amx"
    min_rows: int = 0
    scaled: bool = False

    def __post_init__(self) -> None:
        if self.n <= 0 or self.n % 16:
            raise ValueError(f"dY tiles: n={self.n} must be a positive multiple of 16")
        if self.form not in FORMS:
            raise ValueError(f"dY tiles: form must be one of {FORMS}, got {self.form!r}")
        if (self.form == "lanes") != (self.min_rows > 0) or not (
                self.min_rows == 0 or LANES_TAIL_MIN <= self.min_rows <= 16):
            raise ValueError(f"dY tiles: min_rows={self.min_rows}: {LANES_TAIL_MIN}-16 for the 'lanes' form, else 0")
        if self.scaled and self.form != "amx":
            raise ValueError("dY tiles: scaled applies to the 'amx' form only")

    @property
    def group_fields(self) -> int:
        return GROUP_FIELDS + int(self.scaled)

    @property
    def name(self) -> str:
        if self.form == "lanes":
            return f"dy_lanes_n{self.n}_min{self.min_rows}"
        return f"amx_dy_tiles_n{self.n}" + ("_scaled" if self.scaled else "")


def _group(fn: Function, ctx: str, item: str, spec: DyTilesSpec) -> tuple[str, str, str, str, str | None]:
    """(dY rows, destination, m, dY row pitch, the column scales with ``spec.scaled`` else None) of
    work item ``item``'s group."""
    desc = fn.gep(ARGS.load_ptr(fn, ctx, "groups"), fn.mul(item, 8 * spec.group_fields))
    x, out = (fn.load("ptr", fn.gep(desc, 8 * f), 8) for f in (0, 1))
    scales = fn.load("ptr", fn.gep(desc, 8 * GROUP_FIELDS), 8) if spec.scaled else None
    return x, out, fn.load("i64", fn.gep(desc, 16), 8), ARGS.load(fn, ctx, "ldx"), scales


def _pairs_by_token(fn: Function, halves: list[str]) -> list[str]:
    """16 token rows of 8 dwords (``halves``, <8 x i32>; n-pairs 0-7 of a 16-n block) as 8
    <16 x i32>: vector p lane j = n-pair p of token j."""
    rows = [vx.shuffle(fn, "<8 x i32>", halves[2 * a], halves[2 * a + 1], list(range(16))) for a in range(8)]
    return vx.transpose_dwords_16x8(fn, rows)


def _lanes_body(spec: DyTilesSpec):
    blocks = spec.n // 16

    def body(fn: Function, ctx: str, item: str, tiles) -> None:
        x, out, m, ldx, _ = _group(fn, ctx, item, spec)
        with fn.if_then(lanes_rows_ir(fn, m, spec.min_rows), name="lanes"):
            with fn.loop(0, fn.val(f"udiv i64 {fn.add(m, 15)}, 16"), name="mt") as mt:
                rows_here = fn.min(fn.sub(m, fn.mul(mt, 16)), 16)
                mask = vx.lane_mask(fn, rows_here)
                pitch = fn.mul(rows_here, 4)  # bytes per n-pair
                xt = fn.gep(x, fn.mul(fn.mul(mt, 16), ldx))
                ot = fn.gep(out, fn.mul(mt, 32 * spec.n))
                # rows past the tile's last are read from its first (their lanes are not stored)
                offs = [fn.mul(fn.val(f"select i1 {fn.icmp('slt', j, rows_here)}, i64 {j}, i64 0"), ldx)
                        for j in range(16)]
                with fn.loop(0, blocks, name="s") as s:
                    xs = fn.gep(xt, fn.mul(s, 32))
                    halves = [fn.load("<8 x i32>", fn.gep(xs, off), 4) for off in offs]
                    ob = fn.gep(ot, fn.mul(fn.mul(s, 8), pitch))
                    for p, g in enumerate(_pairs_by_token(fn, halves)):
                        vx.masked_store(fn, I32x16, g, fn.gep(ob, fn.mul(pitch, p)), mask)

    return body


def _body(spec: DyTilesSpec):
    blocks = spec.n // 16

    def body(fn: Function, ctx: str, item: str, tiles) -> None:
        x, out, m, ldx, scales = _group(fn, ctx, item, spec)
        lo16, hi16 = vx.i32x16_const([0xFFFF] * 16), vx.i32x16_const([-0x10000] * 16)
        sixteen = vx.i32x16_const([16] * 16)
        with fn.loop(0, fn.val(f"udiv i64 {fn.add(m, 15)}, 16"), name="mt") as mt:
            valid = fn.sub(m, fn.mul(mt, 16))  # tokens of this row tile (16 or fewer in the last)
            xt = fn.gep(x, fn.mul(fn.mul(mt, 16), ldx))
            ot = fn.gep(out, fn.mul(mt, blocks * 2048))
            with fn.loop(0, blocks, name="s") as s:
                sv = fn.load(F32x16, fn.gep(scales, fn.mul(s, 64)), 4) if scales else None
                halves = []
                for j in range(16):
                    row = fn.load("<8 x i32>", fn.gep(xt, fn.add(fn.mul(ldx, j), fn.mul(s, 32))), 4)
                    if sv is not None:  # dY diag(s) of the block's 16 columns, rounded once to bf16
                        wide = fn.val(f"fpext <16 x bfloat> {vx.bitcast(fn, row, '<8 x i32>', '<16 x bfloat>')} "
                                      f"to {F32x16}")
                        narrow = fn.val(f"fptrunc {F32x16} {fn.val(f'fmul {F32x16} {wide}, {sv}')} to <16 x bfloat>")
                        row = vx.bitcast(fn, narrow, "<16 x bfloat>", "<8 x i32>")
                    keep = fn.icmp("sgt", valid, j)
                    halves.append(fn.val(f"select i1 {keep}, <8 x i32> {row}, <8 x i32> zeroinitializer"))
                ob = fn.gep(ot, fn.mul(s, 2048))
                for p, g in enumerate(_pairs_by_token(fn, halves)):
                    parts = ((0, 2 * p, f"and {I32x16} {g}, {lo16}"), (0, 2 * p + 1, f"lshr {I32x16} {g}, {sixteen}"),
                             (1, 2 * p, f"shl {I32x16} {g}, {sixteen}"), (1, 2 * p + 1, f"and {I32x16} {g}, {hi16}"))
                    for tile, i, op in parts:
                        fn.store(I32x16, fn.val(op), fn.gep(ob, tile * 1024 + i * 64), 64)

    return body


class DyTilesKernel:
    def __init__(self, spec: DyTilesSpec) -> None:
        self.spec = spec
        self.addr = compile_worker(spec.name, repr(spec), ARGS,
                                   _lanes_body(spec) if spec.form == "lanes" else _body(spec))

    def launch(self, groups, ldx: int, num_threads: int | None = None) -> None:
        """Pack each group of ``groups`` (int64 [G, 3]: dY rows (bf16, pitch ``ldx`` bytes; form
        "amx": readable up to the next multiple of 16 rows), the destination (form "amx": tiles,
        64-byte aligned, ``ceil(m/16) * n/16 * 2048`` bytes; "lanes": ``2 m n`` bytes), m; with
        ``scaled``, [G, 4]: + the fp32 column scales [n])."""
        n_groups, addr = group_table(groups, self.spec.group_fields)
        ARGS.run(self.addr, n_groups, num_threads, keep=(groups,), groups=addr, ldx=ldx)


@functools.cache
def get_kernel(spec: DyTilesSpec) -> DyTilesKernel:
    """The compiled kernel for ``spec`` (memoised; compiled or loaded from the disk cache once)."""
    return DyTilesKernel(spec)


@functools.cache
def kernel_for(n: int, form: str = "amx", min_rows: int = 0, scaled: bool = False) -> DyTilesKernel:
    """:func:`get_kernel` of ``DyTilesSpec(n, form, min_rows, scaled)``, memoised on the arguments."""
    return get_kernel(DyTilesSpec(n, form, min_rows, scaled))


def pack_dy_lanes(dy: torch.Tensor) -> torch.Tensor:
    """The "lanes" layout of one group's dY ([m, n] bf16, n even) with torch ops: bf16 [m * n] (see
    the module docstring; built whatever the group's row count)."""
    if dy.dim() != 2 or dy.dtype != torch.bfloat16 or dy.shape[1] % 2:
        raise ValueError(f"pack_dy_lanes: dY must be bf16 [m, n] with n even, got {dy.dtype} {tuple(dy.shape)}")
    m, n = dy.shape
    parts = [dy[i:i + 16].contiguous().view(-1, n // 2, 2).transpose(0, 1).reshape(-1) for i in range(0, m, 16)]
    return torch.cat(parts)

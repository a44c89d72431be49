"""Grouped expert GEMMs against packed BF16 weights, forward and transposed, AVX-512 and AMX.

Two operations share one packed weight ``W[N, K]`` (layout in kernels/pack.py):

- ``fwd``: ``Y[M, N] (fp32) = X[M, K] (bf16) @ W^T``
- ``bwd``: ``dX[M, K] (fp32) = dY[M, N] (bf16) @ W`` (the input gradient of ``fwd``)

A kernel runs a list of *groups* in one launch; group ``g`` is ``(x, w, y, m)``: activation pointer,
packed-weight pointer, output pointer and its row count ``m`` (any m >= 0, a run-time value).
An MoE layer is one group per active expert. Work items are (group, column block); threads claim
them from an atomic counter.

How each ISA computes (the schedule's numbers are in :class:`GemmSchedule`):

- AVX-512 ``fwd``: for each k-pair row of the packed weight, ``nr`` zmm loads (16 output channels
  each) times ``mr`` broadcast bf16 pairs of X, ``vdpbf16ps`` into ``mr x nr`` accumulators. K is
  cut into chunks of ``kc`` pairs so the weight panel stays in L2 while all rows of X pass over it.
- AVX-512 ``bwd``, form "panel" (default): a work item owns 16*nr outputs k. For a chunk of n-blocks
  it loads each block's 8-row groups (16 k x 16 n), swaps the middle words of every qword (k-pairs
  become n-pairs) and transposes the 8 rows as 8x8 qwords; row q then holds, per output k, the
  pair (W[n_2q][k], W[n_2q+1][k]) -- the forward layout of W^T. The rows go to an L1 panel and the
  forward micro-kernel runs on it, so large M runs at the forward's speed. Groups of at most
  ``sm`` rows are instead streamed whole by their first work item: n-blocks read ``sb`` side by
  side in forward order (long sequential runs instead of 2 KB pieces at a K-sized stride),
  transposed in registers and multiplied at once into dX rows kept in L1/L2, each row's 16
  outputs in a register over the blocks. Groups of at most ``lp`` rows (bf16 4;
  int4 and int8: QUAD_MAX_ROWS) take the lane-partial form, also whole and in forward order: no
  transposition at all (bf16 one word swap per row; int4 and int8 from 3 rows quad steps, codes cut
  from one 64-byte load by masks and shifts; see :func:`_bwd_lane_partial`), partial sums per
  n-pair kept in the lanes of L1 accumulators over a K-slice and folded to outputs at its end. A
  single group (the launches of
  ``linear_t``, bf16 and int8: schedule ``lps``) gives each K-slice to a work item of its own.
  bf16 groups of 16 rows, or more whose last 16-row tile holds at least 12 (28-32, 44-48, ...;
  schedule ``tl``), take the tokens-in-lanes form instead (:func:`_bwd_lanes_item`): dY comes
  transposed (kernels/dytiles.py, form "lanes"), 16 tokens per vector, and a work item keeps 16
  outputs x 16 tokens in registers over the whole reduction.
- AVX-512 ``bwd``, form "fold" (the first version): the swapped rows are multiplied directly
  against duplicated dY pairs; lane 2q+e accumulates output k = 2r+e for n-pair q and the 8
  q-partials are folded with shuffles once per output vector. Its work items split K; it serves
  single groups with a fused LoRA term or of int4 weights, and K too short for a lane-partial
  slice per thread.
- Quantized weights, AVX-512 integer kernels: the forward multiplies the integer codes (int8, or the int4
  codes as int16 words, their zero points' term z sum(x) subtracted once per K-chunk) by int16
  activation rows with ``vpdpwssd``; x arrives quantized per row (kernels/rowquant.py) with its row
  scales in an extra group field, and the weight and row scales are applied in fp32 per K-chunk.
  The transposed GEMM does the same for per-channel modes, with x = dY diag(channel scales)
  quantized per row (the lane-partial form subtracts sum_n dY z_n once per row). K-group modes keep
  bf16 numerics: the lane-partial and streamed forms (up to 24 rows) decode the codes exactly to
  bf16 and multiply dY by the group's scales instead (rescaled as K enters each group); the panel
  form dequantizes each row in registers (codes times the group's scale), rounded once to bf16
  before the transpose.
- AMX ``fwd``: X rows are A tiles (stride = row pitch), packed rows are B tiles (16 x 64 B), 2x2
  tiles of C. X must be readable for ``ceil(m/16)*16`` rows (rows past m are ignored).
- AMX with quantized weights: each 16-row block of codes is first decoded into a bf16 tile on the
  stack and used as the packed block below and above (see :func:`_decode_block`); x and dY stay
  bf16, per-channel transposed kernels take dY diag(s) (``spec.scaled_dy``).
- AMX ``bwd``: the packed block itself is the A tile (rows = k-pairs); dY is pre-arranged
  (:func:`pack_dy_for_amx`; the MoE backward packs per expert with kernels/dytiles.py, inside its
  launch batch) into two B tiles per (16 tokens, 16 n) holding dY^T with zeros in the
  odd (resp. even) half of each pair, which selects even (resp. odd) k. C tiles hold dX^T and are
  transposed on the way out. This spends 2x tile compute to read the weights with no repacking;
  at small M the layer is bandwidth-bound and AMX has compute to spare.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..codegen import avx512 as vx
from ..codegen.amx import TileConfig, Tiles
from ..codegen.cache import get_or_compile
from ..codegen.compile import target_for
from ..codegen.ir import BF16x32, F32x16, Function, I16x32, I32x16, Module, Var, vec_const
from ..codegen.worker import ArgBlock, build_worker, dispatch, group_table, immediate_launches
from ..runtime import knobs, tuning_store
from ..runtime.amx import active_isa, require_amx
from ..runtime.buffers import aligned_zeros
from ..runtime.cpu import l1d_cache_bytes
from ..runtime.threads import default_num_threads
from .dytiles import LANES_TAIL_MIN, lanes_rows_ir
from .pack import check_gemm_dims
from .rowquant import ACT_MAX, quantize_rows

GROUP_FIELDS = 6  # x, w, y, m, scales [G, N] fp32, zero points [G, N] uint8 per group descriptor
XSCALE_FIELDS = 1  # integer kernels (spec.int_x) append: per-row scales of the int16 x, fp32 [m]
LANES_FIELDS = 1  # kernels with the tokens-in-lanes form (schedule tl) append: dY in its layout
LORA_FIELDS = 3  # fused-LoRA kernels append: h (bf16 rows), LoRA B of the first and second adapter
QUANTS = ("bf16", "int8", "int4")
ROW_BYTES = {"bf16": 64, "int8": 32, "int4": 16}  # bytes of one packed row (16 channels x one k-pair)
QMAX = {"int8": 128, "int4": 15}  # largest |integer weight| (int8 code, int4 code minus zero point)
ARGS = ArgBlock(["groups", "ldx", "ldy", "ldh"], pointers=["groups"])  # (declared: see GemmKernel)
ISAS = ("avx512", "amx", "amx_emu")


# n-blocks the streamed transposed form (5-24 rows) reads side by side (GemmSchedule.sb): each pass
# over them walks the group's whole fp32 output (m x K, 64-448 KB) through L2, so more blocks per pass
# mean fewer passes; but each block is a stream prefetched ahead into L1 (HostTuning.stream_prefetch),
# and 16 streams' lines in flight crowd a 32 KB L1. MoE backward at qlen 128 (groups of 8-16 rows),
# same-process A/B. Zen 5 (48 KB L1d), against 4: slow memory mode qwen3 -2.9%, deepseek-v2-lite
# -2.3%, dsv3-64e -0.7%; fast mode deepseek-v2-lite -14.2% (8: -5.7%, 32: +4.7%; 2: +14.6%); int8 /
# int4 -0.2% / +0.9%. Zen 4 (32 KB L1d), against 16: 8 blocks qwen3 -9..-15%, deepseek-v2-lite -10..
# -13%, dsv3-64e -2..-7%, int8 / int4 +-0.5% (4 blocks about as 8; 16 blocks prefetching 512 B ahead
# -5%, 2 KB ahead +2..+3%). Sixteenth session, Zen 4, 4 against 8: qwen3 -2.2..-2.9% (tools/tune.py:
# -1.6 / -5.7%), deepseek-v2-lite -4.8..-6.1%, dsv3-64e -4.6..-6.6%, int8 +0.7%, int4_kgroup -2%.
STREAM_GROUP_BLOCKS = 16
LANE_PARTIAL_SLICE = 256  # k-pair rows per K-slice of the lane-partial form at <= 4 rows (GemmSchedule.ls)
STREAM_PREFETCH = 1024  # bytes ahead along each weight stream of the streamed and lane-partial forms
QUANT_PREFETCH = 2048  # bytes ahead along each weight stream of the quantized forward (Zen 5: int8 +2-11%)
MULTIROW_PREFETCH = 2048  # bytes ahead of the bf16 forward's blocks of 3+ token rows (GemmSchedule.pfw)
# Bytes ahead of the quantized lane-partial forms' L2 prefetch (prefetcht1, schedule lf), next to
# their L1 one (schedule sp). Zen 4: cold, these kernels ran at ~0.82-0.89 of the bf16 form's bytes
# per second at 1-2 rows, as if the decode did not overlap the misses; kernel A/B, 8 cold experts,
# against none: int8 1 / 2 rows -4 / -6%, int4 -4..-5 / -5%, K-group int4 -4..-5 / -3%, int4 4 rows
# -1% (2 and 8 KB about the same or less; bf16, at the memory's rate already: +-1%, so not there).
# Zen 5 (thirty-ninth session) is faster without it: kernel level, 48 cold qwen3 gate/up experts,
# int8 1 / 2 rows 33.1 -> 36.2 / 32.0 -> 35.9 GB/s (the forward 41 GB/s, read 46-48 GB/s); MoE
# backward with LoRA, qwen3, same-process A/B (tools/tune.py), none against 4 KB: int8 qlen 1 / 16 /
# 128 -4.6 / -2.9 / -4.4% (2 KB: -3.5 / -1.9 / -0.3%), int4 -6.1 / -4.8 / -3.3%, int4_1 qlen 16
# -5.3%, int4_kgroup qlen 16 -3.7%, int4_1kgroup qlen 128 -4.7%. So LARGE_L1_TUNING has none.
QUANT_FAR_PREFETCH = 4096
SMALL_L1 = 48 << 10  # an L1 data cache below this size selects the small-L1 values below
# The tokens-in-lanes form from groups of this many rows (schedule tl), and above only where the
# last 16-row tile holds at least 12 (kernels.dytiles.LANES_TAIL_MIN). Zen 4, kernel level, 32-96
# cold experts of one row count in one launch, against the default forms in the same process
# (qwen3 gate/up N 1536 K 2048 / dsv3-64e gate/up N 4096 K 7168): 12-15 rows within -6..+7% either
# way (+2% on average: all 16 lanes cost the same), 16 rows -8% / -6..-30%, 10 rows +7%, 20 and 24
# rows (a tile of 4 or 8 tokens after a full one) +33% and +18%, 28 rows -4%, 32 rows -10..-11%,
# 48 rows -8%, 64 rows -5..-6%. With the weights in L3 the form runs at the forward's speed
# (16 rows 1.06x, 32 rows 1.01x; the streamed form 1.23x, the panel 1.17x); cold it reads 512-byte
# pieces of each n-block where the forward reads whole blocks, and stays at 0.8x the forward's
# bandwidth (a second prefetch into L2 further ahead: +4..+6%). MoE backward, same process, against
# no tokens-in-lanes form: qlen 512 qwen3 -1.5%, deepseek-v2-lite -5%, dsv3-64e -3.7%; qlen 128
# (8-16 rows per expert) within +-1%.
# Zen 5 (thirty-sixth session, MoE backward with LoRA, tools/tune.py's same-process rounds, 12 per
# pair): without the form qwen3 qlen 128 +-1..2%, 256 -5.4%, 512 -3.0..-3.5%, 1024 -8.0%;
# deepseek-v2-lite qlen 128 -1.5%, 512 -7.1%; dsv3-64e qlen 128 -2.0%, 512 -7.9%. There the panel
# and the streamed form keep up with the weight stream, so the 48 KB-L1 values leave it off
# (HostTuning.lanes_min_rows 0; docs/tune_zen5_thirtysixth.json).
LANES_MIN_ROWS = 16

# n-blocks per L1 panel of the bf16 transposed panel form (groups above the streamed form's rows;
# schedule kc, rounded down to a divisor of N/16): the panel (2 KB per n-block), the dY rows' slice
# of the chunk (32 B per row and n-block) and the item's outputs (256 B per row) share the L1 data
# cache with the weight prefetches. At 16 n-blocks a 32-row group needs 56 KB, more than Zen 5's 48
# KB. Thirty-seventh session, Zen 5, MoE backward with LoRA, same-process A/B (6 rounds) against 16:
# qlen 512 qwen3 -8.6% (three runs: -7.3..-8.6%), deepseek-v2-lite -6.6%, dsv3-64e -3.7%; qwen3
# qlen 256 -2.2%; dsv3-64e qlen 128 +-0.3%; 4 n-blocks -7.0 / -5.1 / -2.2% at qlen 512. The quantized
# panels keep 16 (QUANT_PANEL_BLOCKS: 8 was +1% for int8, +3% for int4 at qlen 512; their int32
# flushes and decode work come once per chunk). Zen 4's 32 KB L1 (untimed there) gets 4: the same
# share of its L1 as 8 of Zen 5's.
PANEL_BLOCKS = 8
QUANT_PANEL_BLOCKS = 16
# Row blocks of the panel form that share the next n-chunk's prefetch (schedule ``ps``; as many as a
# group has full ones, a power of two up to this and up to the lines of one panel step: bf16 4,
# int8 2, int4 1). Until the fortieth session the first row block requested the whole next chunk
# (4 lines per step for bf16) and each fill requested the slice of the block 4 ahead again, a 2 KB
# burst. Zen 5, kernel level (qwen3 gate/up, 32 rows, cold): with the weight loads pointed at two
# hot blocks but the prefetches left in place the form still ran 1.34-1.38x the forward's time,
# without the prefetches 1.02x: the cost was the requests, not the transposition (timed without it:
# -4..+3%). MoE backward qwen3 qlen 512, change in time, spread over 2 row blocks: each line
# requested once +5.1%, twice -4.5%, three times -2.2% (prefetcht0 instead of t1: -2.0% twice), as
# if Zen 5 dropped software prefetches while its miss buffers are full; the fill's own request
# only where the shared one does not reach (the first chunk) a further -1..-2%. MoE backward with
# LoRA, same-process A/B against the old code (8 rounds): qwen3 qlen 512 -5.7% (up to 2: -4.8%),
# deepseek-v2-lite qlen 128 -6.5%, qlen 512 -2.8%, qwen3 qlen 128 +-1% (few groups reach the panel
# there), int8 (2) qwen3 qlen 512 -4.0%. A fixed 4 sharing blocks whatever the group's count
# (groups of 13-23 rows have 2-3) was -9.4% at qwen3 qlen 512 but +3% at qlen 128 and +6..+9% at
# kernel level for 13-20 rows. Zen 4: not measured.
PANEL_PREFETCH_SHARE = 4

# The AVX-512 forward's register block: at most this many fp32/int32 accumulators (rows x column
# blocks; 6 x 4 by default); a wider item runs a block of more rows as column groups in turn.
FWD_ACCUMULATORS = 24
INT4_FWD_BLOCKS = 8  # HostTuning.int4_fwd_blocks on Zen 4 (see default_schedule) and unknown CPUs


OPTIONAL_PREFETCHES = ("quant_far_prefetch",)  # HostTuning prefetch distances that may be 0 (none)


@dataclass(frozen=True)
class HostTuning:
    """Schedule values of the AVX-512 GEMMs (mostly the transposed ones) that differ between the
    CPUs measured, chosen by the L1 data cache size: Zen 5 (48 KB; also the values for every CPU
    with 48 KB or more, e.g. Sapphire Rapids) and Zen 4 (32 KB; used for every smaller or unknown
    L1); the slice length, the prefetch distances and the tokens-in-lanes form follow Zen 4 and Zen
    5 themselves, not their L1: the L1 size is how the two are told apart.
    A setting ``tools/tune.py --save`` measured and stored for this CPU kind replaces them
    (runtime/tuning_store.py), and KT_JIT_TUNING overrides any of them (names as the fields). The
    AMX kernels do not use them.

    stream_group_blocks: the streamed transposed form's n-blocks per pass (schedule ``sb``, >= 1)
    lane_partial_slice: the lane-partial form's K-slice in k-pair rows (schedule ``ls``, a multiple
        of 16, >= 64; single-group launches keep LANE_PARTIAL_SLICE)
    lanes_min_rows: the smallest group of the tokens-in-lanes form (schedule ``tl``: 12-16, or 0
        for none) in launches that pass dY in its layout
    stream_prefetch: bytes the streamed and lane-partial transposed forms prefetch ahead along each
        weight stream (schedule ``sp``)
    quant_prefetch: bytes the quantized forward GEMM prefetches ahead along each weight stream
        (schedule ``pf`` = this / the packed row's bytes)
    multirow_prefetch: bytes the bf16 forward GEMM prefetches ahead for its register blocks of more
        than 2 token rows (schedule ``pfw`` = this / 64)
    panel_blocks: n-blocks per L1 panel of the bf16 transposed panel form (schedule ``kc``: the
        largest divisor of N/16 up to this, 1-32)
    quant_far_prefetch: bytes the quantized lane-partial transposed form prefetches ahead into L2
        along each weight stream, next to its ``stream_prefetch`` into L1 (schedule ``lf``; 0 = none)
    int4_fwd_blocks: column blocks per work item of the per-channel int4 forward (schedule ``nr``:
        4 or 8; where N is not a multiple of 128 it takes 4, or 2 if N is not one of 64; K-group
        int4 takes 4 as well)
    """

    stream_group_blocks: int
    lane_partial_slice: int
    lanes_min_rows: int = LANES_MIN_ROWS
    stream_prefetch: int = STREAM_PREFETCH
    quant_prefetch: int = QUANT_PREFETCH
    multirow_prefetch: int = MULTIROW_PREFETCH
    panel_blocks: int = PANEL_BLOCKS
    quant_far_prefetch: int = QUANT_FAR_PREFETCH
    int4_fwd_blocks: int = INT4_FWD_BLOCKS

    def __post_init__(self) -> None:
        # (upper bounds: the stack a worker may need, see runtime/threads.KERNEL_STACK_MIN: the
        # lane-partial form's accumulators, within LP_ACC_BYTES; the int4 K-group streamed form's dY scratch)
        if not 1 <= self.stream_group_blocks <= 32:
            raise ValueError(f"stream_group_blocks={self.stream_group_blocks}: 1-32")
        if not 64 <= self.lane_partial_slice <= 1024 or self.lane_partial_slice % 16:
            raise ValueError(f"lane_partial_slice={self.lane_partial_slice}: a multiple of 16 in 64-1024")
        if not 1 <= self.panel_blocks <= 32:
            raise ValueError(f"panel_blocks={self.panel_blocks}: 1-32")
        if self.int4_fwd_blocks not in (4, 8):
            raise ValueError(f"int4_fwd_blocks={self.int4_fwd_blocks}: 4 or 8")
        if self.lanes_min_rows and not LANES_TAIL_MIN <= self.lanes_min_rows <= 16:
            raise ValueError(f"lanes_min_rows={self.lanes_min_rows}: {LANES_TAIL_MIN}-16, or 0 for none")
        for name in (f.name for f in dataclasses.fields(self) if f.name.endswith("_prefetch")):
            value, may_be_off = getattr(self, name), name in OPTIONAL_PREFETCHES
            if (not 64 <= value <= 8192 or value % 64) and not (may_be_off and value == 0):
                none = ", or 0 for none" if may_be_off else ""
                raise ValueError(f"{name}={value}: a multiple of 64 in 64-8192 (bytes){none}")


LARGE_L1_TUNING = HostTuning(STREAM_GROUP_BLOCKS, LANE_PARTIAL_SLICE, lanes_min_rows=0, quant_far_prefetch=0,
                             int4_fwd_blocks=4)
# The per-channel int4 forward's work items: 4 column blocks on Zen 5, where a 1-row item with 8
# streams its codes at 0.75-0.82 of the bf16 forward's rate and with 4 at 0.84-0.90 (kernel level,
# 32 cold qwen3 gate/up experts per launch, same process). MoE forward with LoRA, same-process A/B
# against 8 (forty-sixth session): qwen3 int4 qlen 1 / 16 / 128 +3.3 / +3.0 / +1.4%, int4_1 +0.4 /
# +2.0 / +0.5%, deepseek-v2-lite int4 qlen 1 / 16 +0.1 / +3.0%, dsv3-64e +10.2 / -0.3%. Zen 4 keeps
# 8 (INT4_FWD_BLOCKS).
# The lane-partial form's slice: 1024 k-pair rows (one piece per n-block for K <= 2048, instead of
# four visited at different times; 64 KB of accumulators per row, in L2). MoE backward, Zen 4,
# same-process A/B against 256: qwen3 qlen 1 -4.5..-5.7%, qlen 16 -4.9..-5.0% (512: -4.1..-4.5%),
# qlen 128 +-0.7%, deepseek-v2-lite qlen 16 -1.5..-10%, dsv3-64e qlen 16 -4.7%, int8 qlen 16 -12..-13%,
# int4 (5-8-row slices 256 instead of 64) -1%. On Zen 5 (kernel level, 8 experts x 1 row) 1024 read
# within +-3% of 256.
# Both prefetch distances shorter on Zen 4 (seventeenth session, MoE in-process A/B, qwen3, LoRA on,
# 25-30 GB/s memory mode): the quantized forward 256 B ahead against 2 KB, qlen 1 / 16 / 128: int8
# -5..-8 / -6..-8 / -1..-5%, int4 -5 / -6..-7 / +-1%, int4_kgroup -10 / -7% (512 B: int8 -6 / -7%,
# int4 -4..-10%, int4_kgroup +3 / -4%); the streamed and lane-partial transposed forms 512 B ahead
# against 1 KB, backward at qlen 1 / 16 / 128: int8 -6 / -1..-4 / 0%, int4 -6 / -1..-6%, bf16
# -1..-6 / -1..-7 / -6..-8% (256 B about the same, 2 KB +-5%). tools/tune.py: docs/tune_zen4_prefetch.json.
# The bf16 forward's blocks of 3+ rows 512 B ahead against 2 KB: qwen3 qlen 128 -4.4 / -4.8%, qlen
# 512 -3..-4%, deepseek-v2-lite qlen 128 +-0 (its blocks of 1-2 rows keep 1 KB: 256 B was -4.5% at
# qlen 16 but +2% at qlen 1, 512 B -1% / +3%).
SMALL_L1_TUNING = HostTuning(4, 1024, stream_prefetch=512, quant_prefetch=256, multirow_prefetch=512,
                             panel_blocks=4)


def host_tuning() -> HostTuning:
    """The schedule values for this CPU (see :class:`HostTuning`): the built-in ones chosen by the L1
    size, replaced by the setting ``tools/tune.py --save`` stored for this CPU kind (a file it cannot
    use is ignored with a warning), then by KT_JIT_TUNING's overrides (a ValueError for a bad one;
    the MoE operator checks it at every call, before any work)."""
    return _tuning_for(knobs.raw("KT_JIT_TUNING"), l1d_cache_bytes(), tuning_store.stored_values())


@functools.lru_cache(maxsize=16)
def _tuning_for(raw_value: str | None, l1d_bytes: int, stored: tuple[tuple[str, int], ...]) -> HostTuning:
    base = LARGE_L1_TUNING if l1d_bytes >= SMALL_L1 else SMALL_L1_TUNING
    if stored:
        try:
            base = replaced(base, dict(stored))
        except ValueError as e:
            tuning_store.warn_unusable(str(e), stacklevel=4)
    overrides = knobs.parse_tuning(raw_value)
    try:
        return replaced(base, overrides) if overrides else base
    except ValueError as e:
        raise ValueError(f"KT_JIT_TUNING: {e} ({knobs.TUNING_HINT})") from None


def tuning_report() -> dict:
    """The HostTuning values in effect and where they came from, for ``python -m kt_jit.info`` and
    the benchmarks' machine rows: ``values`` (or ``error``, a bad KT_JIT_TUNING), ``env``
    (KT_JIT_TUNING), ``stored`` (the stored setting used), ``file`` and ``file_used``
    (KT_JIT_STORED_TUNING), ``file_problem`` (why the stored file is ignored, "" if it is not;
    reported by a process's first look only)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            values: dict = {"values": dict(vars(host_tuning()))}
        except ValueError as e:
            values = {"error": str(e)}
    return {**values, "env": knobs.raw("KT_JIT_TUNING") or "", "stored": dict(tuning_store.stored_values()),
            "file": str(tuning_store.tuning_path()), "file_used": knobs.stored_tuning_enabled(),
            "file_problem": "; ".join(str(w.message).removeprefix("kt_jit: ") for w in caught)}


def replaced(base: HostTuning, values: dict[str, int]) -> HostTuning:
    """``base`` with ``values`` ({field name: integer}); a ValueError names an unknown field or a
    value out of range."""
    names = [f.name for f in dataclasses.fields(HostTuning)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(f"unknown name(s) {unknown}; the names are {names}")
    return dataclasses.replace(base, **values)


@dataclass(frozen=True)
class GemmSchedule:
    """Blocking of one GEMM kernel; emitters only translate it.

    mr: token rows per register block (AVX-512) or 16-row tiles per block (AMX, 1 or 2)
    nr: 16-wide output-column groups per work item (fwd, bwd "panel") or k-pair rows per item / 8
        (bwd "fold")
    kc: fwd: k-pairs per L2 chunk of the weight panel; bwd "panel": 16-row n-blocks per L1 panel
        (0 = all of the reduction)
    pf: software prefetch distance for weight lines, in k-pair rows (fwd) or n-blocks (bwd); 0 = off
    pfw: AVX-512 fwd: the distance for register blocks of more than 2 token rows (0 = pf; nonzero
        prefetches those blocks even when pf is 0); their longer compute per weight row needs the
        lines requested earlier for DRAM to stay busy
    pfn: prefetch the next chunk into L2 while computing from the current one, so DRAM keeps
        streaming: AVX-512 fwd, spread over the row blocks of a K-chunk (the first one only in
        groups of FETCH_ALL_ROWS full blocks or more); transposed "panel", in the first row block
        over each n-chunk's panel
    form: AVX-512 transposed GEMM only: "panel" transposes each weight block in registers into an
        L1 panel in forward layout and runs the forward micro-kernel on it; "fold" multiplies the
        packed rows directly and folds lanes at the end (see the module docstring)
    sm: "panel" only: groups with at most this many rows take the ``small`` path instead (0 = never);
        at run time the limit drops to STREAM_ALIASED_MAX unless both row pitches are odd
        multiples of 64 bytes (rows a multiple of 4 KB apart would crowd a few L1 sets)
    small: "stream": such a group is streamed whole by its first work item (the weight read front
        to back as the forward reads it); "fold": the fold form's work item (single groups: its items
        split the outputs over the threads)
    lp: "panel" only: groups with at most this many rows (<= sm; <= LANE_PARTIAL_MAX for bf16,
        QUAD_MAX_ROWS for int4 and int8) take the lane-partial form instead, whole by their first
        work item unless ``lps`` (0 = never)
    lps: with lp, the lane-partial form's K-slices go to the group's first work items, one each,
        instead of all to the first (launches of a single group: the other threads get a share)
    sb: "panel" with small "stream": n-blocks the streamed form reads side by side per pass over the
        group's output (the largest of sb, 8, 4, 2, 1 that is at most sb and divides N/16)
    ls: with lp, k-pair rows per K-slice of the lane-partial form at up to LANE_PARTIAL_UNROLL rows
        (a quarter of it above; rounded down to a multiple of 16 that divides the K-group or K/2)
    pfi: AVX-512 fwd with pfn: at an item's last K-chunk (where pfn has no next chunk to fetch)
        the row blocks after the first prefetch the first chunk of the item this thread runs next
        (claimed at the start of that chunk, see codegen.worker.build_worker; only by items with
        more rows than mr, the ones with such blocks), so DRAM keeps streaming while they compute
        from L2
    tl: "panel" bf16 only: groups of at least this many rows (12-16) whose last 16-row tile is full
        or holds at least 12 take the tokens-in-lanes form, before any of the forms above (0 =
        never; see kernels.dytiles.lanes_rows); their dY arrives in that form's layout through an
        extra group field
    sp: bytes the streamed and lane-partial forms prefetch ahead along each weight stream
    lf: quantized lane-partial form (not ``lps``): bytes ahead of a second prefetch along each weight
        stream, into L2 (0 = none; only when beyond ``sp``)
    ps: "panel" with pfn: up to this many full row blocks (a power of two) share the next n-chunk's
        prefetch, each requesting its part at every panel step; with more than one, the fill's
        ``pf`` prefetch covers only the first chunk (and groups without a full row block)
    """

    mr: int
    nr: int
    kc: int = 0
    pf: int = 0
    form: str = ""
    sm: int = 0
    small: str = "stream"
    pfn: bool = False
    lp: int = 0
    pfw: int = 0
    lps: bool = False
    pfi: bool = False
    sb: int = STREAM_GROUP_BLOCKS
    ls: int = LANE_PARTIAL_SLICE
    tl: int = 0
    sp: int = STREAM_PREFETCH
    lf: int = 0
    ps: int = 1

    def __str__(self) -> str:
        sb = f"b{self.sb}" if self.sm and self.small == "stream" else ""
        small = f"s{self.sm}{self.small}{sb}" if self.sm else ""
        lp = f"l{self.lp}{'s' if self.lps else ''}x{self.ls}" if self.lp else ""
        pfw = f"w{self.pfw}" if self.pfw else ""
        ahead = ("n" if self.pfn else "") + ("i" if self.pfi else "")
        tl = f"t{self.tl}" if self.tl else ""
        sp = f"f{self.sp}" if self.sp != STREAM_PREFETCH else ""
        lf = f"g{self.lf}" if self.lf else ""
        ps = f"r{self.ps}" if self.ps != 1 else ""
        return f"m{self.mr}n{self.nr}k{self.kc}p{self.pf}{pfw}{ahead}{self.form}{small}{lp}{tl}{sp}{lf}{ps}"


def default_schedule(op: str, isa: str, n: int, k: int, quant: str = "bf16", one_group: bool = False,
                     group_size: int = 0, lanes_dy: bool = False, tuning: HostTuning | None = None) -> GemmSchedule:
    """Schedule used when none is given (AVX-512: measured on Zen 4 and Zen 5; AMX: the 2x2-tile
    kernel). Transposed GEMM: groups of 1-4 rows (int4 and int8: up to QUAD_MAX_ROWS, K-group int4
    fewer for long groups, see LP_ACC_BYTES) take the lane-partial form (one thread per group);
    larger groups of up to 24 rows (bf16 and K-group int4; 12 unless the row pitches are odd
    multiples of 64 bytes) are streamed whole by one thread (16 n-blocks per pass with a 48 KB L1
    data cache, 4 with a smaller one: :func:`host_tuning`), larger ones go through the L1 panel
    (bf16: up to ``HostTuning.panel_blocks`` n-blocks per panel, 8 or 4; quantized: 16). Small
    groups take the fold form instead in launches of a single group (``one_group``:
    streaming it would leave the other threads idle; the fold form splits its outputs over work
    items); a single group (``one_group``, bf16 and int8, K long enough for a slice per thread) of
    1-8 rows takes the lane-partial form with its K-slices spread over the work items (``lps``).
    ``lanes_dy``: the launches also pass each group's dY in the tokens-in-lanes layout
    (kernels/dytiles.py, an extra group field), so bf16 groups of ``HostTuning.lanes_min_rows`` rows
    or more take that form (:data:`LANES_MIN_ROWS` with a small L1, none with a 48 KB one).
    ``tuning``: the per-CPU values to use (default: :func:`host_tuning`)."""
    if isa == "avx512":
        host = tuning or host_tuning()
        if op == "fwd":  # quantized: HostTuning.quant_prefetch bytes ahead (Zen 5 2 KB, Zen 4 256 B);
            # bf16: next-chunk prefetch measured m=12 +6%, m=24 +13%, m<=8 +-2% (int8: +-1% alone)
            pf = 16 if quant == "bf16" else host.quant_prefetch // ROW_BYTES[quant]
            # bf16 blocks of 4-6 rows: HostTuning.multirow_prefetch ahead, 32 rows on Zen 5 (kernel
            # A/B, 8 cold experts: m=4 -3%, m=6 -7%, m=8 -11%, m=12 -3%; m<=2 keeps 16, where 32
            # measured +3.5%), 8 on Zen 4
            pfw = host.multirow_prefetch // ROW_BYTES["bf16"] if quant == "bf16" else 0
            # pfi (with pfn): MoE forward A/B on Zen 5 (qwen3, no LoRA), claiming at the item's start:
            # bf16 qlen 128 -2.9%, 512 -4.1%, 16 -1.1%, 1 +-1%; qlen 128 int8 -2.7%, int4 -7.1%,
            # int4_kgroup -3.7%; claiming at the last chunk (kept): bf16 qlen 128 -0.4..-1.6%, 512 -3.1%
            # per-channel int4: HostTuning.int4_fwd_blocks column blocks per item; Zen 4 8 (blocks of
            # 4+ rows as two groups of 4: FWD_ACCUMULATORS). MoE forward A/B, Zen 4, qwen3, LoRA on,
            # against 4: qlen 1 -5..-7%, qlen 16 -5..-6%, qlen 128 +-1% (int4_1: -5 / -3%); Zen 5 4
            # (see LARGE_L1_TUNING); int8 (-1 / -2 / 0%) and int4_kgroup (+2 / -3%) keep 4
            wide = quant == "int4" and not group_size and n % 128 == 0 and host.int4_fwd_blocks == 8
            nr = 8 if wide else 4 if n % 64 == 0 else 2
            return GemmSchedule(mr=6, nr=nr, kc=_chunk(k // 2, 256), pf=pf, pfn=True, pfw=pfw, pfi=True)
        # streaming a whole small group beats the panel up to 24 rows when the row pitches are odd
        # multiples of 64 B (measured on Zen 5: m=14-24 1.1-1.6x, m=32 0.9x); otherwise the kernel
        # lowers the limit to STREAM_ALIASED_MAX at run time (the rows would crowd a few L1 sets)
        # K-group int4 streams too since its streamed form puts the group scales on dY (weights exact
        # in bf16): MoE backward qlen 128, Zen 4, in-process against the fold form up to 8 rows and
        # the panel above (the earlier default): int4_kgroup -13.5%, int4_1kgroup -13%
        small = "fold" if one_group else "stream"
        # pfn: the panel's first row block prefetches the next n-chunk (measured m=16-32 +13-17%)
        # lp against the transposing forms, same-run A/B on Zen 5: bf16 1-4 rows 1.1-1.2x (dsv3
        # gate/up; 5-8 rows 0.9-1.0x, so 4); int4 1-8 rows: K-group 1.5x over the fold form, per
        # channel MoE backward qlen 16 -10%, qlen 128 -5%; int8 5-8 rows neutral (4).
        # A single group (one_group): its K-slices as work items (lps) against the fold form, kernel
        # A/B on Zen 5, weights cold, N x K in {2048 x 7168, 7168 x 2048, 2048 x 768, 768 x 2048}:
        # bf16 1 row +5..+13%, 4 rows +17..+26%, 8 rows +4..+11%; int8 1 row -6..+30%, 4 rows
        # +60..+67%, 8 rows +20..+58%. Only where K/2 holds at least one 1-4-row slice per thread
        # (and two), else threads would idle where the fold form's K/64 items keep them all busy
        # (int4 has no single-group API: unmeasured, fold).
        # (Their slices keep LANE_PARTIAL_SLICE on every CPU: a slice per work item.)
        slices = k // 2 // _chunk(k // 2, LANE_PARTIAL_SLICE)
        one = one_group and quant in ("bf16", "int8") and slices >= max(2, default_num_threads())
        lp = 8 if one else 0 if one_group else 4
        tl = host.lanes_min_rows if lanes_dy and quant == "bf16" and not one_group else 0
        stream_max = 24
        if quant != "bf16" and not one_group:
            # the lane-partial form's quad steps up to QUAD_MAX_ROWS rows, none streamed; K-groups:
            # fewer when their accumulators, rows x one group's pairs x 64 B, would pass LP_ACC_BYTES,
            # then streamed up to 24 rows (the panel +22..+47% there: it dequantizes through fp32)
            kind = _quad_kind(quant, group_size)
            lp = QUAD_MAX_ROWS[kind]
            if group_size:
                lp = max(QUAD_UNROLL[kind], min(lp, LP_ACC_BYTES // (group_size // 2 * 64)))
            stream_max = max(lp, stream_max if group_size else 0)
        panel = host.panel_blocks if quant == "bf16" else QUANT_PANEL_BLOCKS
        nr = 4 if k % 64 == 0 else 2
        ps = max(1, min(PANEL_PREFETCH_SHARE, nr * ROW_BYTES[quant] // 64))  # a panel step's lines at most
        return GemmSchedule(mr=6, nr=nr, kc=_divisor(n // 16, panel), pf=4, form="panel",
                            sm=stream_max if small == "stream" else 8, small=small, pfn=True, lp=lp, lps=one,
                            sb=host.stream_group_blocks,
                            ls=LANE_PARTIAL_SLICE if one_group else host.lane_partial_slice, tl=tl,
                            sp=host.stream_prefetch, lf=0 if quant == "bf16" else host.quant_far_prefetch, ps=ps)
    return GemmSchedule(mr=2, nr=2)


def _divisor(total: int, target: int) -> int:
    """Largest divisor of ``total`` that is <= target."""
    return max(d for d in range(1, min(total, target) + 1) if total % d == 0)


def _chunk(total: int, target: int) -> int:
    """Largest multiple of 16 that divides ``total`` and is <= target (total is a multiple of 16)."""
    best = 16
    for c in range(16, min(total, target) + 1, 16):
        if total % c == 0:
            best = c
    return best


@dataclass(frozen=True)
class GemmSpec:
    """Everything that selects one compiled GEMM kernel."""

    op: str            # "fwd" (Y = X W^T) or "bwd" (dX = dY W)
    n: int             # weight rows (output channels of fwd)
    k: int             # weight columns (reduction of fwd)
    isa: str           # "avx512", "amx" or "amx_emu"
    accumulate: bool   # add into the output instead of overwriting it
    schedule: GemmSchedule
    quant: str = "bf16"  # weight storage: "bf16", "int8" or "int4"
    group_size: int = 0  # int4: scales per group of this many K (0 = per output channel)
    zero_point: bool = False  # int4: per-channel/group zero points (else symmetric, z = 8)
    # fused LoRA (AVX-512): fwd Y += H B^T with H [m, rank] bf16 and B [N, rank] bf16 (nn.Linear
    # layout); bwd dX += T A with T [m, rank] bf16 and A [rank, K] bf16
    lora_rank: int = 0
    # fwd: outputs n >= split use the second adapter (and H's second half); bwd: nonzero = two
    # adapters, T = [T0 | T1] and dX += T0 A0 + T1 A1 (0: one adapter)
    lora_split: int = 0

    def __post_init__(self) -> None:
        if self.op not in ("fwd", "bwd"):
            raise ValueError(f"op must be 'fwd' or 'bwd', got {self.op!r}")
        if self.isa not in ISAS:
            raise ValueError(f"isa must be one of {ISAS}, got {self.isa!r}")
        check_gemm_dims(self.n, self.k)
        if self.quant not in QUANTS:
            raise ValueError(f"quant must be one of {QUANTS}, got {self.quant!r}")
        if (self.group_size or self.zero_point) and self.quant != "int4":
            raise ValueError("group_size and zero_point apply to int4 weights only")
        if self.group_size and (self.group_size % 32 or self.k % self.group_size):
            raise ValueError(f"group_size={self.group_size} must be a multiple of 32 that divides K={self.k}")
        sch = self.schedule
        avx512_fwd = (self.op, self.isa) == ("fwd", "avx512")
        if self.quant == "int4" and avx512_fwd and sch.kc % 2:
            raise ValueError(f"int4 forward kernels step k-pair rows two at a time: kc={sch.kc} must be even")
        if self.group_size and avx512_fwd and (not sch.kc or (self.group_size // 2) % sch.kc):
            raise ValueError(f"grouped weights need a kc that divides group_size/2 = {self.group_size // 2}, "
                             f"got kc={sch.kc}")
        # products summed in int32 before a flush to fp32: fwd a K-chunk (2 kc), bwd an n-chunk (16 kc)
        per_flush = (2 * (sch.kc or self.k // 2)) if self.op == "fwd" else 16 * (sch.kc or self.n // 16)
        if self.int_x and per_flush * ACT_MAX * QMAX[self.quant] >= 2 ** 31:
            raise ValueError(f"kc={sch.kc} would overflow the int32 accumulators of the {self.quant} kernel; "
                             "use a smaller kc")
        if sch.form not in ("", "panel", "fold") or (sch.form and (self.op, self.isa) != ("bwd", "avx512")):
            raise ValueError(f"schedule form {sch.form!r}: 'panel' or 'fold' for the AVX-512 transposed GEMM only")
        if sch.small not in ("stream", "fold"):
            raise ValueError(f"schedule small={sch.small!r}: 'stream' or 'fold'")
        if sch.pfw < 0 or (sch.pfw and (self.op, self.isa) != ("fwd", "avx512")):
            raise ValueError(f"schedule pfw={sch.pfw}: a non-negative distance, for the AVX-512 forward GEMM only")
        if sch.pfi and ((self.op, self.isa) != ("fwd", "avx512") or not sch.pfn):
            raise ValueError("schedule pfi (prefetch the next item's first chunk): the AVX-512 forward GEMM "
                             "with pfn only")
        if sch.sb < 1:
            raise ValueError(f"schedule sb={sch.sb}: the streamed form reads at least one n-block per pass")
        if sch.ps < 1 or sch.ps & (sch.ps - 1) or (sch.ps > 1 and not (self.is_panel and sch.pfn)):
            raise ValueError(f"schedule ps={sch.ps}: row blocks sharing the next-chunk prefetch, a power of two "
                             "(above 1 only for the 'panel' transposed GEMM with pfn)")
        if sch.lf < 0:
            raise ValueError(f"schedule lf={sch.lf}: a distance in bytes, or 0 for none")
        if sch.ls < 64:
            raise ValueError(f"schedule ls={sch.ls}: K-slices of at least 64 k-pair rows (16 above 4 rows)")
        if sch.tl and not (self.is_panel and self.quant == "bf16" and LANES_TAIL_MIN <= sch.tl <= 16):
            raise ValueError(f"schedule tl={sch.tl}: {LANES_TAIL_MIN}-16 rows, for the bf16 'panel' transposed GEMM "
                             "only")
        if sch.sm and not self.is_panel:
            raise ValueError("schedule sm (streamed small groups) applies to the 'panel' transposed GEMM only")
        lp_max = QUAD_MAX_ROWS[_quad_kind(self.quant, self.group_size)] if self.quant != "bf16" else LANE_PARTIAL_MAX
        if sch.lps and self.quant == "int4":
            raise ValueError("schedule lps (lane-partial K-slices as work items): bf16 and int8 only")
        if sch.lp and not (self.is_panel and 0 < sch.lp <= min(sch.sm, lp_max)):
            raise ValueError(f"schedule lp={sch.lp}: the 'panel' transposed GEMM only, at most "
                             f"min(sm, {lp_max}) rows")
        slices = max(self.k // 2 // _lane_partial_slice(self, r) for r in _lane_partial_variants(self)) if sch.lp else 0
        if sch.lps and (not sch.lp or self.lora_rank or slices > self.items_per_group):
            raise ValueError("schedule lps (lane-partial K-slices as work items): needs lp, no fused LoRA, and "
                             "at most as many slices as work items per group")
        if self.is_panel:
            if sch.kc < 0 or (sch.kc and (self.n // 16) % sch.kc):
                raise ValueError(f"schedule kc={sch.kc} must divide N/16={self.n // 16}")
        elif sch.kc < 0 or (sch.kc and (self.k // 2) % sch.kc):
            raise ValueError(f"schedule kc={sch.kc} must divide K/2={self.k // 2}")
        if self.isa == "avx512" and self.op == "fwd" and (self.n // 16) % sch.nr:
            raise ValueError(f"schedule nr={sch.nr} must divide N/16={self.n // 16}")
        if self.isa == "avx512" and self.op == "bwd" and (self.k // 16) % sch.nr:
            raise ValueError(f"schedule nr={sch.nr} must divide K/16={self.k // 16}")
        if self.lora_rank or self.lora_split:
            if self.isa != "avx512":
                raise ValueError("fused LoRA is implemented for the AVX-512 GEMMs only")
            if self.lora_rank <= 0 or self.lora_rank % 16:
                raise ValueError(f"lora_rank={self.lora_rank} must be a positive multiple of 16")
            if self.op == "fwd" and self.lora_split and (self.lora_split >= self.n or self.lora_split % (16 * sch.nr)):
                raise ValueError(f"lora_split={self.lora_split} must be below N={self.n} and a multiple of "
                                 f"{16 * sch.nr} (the outputs of one work item use one adapter)")

    @property
    def name(self) -> str:
        acc = "_acc" if self.accumulate else ""
        q = self.quant + (f"g{self.group_size}" if self.group_size else "") + ("z" if self.zero_point else "")
        lora = f"_lora{self.lora_rank}s{self.lora_split}" if self.lora_rank else ""
        return f"gemm_{self.op}_{q}_n{self.n}_k{self.k}_{self.isa}_{self.schedule}{acc}{lora}"

    @property
    def int_x(self) -> bool:
        """Integer kernel: x arrives as int16 rows with a per-row fp32 scale (made by
        :func:`kt_jit.kernels.rowquant.quantize_rows`) and meets the integer codes in vpdpwssd. Every
        quantized forward; the transposed GEMM (panel, streamed and lane-partial forms) of
        per-channel modes, whose x is dY diag(channel scales) -- a K-group's scale varies along K
        and cannot be folded into one int16 row of dY. (The AMX kernels decode the codes to bf16
        tiles: their x is bf16.)"""
        if self.quant == "bf16" or self.isa != "avx512":
            return False
        return self.op == "fwd" or (self.is_panel and not self.group_size and self.schedule.small == "stream")

    @property
    def scaled_dy(self) -> bool:
        """AMX transposed GEMM of per-channel quantized weights: its dY tiles hold dY diag(channel
        scales) rounded to bf16 (:func:`pack_dy_for_amx` with ``scales``; kernels/dytiles.py, scaled)
        and the codes are decoded exactly."""
        return self.op == "bwd" and self.isa != "avx512" and self.quant != "bf16" and not self.group_size

    @property
    def group_fields(self) -> int:
        """int64 fields per group descriptor."""
        return (GROUP_FIELDS + (XSCALE_FIELDS if self.int_x else 0) + (LANES_FIELDS if self.schedule.tl else 0)
                + (LORA_FIELDS if self.lora_rank else 0))

    @property
    def is_panel(self) -> bool:
        return self.op == "bwd" and self.isa == "avx512" and self.schedule.form != "fold"

    @property
    def row_bytes(self) -> int:
        return ROW_BYTES[self.quant]

    @property
    def items_per_group(self) -> int:
        if self.isa == "avx512":
            if self.op == "fwd":
                return self.n // (16 * self.schedule.nr)
            return self.k // 2 // (8 * self.schedule.nr)
        return self.n // 32 if self.op == "fwd" else self.k // 32


# ---------------------------------------------------------------------------------------------
# IR builders


def _group(fn: Function, ctx: str, item: str, ipg: int, fields: int = GROUP_FIELDS) -> tuple[str, ...]:
    g = fn.val(f"udiv i64 {item}, {ipg}")
    c = fn.val(f"urem i64 {item}, {ipg}")
    desc = fn.gep(ARGS.load_ptr(fn, ctx, "groups"), fn.mul(g, 8 * fields))
    x = fn.load("ptr", desc, 8)
    w = fn.load("ptr", fn.gep(desc, 8), 8)
    y = fn.load("ptr", fn.gep(desc, 16), 8)
    m = fn.load("i64", fn.gep(desc, 24), 8)
    rest = [fn.load("ptr", fn.gep(desc, 8 * f), 8) for f in range(4, fields)]
    return (c, x, w, y, m, *rest)


def _weight_row(fn: Function, spec: GemmSpec, ptr: str, zero_words: str | None = None, odd: bool = False) -> str:
    """One packed row (16 channels x one k-pair) as <32 x bfloat> of exact integers for quantized
    weights (int8 q, or int4 q - z); the scales are applied in fp32 elsewhere. ``odd``: the row's
    k-pair index is odd (int4 keeps rows 2i and 2i+1 in the two nibbles of the same bytes)."""
    if spec.quant == "bf16":
        return fn.load(BF16x32, ptr, 2)
    if spec.quant == "int8":
        q = fn.load("<32 x i8>", ptr, 1)
        f = fn.val(f"sitofp <32 x i8> {q} to <32 x float>")
        return fn.val(f"fptrunc <32 x float> {f} to {BF16x32}")
    return _int4_row(fn, _int4_codes(fn, ptr, odd), zero_words, False)


def _int4_codes(fn: Function, ptr: str, odd: bool) -> str:
    """The 32 codes of one packed int4 row (``ptr`` = its nominal 16-byte slot) in int16 words:
    rows 2i and 2i+1 share 32 bytes (low and high nibbles, see kernels/quant.py), so an even row
    is the low nibbles of the 32 bytes at ``ptr``, an odd one the high nibbles of those at ``ptr - 16``."""
    word = fn.gep(ptr, -16) if odd else ptr
    w = fn.val(f"zext <32 x i8> {fn.load('<32 x i8>', word, 1)} to {I16x32}")
    if odd:
        return fn.val(f"lshr {I16x32} {w}, <{', '.join(['i16 4'] * 32)}>")
    return fn.val(f"and {I16x32} {w}, <{', '.join(['i16 15'] * 32)}>")


def _int4_code_pairs(fn: Function, ptr: str) -> tuple[str, str]:
    """Rows 2i and 2i+1 (``ptr`` at row 2i) as codes (see :func:`_int4_codes`) from one load: a
    zero-extension to words, then a mask for the even row and a shift for the odd one."""
    codes = fn.load('<32 x i8>', ptr, 1)
    w = fn.val(f"zext <32 x i8> {codes} to {I16x32}")
    return (fn.val(f"and {I16x32} {w}, <{', '.join(['i16 15'] * 32)}>"),
            fn.val(f"lshr {I16x32} {w}, <{', '.join(['i16 4'] * 32)}>"))


def _int4_row(fn: Function, codes: str, zero: str | None, integer: bool) -> str:
    """int4 codes as a weight row (<32 x bfloat>-typed): ``integer``, the int16 words q - z
    (``zero`` = -z from :func:`_neg_zero`); else the bf16 values q - z (``zero`` = 16 - z from
    :func:`_zero_words`, then a 32-entry vpermw table whose entry v is bf16(v - 16): exact for every
    zero point in 0..15)."""
    if zero is None:  # (integer kernels that subtract the zero points' term after the sum)
        return vx.bitcast(fn, codes, I16x32, BF16x32)
    idx = fn.val(f"add {I16x32} {codes}, {zero}")
    if integer:
        return vx.bitcast(fn, idx, I16x32, BF16x32)
    sym = fn.module.declare("llvm.x86.avx512.permvar.hi.512",
                            f"declare {I16x32} @llvm.x86.avx512.permvar.hi.512({I16x32}, {I16x32})")
    table = "<" + ", ".join(f"i16 {_bf16_bits(v - 16)}" for v in range(32)) + ">"
    return vx.bitcast(fn, fn.val(f"call {I16x32} {sym}({I16x32} {table}, {I16x32} {idx})"), I16x32, BF16x32)


def _int_row(fn: Function, spec: GemmSpec, ptr: str, neg_zero: str | None, odd: bool = False) -> str:
    """One packed row (16 channels x one k-pair) of integer weights (int8 q, or int4 q - z;
    ``neg_zero`` from :func:`_neg_zero`) as int16 words, typed <32 x bfloat> like every weight row
    so the shuffles of the transposed GEMM apply unchanged (:func:`_mac` reads them as integers)."""
    if spec.quant == "int8":
        return vx.bitcast(fn, fn.val(f"sext <32 x i8> {fn.load('<32 x i8>', ptr, 1)} to {I16x32}"), I16x32, BF16x32)
    return _int4_row(fn, _int4_codes(fn, ptr, odd), neg_zero, True)


def _neg_zero(fn: Function, spec: GemmSpec, zptr: str) -> str | None:
    """int4: the words -z for the 32 elements of a row of channels zptr[0..16] (z = 8 when
    symmetric), for :func:`_int_row`; None for int8."""
    if spec.quant != "int4":
        return None
    return fn.val(f"sub {I16x32} {_zero_words(fn, spec, zptr)}, <{', '.join(['i16 16'] * 32)}>")


def _channel_zeros(fn: Function, spec: GemmSpec, zptr: str) -> str:
    """int4: the zero points of channels zptr[0..16] as <16 x i32> (8 when symmetric)."""
    if not spec.zero_point:
        return vx.i32x16_const([8] * 16)
    return fn.val(f"zext <16 x i8> {fn.load('<16 x i8>', zptr, 1)} to {I32x16}")


def _i16_dots(fn: Function, ptr: str, vectors: int | str, other) -> str:
    """<16 x i32> lane sums over ``vectors`` x 32 int16 values at ``ptr`` of their pairwise
    products with ``other(v)`` (the <32 x i16> matching vector v)."""
    acc = fn.var(I32x16, "zeroinitializer", 64)
    with fn.loop(0, vectors, name="i16dot") as v:
        acc.set(vx.dpwssd(fn, acc.get(), fn.load(I16x32, fn.gep(ptr, fn.mul(v, 64)), 2), other(v)))
    return acc.get()


def _sum_i16(fn: Function, ptr: str, vectors: int) -> str:
    """The i32 sum of ``vectors`` x 32 int16 values at ``ptr``."""
    lanes = _i16_dots(fn, ptr, vectors, lambda v: vec_const("i16", [1] * 32))
    sym = fn.module.declare("llvm.vector.reduce.add.v16i32", f"declare i32 @llvm.vector.reduce.add.v16i32({I32x16})")
    return fn.val(f"call i32 {sym}({I32x16} {lanes})")


def _zero_term(fn: Function, spec: GemmSpec, row: str, zp: str) -> str:
    """Per-channel int4: sum_n row[n] z_n over the N int16 values of a dY row, splat as fp32. Each
    lane's int32 sum holds N/16 products of at most ACT_MAX x 15 (exact below N = 139,000); the
    lanes add in fp32."""
    def zeros(v: str) -> str:
        if not spec.zero_point:
            return vec_const("i16", [8] * 32)
        return fn.val(f"zext <32 x i8> {fn.load('<32 x i8>', fn.gep(zp, fn.mul(v, 32)), 1)} to {I16x32}")

    f = fn.val(f"sitofp {I32x16} {_i16_dots(fn, row, spec.n // 32, zeros)} to {F32x16}")
    sym = fn.module.declare("llvm.vector.reduce.fadd.v16f32",
                            f"declare float @llvm.vector.reduce.fadd.v16f32(float, {F32x16})")
    return vx.f32_splat_value(fn, fn.val(f"call reassoc float {sym}(float 0.0, {F32x16} {f})"))


def _weight_row_for(fn: Function, spec: GemmSpec, ptr: str, zero: str | None, scales: str | None,
                    odd: bool) -> str:
    """A transposed-GEMM weight row: integer (``zero`` from :func:`_neg_zero`) for integer kernels,
    else dequantized to bf16 (``zero`` from :func:`_zero_words`, see :func:`_scaled_row`)."""
    return _int_row(fn, spec, ptr, zero, odd) if spec.int_x else _scaled_row(fn, spec, ptr, zero, scales, odd)


def _swapped_row(fn: Function, spec: GemmSpec, ptr: str, zero: str | None, scales: str | None,
                 odd: bool) -> str:
    """The packed row at ``ptr`` regrouped to n-pairs (:func:`vx.swap_k_n_pairs`): with ``scales``
    as :func:`_weight_row_for` gives it, else as :func:`_weight_row` (integer kernels: :func:`_int_row`).
    bf16 rows are one ``vpermw`` reading memory (kernel A/B on Zen 5 against load + ``vpshufb``:
    lane-partial 1-2 rows -1.5..-2%, MoE backward qlen 1-512 -1.5..-2.5%)."""
    if spec.quant == "bf16":
        return vx.swap_k_n_pairs_at(fn, ptr)
    if scales is not None:
        return vx.swap_k_n_pairs(fn, _weight_row_for(fn, spec, ptr, zero, scales, odd))
    row = _int_row(fn, spec, ptr, zero, odd) if spec.int_x else _weight_row(fn, spec, ptr, zero, odd)
    return vx.swap_k_n_pairs(fn, row)


def _zero_for(fn: Function, spec: GemmSpec, zptr: str) -> str | None:
    return _neg_zero(fn, spec, zptr) if spec.int_x else _zero_words(fn, spec, zptr)


def _store_int(fn: Function, spec: GemmSpec, acc: str, p: str, first: str, scale: str) -> None:
    """``out[p] (+)= float(acc) * scale`` for int32 partial sums (overwrite when ``first`` and not
    accumulating)."""
    old = fn.load(F32x16, p, 4)
    if not spec.accumulate:
        old = fn.val(f"select i1 {first}, {F32x16} zeroinitializer, {F32x16} {old}")
    fn.store(F32x16, vx.fma(fn, fn.val(f"sitofp {I32x16} {acc} to {F32x16}"), scale, old), p, 4)


def _bf16_bits(v: int) -> int:
    import struct

    return struct.unpack("<I", struct.pack("<f", float(v)))[0] >> 16


def _zero_words(fn: Function, spec: GemmSpec, zptr: str) -> str | None:
    """int4: the words (16 - z) for the 32 elements of a row of channels zptr[0..16] (z = 8 when
    symmetric); element e belongs to channel e // 2."""
    if spec.quant != "int4":
        return None
    if not spec.zero_point:
        return "<" + ", ".join(["i16 8"] * 32) + ">"
    z = fn.val(f"zext <16 x i8> {fn.load('<16 x i8>', zptr, 1)} to <16 x i16>")
    zz = vx.shuffle(fn, "<16 x i16>", z, None, [e // 2 for e in range(32)])
    return fn.val(f"sub {I16x32} <{', '.join(['i16 16'] * 32)}>, {zz}")


def _open_acc(fn: Function, spec: GemmSpec, ptr: str, first: str) -> Var:
    """An fp32 accumulator for the 16 outputs at ``ptr``: their current value when accumulating or
    past the first reduction chunk (``first`` false), else zero."""
    old = fn.load(F32x16, ptr, 4)
    init = old if spec.accumulate else fn.val(f"select i1 {first}, {F32x16} zeroinitializer, {F32x16} {old}")
    return fn.var(F32x16, init, 64)


def _dot(fn: Function, acc: str, w: str, xb: str, integer: bool) -> str:
    """One pair dot step: bf16 pairs into fp32, or (``integer``) int16 pairs into int32."""
    if not integer:
        return vx.dpbf16(fn, acc, w, xb)
    return vx.dpwssd(fn, acc, vx.bitcast(fn, w, BF16x32, I16x32), vx.bitcast(fn, xb, BF16x32, I16x32))


def _mac(fn: Function, accs: dict, wv: list[str], xptrs: list[str], integer: bool = False) -> None:
    """``accs[i, j] += W_j . X_i``: row i's pair at ``xptrs[i]`` broadcast against weight vector j
    (bf16, or int16 codes and activations into int32 accumulators)."""
    for i, xp in enumerate(xptrs):
        xb = vx.bcast_pair(fn, xp)
        for j, w in enumerate(wv):
            acc = accs[i, j][0]
            acc.set(_dot(fn, acc.get(), w, xb, integer))


def _panel_mac(fn: Function, accs: dict, panel: str, nr: int, steps: int | str, xptr, integer: bool = False,
               fetch=None, cols: range | None = None) -> None:
    """``accs += sum_q panel[q] . X(q)``: the forward micro-kernel over ``steps`` k-pair rows of a
    stack panel (``nr`` vectors of 64 B per row; ``cols``: those of the accumulators' column
    blocks, default all, ``accs[i, j]`` for the j-th of them); ``xptr(i, q)`` points at row i's
    pair q; ``fetch(q)`` emits prefetches at each step."""
    rows = 1 + max(i for i, _ in accs)
    with fn.loop(0, steps, name="pq") as q:
        if fetch is not None:
            fetch(q)
        wp = fn.gep(panel, fn.mul(q, nr * 64))
        _mac(fn, accs, [fn.load(BF16x32, fn.gep(wp, j * 64), 64) for j in cols or range(nr)],
             [xptr(i, q) for i in range(rows)], integer)


def _add_to_block(fn: Function, ptrs: dict, add) -> None:
    """Read-modify-write of an output block still in cache: ``ptrs[i, j]`` -> fp32 vector, ``add``
    accumulates into the loaded values."""
    accs = {key: (fn.var(F32x16, fn.load(F32x16, p, 4), 64), p) for key, p in ptrs.items()}
    add(accs)
    for acc, p in accs.values():
        fn.store(F32x16, acc.get(), p, 4)


def _lora_pairs(fn: Function, spec: GemmSpec, c: str, desc_extra: tuple[str, str, str]):
    """Fused LoRA, once per work item: the item's ``16 nr`` rows of B [N, rank] rearranged like a
    packed weight (one vector per (column block j, rank pair p): lane l holds the pair
    B[n_l, 2p:2p+2]) into a stack panel, so the term H B^T runs as extra k-steps of the forward
    micro-kernel. Prefetches (the first 4 KB of) those rows of B and returns (panel, h, byte
    offset of this item's adapter in an H row, ``fill``): the caller emits ``fill()`` (which
    writes the panel) at the start of the item's last K-chunk, so with several chunks the rows
    have arrived by then; at the item's start they are a cold miss the weight stream cannot hide
    (~200 ns per item, +0.4 ms on a qlen-128 down projection). With a single K-chunk it is the
    item's start again."""
    nr, rank = spec.schedule.nr, spec.lora_rank
    h, b0, b1 = desc_extra
    col = fn.mul(c, 16 * nr)
    bptr, hoff = fn.gep(b0, fn.mul(col, rank * 2)), "0"
    if spec.lora_split:
        second = fn.icmp("uge", col, spec.lora_split)
        bptr = fn.val(f"select i1 {second}, ptr {fn.gep(b1, fn.mul(fn.sub(col, spec.lora_split), rank * 2))}, "
                      f"ptr {bptr}")
        hoff = fn.val(f"select i1 {second}, i64 {rank * 2}, i64 0")
    for off in range(0, min(16 * nr * rank * 2, 4096), 64):  # the item's B rows are contiguous
        vx.prefetch(fn, fn.gep(bptr, off))
    panel = fn.alloca("i8", 64, nr * rank // 2 * 64)

    def fill() -> None:
        with fn.loop(0, rank // 16, name="lq") as q:  # 8 pairs (32 bytes of each B row) at a time
            for j in range(nr):
                rows = []
                for a in range(8):  # B rows 2a, 2a+1 of this column block, dwords 8q .. 8q+7
                    halves = [fn.load("<8 x i32>", fn.gep(bptr, fn.add(fn.mul(q, 32), (16 * j + 2 * a + e) * rank * 2)),
                                      4) for e in range(2)]
                    rows.append(vx.shuffle(fn, "<8 x i32>", halves[0], halves[1], list(range(16))))
                for p, v in enumerate(vx.transpose_dwords_16x8(fn, rows)):
                    fn.store(I32x16, v, fn.gep(panel, fn.add(fn.mul(q, 8 * nr * 64), (p * nr + j) * 64)), 64)

    return panel, h, hoff, fill


def either(fn: Function, cond: str, emit) -> None:
    """``emit(True)`` where ``cond`` holds, else ``emit(False)``: two copies of a loop chosen once
    (e.g. one of which also prefetches: a run-time test per step would cost more than it saves)."""
    yes_bb, no_bb, done_bb = fn.new_block("yes"), fn.new_block("no"), fn.new_block("either")
    fn.cbr(cond, yes_bb, no_bb)
    fn.set_block(yes_bb)
    emit(True)
    fn.br(done_bb)
    fn.set_block(no_bb)
    emit(False)
    fn.br(done_bb)
    fn.set_block(done_bb)


def row_blocks(fn: Function, m: str, mr: int, micro) -> None:
    """Call ``micro(m0, mr)`` over full blocks of ``mr`` rows, then cover the tail in power-of-two
    blocks (for mr=6: a tail of 5 runs as 4+1), so a tail never degrades into single rows and only
    log2(mr) extra variants are compiled.
    """
    full = fn.mul(fn.val(f"udiv i64 {m}, {mr}"), mr)
    with fn.loop(0, full, mr, name="mb") as m0:
        micro(m0, mr)
    pos = fn.var("i64", full)
    size = 1
    while size * 2 < mr:
        size *= 2
    while size >= 1:
        with fn.if_then(fn.icmp("sge", fn.sub(m, pos.get()), size), name=f"tail{size}"):
            p = pos.get()
            micro(p, size)
            pos.set(fn.add(p, size))
        size //= 2


def _avx512_fwd_body(spec: GemmSpec):
    sch, kp = spec.schedule, spec.k // 2
    kc = sch.kc or kp
    rb = spec.row_bytes
    block_stride = kp * rb  # bytes between consecutive n-blocks of the packed weight
    int_x = spec.int_x  # quantized: int32 partial sums per chunk, scaled into Y at its end
    # int4: sum x (q - z) as sum x q - z sum x, the second term once per chunk, row and column block
    # instead of a zero-point add per weight vector
    # (MoE forward A/B on Zen 4, qwen3: int4 qlen 1 / 16 / 128 -2..-3%, int4_1 -2 / -7 / -2%)
    fold_zero = spec.quant == "int4" and kc % 16 == 0

    def body(fn: Function, ctx: str, item: str, tiles, claim_next=None) -> None:
        c, x, w, y, m, sc, zp, *extra = _group(fn, ctx, item, spec.items_per_group, spec.group_fields)
        xsc = extra.pop(0) if int_x else None
        ldx, ldy = ARGS.load(fn, ctx, "ldx"), ARGS.load(fn, ctx, "ldy")
        wb = fn.gep(w, fn.mul(c, sch.nr * block_stride))
        if sch.pfi:  # set at the last chunk: the first weights of the item this thread runs next
            next_wb, has_next = fn.var("ptr", wb), fn.var("i1", "false")
        yb = fn.gep(y, fn.mul(c, sch.nr * 64))
        if sch.pfn:  # the row blocks from this row on share the next chunk's prefetch (see FETCH_ALL_ROWS)
            fetch_from = fn.val(f"select i1 {fn.icmp('sge', m, FETCH_ALL_ROWS * sch.mr)}, i64 0, i64 {sch.mr}")
        if spec.lora_rank:
            lpanel, h, hoff, fill_lora = _lora_pairs(fn, spec, c, tuple(extra))
            ldh = ARGS.load(fn, ctx, "ldh")
        with fn.loop(0, kp, kc, name="kc") as kc0:
            first = fn.icmp("eq", kc0, 0)
            last = fn.icmp("eq", kc0, kp - kc)  # the LoRA term joins the last chunk (its B rows are in by then)
            if spec.lora_rank:
                with fn.if_then(last, name="lorafill"):
                    fill_lora()
            if sch.pfi:  # only where row blocks after the first will fetch it
                with fn.if_then(fn.val(f"and i1 {last}, {fn.icmp('sgt', m, sch.mr)}"), name="ahead"):
                    following = claim_next()
                    valid = fn.icmp("slt", following, ARGS.load(fn, ctx, "n_items"))
                    has_next.set(valid)
                    with fn.if_then(valid, name="next"):
                        nc, _, nw, *_ = _group(fn, ctx, following, spec.items_per_group, spec.group_fields)
                        next_wb.set(fn.gep(nw, fn.mul(nc, sch.nr * block_stride)))
            def group_channels(k0: str) -> str:
                """Index of this item's first scale (and zero point) for k-pair k0: per channel, or
                in the row of the K-group holding it."""
                grp = fn.val(f"udiv i64 {k0}, {spec.group_size // 2}") if spec.group_size else "0"
                return fn.add(fn.mul(grp, spec.n), fn.mul(c, sch.nr * 16))

            chan = group_channels(kc0)  # the scales/zeros of this chunk
            scb = fn.gep(sc, fn.mul(chan, 4))
            if spec.group_size:  # the next chunk's group's scales (and zero points): a row of them
                # is N x 4 bytes from the last, no stream the hardware prefetcher follows, and their
                # misses had 22% of the K-group forward's samples (Zen 5, qwen3 gate/up, qlen 128).
                # MoE forward, same-process A/B: int4_kgroup qlen 1 / 16 / 128 -2 / -5 / -12%,
                # int4_1kgroup 16 / 128 -5 / -11%, dsv3-64e 128 -7%. (Past the last group: a prefetch
                # does not fault.)
                nchan = group_channels(fn.add(kc0, kc))
                for j in range(sch.nr):
                    vx.prefetch(fn, fn.gep(sc, fn.add(fn.mul(nchan, 4), j * 64)))
                if spec.zero_point:
                    for j in range(0, sch.nr * 16, 64):
                        vx.prefetch(fn, fn.gep(zp, fn.add(nchan, j)))
            if fold_zero:  # the codes as they are; z_n sum_k x[m, k] comes off each chunk's sums
                neg_zero = [None] * sch.nr
                zeros = [_channel_zeros(fn, spec, fn.gep(zp, fn.add(chan, 16 * j))) for j in range(sch.nr)]
            else:
                neg_zero = [_neg_zero(fn, spec, fn.gep(zp, fn.add(chan, 16 * j))) for j in range(sch.nr)]

            def weights(r: str, pf: int, cols: range) -> list[str]:
                """The weight rows at k-pair r of column blocks ``cols`` (bf16, or integers for the
                quantized kernels)."""
                roff = fn.mul(r, rb)
                wptrs = [fn.gep(wb, fn.add(roff, j * block_stride)) for j in cols]
                if int_x:
                    wv = [_int_row(fn, spec, p, neg_zero[j]) for p, j in zip(wptrs, cols, strict=True)]
                else:
                    wv = [fn.load(BF16x32, p, 2) for p in wptrs]
                if pf:
                    for p in wptrs:
                        vx.prefetch(fn, fn.gep(p, pf * rb))
                return wv

            def int4_row_pairs(r: str, pf: int, cols: range) -> list[tuple[str, str]]:
                """int4: k-pair rows r and r+1 of column blocks ``cols``, as int16 codes (q - z
                without ``fold_zero``)."""
                out = []
                for j in cols:
                    p = fn.gep(wb, fn.add(fn.mul(r, rb), j * block_stride))
                    if pf:
                        vx.prefetch(fn, fn.gep(p, pf * rb))
                    out.append(tuple(_int4_row(fn, c, neg_zero[j], True) for c in _int4_code_pairs(fn, p)))
                return out

            def lora_mac(m0: str, accs: dict, cols: range) -> None:
                """accs += H B^T (the fused LoRA term) for these rows, as rank/2 extra k-steps."""
                _panel_mac(fn, accs, lpanel, sch.nr, spec.lora_rank // 2,
                           lambda i, q: fn.gep(h, fn.add(fn.add(fn.mul(fn.add(m0, i), ldh), hoff), fn.mul(q, 4))),
                           cols=cols)

            def micro(m0: str, rows: int) -> None:
                # at most FWD_ACCUMULATORS accumulators in registers: wider items (int4's nr=8) run
                # blocks of more rows as column groups one after another
                width = max((d for d in range(1, sch.nr + 1) if sch.nr % d == 0 and rows * d <= FWD_ACCUMULATORS),
                            default=1)
                for j0 in range(0, sch.nr, width):
                    micro_cols(m0, rows, range(j0, j0 + width))

            def micro_cols(m0: str, rows: int, cols: range) -> None:
                accs = {}
                for i in range(rows):
                    yrow = fn.gep(yb, fn.mul(fn.add(m0, i), ldy))
                    for jj, j in enumerate(cols):
                        p = fn.gep(yrow, j * 64)
                        acc = fn.var(I32x16, "zeroinitializer", 64) if int_x else _open_acc(fn, spec, p, first)
                        accs[i, jj] = (acc, p)
                if spec.lora_rank and not int_x:  # last chunk: the LoRA term joins the accumulators
                    with fn.if_then(last, name="lora"):
                        lora_mac(m0, accs, cols)
                pf = sch.pfw if sch.pfw and rows > 2 else sch.pf

                def k_loop(fetch_next: bool) -> None:
                    # int4: two k-pair rows per step share one load and nibble split (kernel A/B
                    # m=1-4 +4-8%, m=8 +-1%)
                    pairs = spec.quant == "int4"  # (GemmSpec requires an even kc for int4)
                    if fetch_next:
                        pos, rate = _row_block_share(fn, m, m0, rows, fetch_from, kc)
                        if pairs:
                            rate = fn.mul(rate, 2)
                    with fn.loop(kc0, fn.add(kc0, kc), 2 if pairs else 1, name="r") as r:
                        if fetch_next:  # this chunk is in L2 already: this block's share of the next one
                            nb = fn.gep(fetch_base, fn.mul(fn.val(f"lshr i64 {pos.get()}, 16"), rb))
                            pos.set(fn.add(pos.get(), rate))
                            for j in cols:
                                vx.prefetch(fn, fn.gep(nb, j * block_stride), 2)
                        steps = zip((r, fn.add(r, 1)), zip(*int4_row_pairs(r, pf, cols), strict=True), strict=True) \
                            if pairs else [(r, weights(r, pf, cols))]
                        for rr, wv in steps:
                            xptrs = [fn.gep(x, fn.add(fn.mul(fn.add(m0, i), ldx), fn.mul(rr, 4))) for i in range(rows)]
                            _mac(fn, accs, list(wv), xptrs, int_x)

                if sch.pfn:  # row blocks after the first of a chunk compute from L2
                    # the start of this item's next chunk, or with pfi at the last chunk the next item's
                    fetch_base = fn.gep(wb, fn.mul(fn.add(kc0, kc), rb))
                    more = fn.icmp('ult', fn.add(kc0, kc), kp)
                    if sch.pfi:
                        fetch_base = fn.val(f"select i1 {more}, ptr {fetch_base}, ptr {next_wb.get()}")
                        more = fn.val(f"or i1 {more}, {has_next.get()}")
                    either(fn, fn.val(f"and i1 {more}, {fn.icmp('sge', m0, fetch_from)}"), k_loop)
                else:
                    k_loop(False)
                if not int_x:
                    for acc, p in accs.values():
                        fn.store(F32x16, acc.get(), p, 4)
                    return
                wscale = [fn.load(F32x16, fn.gep(scb, j * 64), 4) for j in cols]
                for i in range(rows):
                    if fold_zero:
                        xrow = fn.gep(x, fn.add(fn.mul(fn.add(m0, i), ldx), fn.mul(kc0, 4)))
                        xsum = vx.i32_splat_value(fn, _sum_i16(fn, xrow, kc // 16))
                        for jj, j in enumerate(cols):
                            acc = accs[i, jj][0]
                            acc.set(fn.val(f"sub {I32x16} {acc.get()}, {fn.val(f'mul {I32x16} {xsum}, {zeros[j]}')}"))
                    xs = vx.splat_f32(fn, fn.gep(xsc, fn.mul(fn.add(m0, i), 4)), "f32")
                    for jj in range(len(cols)):
                        acc, p = accs[i, jj]
                        _store_int(fn, spec, acc.get(), p, first, vx.fmul(fn, wscale[jj], xs))
                if spec.lora_rank:  # (not scaled by the weight scales) added to the stored block
                    with fn.if_then(last, name="lora"):
                        _add_to_block(fn, {key: p for key, (_, p) in accs.items()}, lambda la: lora_mac(m0, la, cols))

            row_blocks(fn, m, sch.mr, micro)

    return body


# The AVX-512 forward's next-chunk prefetch (schedule pfn) is shared by a chunk's row blocks in
# proportion to their rows, each spreading its share over its k-steps, so DRAM streams while all of
# them compute; the first row block (which reads the chunk just fetched) takes a share from
# FETCH_ALL_ROWS full blocks (18 rows) on. Until the thirty-eighth session the second row block
# fetched the whole next chunk and the later ones refetched it: a burst in a sixth of a 32-row
# chunk's time. Zen 5, slow memory mode (39 GB/s): kernel level, 48 cold qwen3 gate/up experts of m
# rows, against that: m = 16 -3..-6%, 24 -9..-12%, 32 -10..-11%, 64 -8%, m <= 12 the same prefetches
# (+-4% run to run); the first block left out: 24 rows -3..-4%, 32 -5..-9%. MoE forward with LoRA
# (tools/tune.py's rounds), qlen 512: qwen3 -7.4%, deepseek-v2-lite -6.2%, dsv3-64e -6.2%; qlen 128:
# qwen3 +-0.2%, dsv3-64e -4.4%; int8 and int4 at qlen 512 +-0.7%.
FETCH_ALL_ROWS = 3


def _row_block_share(fn: Function, m: str, m0: str, rows: int, first_row: str, steps: int) -> tuple[Var, str]:
    """The share of ``steps`` prefetch positions that the row block [m0, m0 + rows) of an m-row
    group takes when the rows from ``first_row`` on (m0 >= first_row) share them in proportion to
    their rows, for the block to spread over its ``steps`` k-steps: the position as a 16.16 fixed-
    point variable starting at the share's first and the step to add to it at each k-step."""
    rest = fn.sub(m, first_row)
    lo = fn.val(f"udiv i64 {fn.mul(fn.sub(m0, first_row), steps)}, {rest}")
    end = fn.sub(fn.add(m0, rows), first_row)
    hi = fn.min(fn.val(f"udiv i64 {fn.add(fn.mul(end, steps), fn.sub(rest, 1))}, {rest}"), steps)
    rate = fn.val(f"udiv i64 {fn.mul(fn.sub(hi, lo), 1 << 16)}, {steps}")
    return fn.var("i64", fn.mul(lo, 1 << 16)), rate


def _dy_pairs(fn: Function, spec: GemmSpec, ptr: str, scales: str, halves: bool = False) -> str:
    """dY[m, 16s:16s+16] as 8 bf16 pairs, each dword duplicated (``halves``: the 8 dwords twice,
    as the quad step takes them); for quantized weights each dY column is first multiplied by its
    channel's scale (dX = (dY diag(s)) Q)."""
    if spec.quant == "bf16":
        return vx.dup_dwords(fn, ptr)
    v = vx.fmul(fn, vx.load_f32x16(fn, ptr, "bf16"), fn.load(F32x16, scales, 4))
    pairs = fn.val(f"bitcast <16 x bfloat> {fn.val(f'fptrunc {F32x16} {v} to <16 x bfloat>')} to <8 x i32>")
    return vx.dup_pairs(fn, pairs, halves)


FOLD_MR = 3  # token rows per block of the fold form when it serves a panel kernel's small groups


def _fill_a_pairs(fn: Function, spec: GemmSpec, panel: str, slot0: int, a: str, pairs: int, k0: str) -> None:
    """Panel rows ``slot0 ..`` (``nr`` vectors of 64 B each) = the ``pairs`` A row pairs from row
    pointer ``a`` (rows 2p, 2p+1), outputs ``k0 .. k0 + 16 nr``, interleaved into bf16 pairs: the
    k-steps the forward micro-kernel runs for ``dX += T A``."""
    nr, kdim = spec.schedule.nr, spec.k
    with fn.loop(0, pairs, name="ap") as p:
        for j in range(nr):
            src = fn.gep(a, fn.add(fn.mul(p, 2 * kdim * 2), fn.mul(fn.add(k0, 16 * j), 2)))
            v = vx.interleave_words_at(fn, src, fn.gep(src, kdim * 2))
            fn.store(I16x32, v, fn.gep(panel, fn.add(fn.mul(fn.add(p, slot0), nr * 64), j * 64)), 64)


def _add_panel_product(fn: Function, spec: GemmSpec, y: str, ldy: str, m: str, k0: str, panel: str, pairs: int,
                       t: str, pair0: str, ldh: str) -> None:
    """``dX[:, k0 : k0 + 16 nr] += T[:, pairs pair0 ..] panel`` for all m rows (T bf16, 4 bytes per
    pair), read-modify-write of the output block still in cache."""
    nr = spec.schedule.nr

    def micro(m0: str, rows: int) -> None:
        yrows = [fn.gep(y, fn.add(fn.mul(fn.add(m0, i), ldy), fn.mul(k0, 4))) for i in range(rows)]
        _add_to_block(fn, {(i, j): fn.gep(yrows[i], j * 64) for i in range(rows) for j in range(nr)},
                      lambda accs: _panel_mac(fn, accs, panel, nr, pairs, lambda i, q: fn.gep(
                          t, fn.add(fn.mul(fn.add(m0, i), ldh), fn.mul(fn.add(pair0, q), 4)))))

    row_blocks(fn, m, spec.schedule.mr, micro)


def _bwd_lora(fn: Function, spec: GemmSpec, y: str, ldy: str, m: str, k0: str, extra: list[str], ldh: str) -> None:
    """Fused LoRA of the transposed GEMM: ``dX[:, k0 : k0 + 16 nr] += T A`` for all m rows, after
    the base product of those outputs is stored (they are still in L1/L2). T [m, pairs*2] bf16
    (``[T0 | T1]`` for two adapters), A [rank, K] bf16 per adapter. Each pair of A rows is
    interleaved into one vector per 16 outputs, then the forward micro-kernel runs over the pairs."""
    half = spec.lora_rank // 2
    t, a0, a1 = extra
    adapters = [a0, a1] if spec.lora_split else [a0]
    panel = fn.alloca("i8", 64, half * len(adapters) * spec.schedule.nr * 64)
    for ai, a in enumerate(adapters):
        _fill_a_pairs(fn, spec, panel, ai * half, a, half, k0)
    _add_panel_product(fn, spec, y, ldy, m, k0, panel, half * len(adapters), t, "0", ldh)


# The fused LoRA term of the whole-group transposed forms, in passes of LORA_PAIRS_PER_PASS A row
# pairs (each prefetching the A lines LORA_A_AHEAD column blocks ahead) over chunks of column blocks
# whose output (all m rows) takes at most LORA_PASSES_MAX_BYTES: each pass rereads and rewrites the
# chunk's output from L1/L2. Kernel A/B of the passes against one pass with every pair per column
# block (Zen 5, cold weights and adapters; the term's cost over the same launch without LoRA, MoE
# routings of qlen 1 / 16 / 128): qwen3 gate/up (8 KB of output per row) +60 / +434..+566 / +790 us
# -> +32 / +316..+487 / +506..+551 us; dsv3-64e gate/up (28 KB per row) qlen 16 +1028 -> +354 us.
# Outputs above the limit took the one pass until the fourteenth session; chunks instead: qlen 128
# qwen3 +1917 -> +686 us, deepseek-v2-lite +703 -> -1098 us, dsv3-64e 0.8-5.2 ms less (of +4.6..
# +15.0 ms; 16 or 32 KB chunks: the same); MoE backward dsv3-64e qlen 128 -1.4 / -1.6%, qwen3 and
# deepseek-v2-lite +-0.5%. Not better: 2 or 8 pairs per pass; prefetching 0, 8 or 16 blocks ahead;
# every pair per block from a panel staged per chunk (hot 1.4x faster, cold as fast only with the
# output rows prefetched: the cold cost is the output's lines, not A's); the term inside the
# streamed form's last pass, 16 outputs at a time while they are in L1 (docs/benchmarks.md).
LORA_PAIRS_PER_PASS = 4
LORA_A_AHEAD = 4
LORA_PASSES_MAX_BYTES = 96 << 10


def _bwd_lora_whole(fn: Function, spec: GemmSpec, y: str, ldy: str, m: str, extra: list[str], ldh: str) -> None:
    """Fused LoRA of a whole group (the streamed and lane-partial forms): ``dX += T A`` over every
    output, chunk by chunk of column blocks (see LORA_PASSES_MAX_BYTES), in passes of
    ``LORA_PAIRS_PER_PASS`` A row pairs, each walking the chunk's column blocks in order
    (:func:`_bwd_lora` takes every pair per block instead: 16 to 32 rows of A, each 4 KB or more
    apart, 128 bytes from each per block, which is more short streams than the hardware prefetcher
    follows; here a pass reads a few rows front to back and prefetches ahead)."""
    nr, rank, kdim = spec.schedule.nr, spec.lora_rank, spec.k
    t, a0, a1 = extra
    half = rank // 2  # pairs per adapter (a pass never straddles two: g divides it)
    span, g = 16 * nr, math.gcd(LORA_PAIRS_PER_PASS, half)
    blocks = kdim // span
    per = fn.val(f"udiv i64 {LORA_PASSES_MAX_BYTES}, {fn.mul(m, span * 4)}")  # (m > 0: the callers guard)
    chunk = fn.min(fn.val(f"select i1 {fn.icmp('eq', per, 0)}, i64 1, i64 {per}"), blocks)
    with fn.loop(0, blocks, chunk, name="lch") as cb0:
        cb1 = fn.min(fn.add(cb0, chunk), blocks)
        with fn.loop(0, half * (2 if spec.lora_split else 1), g, name="lpg") as pg:
            a = fn.gep(a0, fn.mul(pg, 2 * kdim * 2))
            if spec.lora_split:
                second = fn.icmp("uge", pg, half)
                a = fn.val(f"select i1 {second}, ptr {fn.gep(a1, fn.mul(fn.sub(pg, half), 2 * kdim * 2))}, ptr {a}")
            with fn.loop(cb0, cb1, name="lcb") as cb:
                k0 = fn.mul(cb, span)
                ahead = fn.mul(fn.add(k0, LORA_A_AHEAD * span), 2)  # (past a row's end: the next row's start)
                for row in range(2 * g):
                    for off in range(0, span * 2, 64):
                        vx.prefetch(fn, fn.gep(a, fn.add(ahead, row * kdim * 2 + off)))
                panel = fn.alloca("i8", 64, g * nr * 64)
                _fill_a_pairs(fn, spec, panel, 0, a, g, k0)
                _add_panel_product(fn, spec, y, ldy, m, k0, panel, g, t, pg, ldh)


def _avx512_bwd_body(spec: GemmSpec):
    def body(fn: Function, ctx: str, item: str, tiles) -> None:
        c, x, w, y, m, sc, zp, *extra = _group(fn, ctx, item, spec.items_per_group, spec.group_fields)
        ldx, ldy = ARGS.load(fn, ctx, "ldx"), ARGS.load(fn, ctx, "ldy")
        _fold_item(fn, spec, c, x, w, y, m, sc, zp, ldx, ldy, spec.schedule.mr)
        if spec.lora_rank:
            _bwd_lora(fn, spec, y, ldy, m, fn.mul(c, 16 * spec.schedule.nr), extra, ARGS.load(fn, ctx, "ldh"))

    return body


def _fold_item(fn: Function, spec: GemmSpec, c: str, x: str, w: str, y: str, m: str, sc: str, zp: str, ldx: str,
               ldy: str, mr: int) -> None:
    """Work item ``c`` of the "fold" transposed GEMM: outputs k in [16 nr c, 16 nr (c+1))."""
    sch, nb = spec.schedule, spec.n // 16
    rows_per_item = 8 * sch.nr
    rb = spec.row_bytes
    block_stride = spec.k // 2 * rb
    with fn.loop(0, sch.nr, name="sub") as sub:
        r0 = fn.add(fn.mul(c, rows_per_item), fn.mul(sub, 8))  # first k-pair row of this chunk
        wb = fn.gep(w, fn.mul(r0, rb))
        yb = fn.gep(y, fn.mul(r0, 8))  # 2 outputs (fp32) per k-pair
        # the 16 outputs of a chunk lie in one K-group (group sizes are multiples of 32)
        grp = fn.val(f"udiv i64 {r0}, {spec.group_size // 2}") if spec.group_size else "0"
        scg = fn.gep(sc, fn.mul(grp, spec.n * 4))
        zpg = fn.gep(zp, fn.mul(grp, spec.n))

        def micro(m0: str, rows: int) -> None:
            accs = {(i, r): fn.var(F32x16, "zeroinitializer", 64) for i in range(rows) for r in range(8)}
            with fn.loop(0, nb, name="s") as s:
                wrow = fn.gep(wb, fn.mul(s, block_stride))
                if sch.pf:  # these 8 rows of a later block, and the next chunk's 8 of this one
                    ahead = fn.gep(wrow, sch.pf * block_stride)
                    for r in range(0, 16 * rb, 64):
                        vx.prefetch(fn, fn.gep(ahead, r), 2)
                a = [_dy_pairs(fn, spec, fn.gep(x, fn.add(fn.mul(fn.add(m0, i), ldx), fn.mul(s, 32))),
                               fn.gep(scg, fn.mul(s, 64)))
                     for i in range(rows)]
                zw = _zero_words(fn, spec, fn.gep(zpg, fn.mul(s, 16)))
                for r in range(8):  # one weight row live at a time: 8*rows acc + rows + 1 regs
                    wv = _swapped_row(fn, spec, fn.gep(wrow, r * rb), zw, None, r % 2 == 1)
                    for i in range(rows):
                        acc = accs[i, r]
                        acc.set(vx.dpbf16(fn, acc.get(), wv, a[i]))
            for i in range(rows):
                out = vx.reduce_pair_lanes(fn, [accs[i, r].get() for r in range(8)])
                p = fn.gep(yb, fn.mul(fn.add(m0, i), ldy))
                if spec.accumulate:
                    out = vx.fadd(fn, out, fn.load(F32x16, p, 4))
                fn.store(F32x16, out, p, 4)

        row_blocks(fn, m, mr, micro)


def _scaled_row(fn: Function, spec: GemmSpec, ptr: str, zero_words: str | None, scales: str | None,
                odd: bool) -> str:
    """One packed row as <32 x bfloat> weights: bf16 as stored, quantized rows dequantized with the
    scales of their 16 channels (``scales`` points at 16 fp32; element e belongs to channel e // 2),
    rounded once to bf16."""
    row = _weight_row(fn, spec, ptr, zero_words, odd)
    if spec.quant == "bf16":
        return row
    sv = fn.load(F32x16, scales, 4)
    s32 = vx.shuffle(fn, F32x16, sv, None, [e // 2 for e in range(32)])
    wide = fn.val(f"fpext {BF16x32} {row} to <32 x float>")
    prod = fn.val(f"fmul <32 x float> {wide}, {s32}")
    return fn.val(f"fptrunc <32 x float> {prod} to {BF16x32}")


def _avx512_bwd_panel_body(spec: GemmSpec):
    """``dX = dY W`` through an L1 panel: a work item owns ``16 nr`` outputs k; per chunk of ``kc``
    n-blocks it turns each block's 8-row groups (16 k x 16 n) into forward layout (word swap + 8x8
    qword transpose: row q then holds, per output k, the pair (W[n_2q][k], W[n_2q+1][k])), stores
    them to a stack panel and runs the forward micro-kernel (dY pairs broadcast) over all tokens."""
    sch, nb = spec.schedule, spec.n // 16
    kcn = sch.kc or nb
    rb = spec.row_bytes
    block_stride = spec.k // 2 * rb  # bytes between consecutive n-blocks of the packed weight
    span = 16 * sch.nr               # outputs k per work item

    def body(fn: Function, ctx: str, item: str, tiles) -> None:
        c, x, w, y, m, sc, zp, *extra = _group(fn, ctx, item, spec.items_per_group, spec.group_fields)
        xsc = extra.pop(0) if spec.int_x else None  # per-row scales of the int16 dY diag(s)
        dyt = extra.pop(0) if sch.tl else None  # dY in the tokens-in-lanes layout
        ldx, ldy = ARGS.load(fn, ctx, "ldx"), ARGS.load(fn, ctx, "ldy")
        ldh = ARGS.load(fn, ctx, "ldh") if spec.lora_rank else None
        k0 = fn.mul(c, span)  # this item's first output
        # the tokens-in-lanes items end in the panel items' LoRA term (one copy of its code: a
        # second took 50 ms more to compile)
        lora_bb = fn.new_block("lora") if sch.tl and spec.lora_rank else None
        if sch.tl:
            lanes_bb, other_bb, end_bb = fn.new_block("tlanes"), fn.new_block("other"), fn.new_block("end")
            fn.cbr(lanes_rows_ir(fn, m, sch.tl), lanes_bb, other_bb)
            fn.set_block(lanes_bb)
            _bwd_lanes_item(fn, spec, k0, dyt, w, y, m, ldy)
            fn.br(lora_bb or end_bb)
            fn.set_block(other_bb)
        if sch.sm:
            # rows spread over every L1 set only if both pitches are odd multiples of 64 bytes
            odd = [fn.icmp("eq", fn.val(f"and i64 {ld}, 127"), 64) for ld in (ldx, ldy)]
            spread = fn.val(f"and i1 {odd[0]}, {odd[1]}")
            limit = fn.val(f"select i1 {spread}, i64 {sch.sm}, i64 {min(sch.sm, STREAM_ALIASED_MAX)}")
            small = fn.icmp("sle", m, limit)
            stream_bb, panel_bb, done_bb = fn.new_block("stream"), fn.new_block("panel"), fn.new_block("done")
            fn.cbr(small, stream_bb, panel_bb)
            fn.set_block(stream_bb)

            # the whole-group forms: the group's first item does it all (an empty group reads no
            # weight), then the LoRA term over every output column block
            whole = fn.val(f"and i1 {fn.icmp('eq', c, 0)}, {fn.icmp('sgt', m, 0)}")

            def whole_group(form) -> None:
                with fn.if_then(whole, name="whole"):
                    form(fn, spec, x, w, y, sc, zp, xsc, ldx, ldy, m)
                    if spec.lora_rank:
                        _bwd_lora_whole(fn, spec, y, ldy, m, extra, ldh)

            def lane_partial() -> None:
                if not sch.lps:
                    whole_group(_bwd_lane_partial_rows)
                    return
                # item c < slices (of the code variant for m rows): K-slice c
                few, *many = (spec.k // 2 // _lane_partial_slice(spec, r) for r in _lane_partial_variants(spec))
                slices = fn.val(f"select i1 {fn.icmp('sle', m, LANE_PARTIAL_UNROLL)}, i64 {few}, i64 {many[0]}") \
                    if many else str(few)
                mine = fn.val(f"and i1 {fn.icmp('ult', c, slices)}, {fn.icmp('sgt', m, 0)}")
                with fn.if_then(mine, name="lslice"):
                    _bwd_lane_partial_rows(fn, spec, x, w, y, sc, zp, xsc, ldx, ldy, m, c)

            if sch.lp < sch.sm:  # the run-time limit is at most sm: with lp >= sm only lanes remain
                if sch.lp:
                    lp_bb, rest_bb = fn.new_block("lanes"), fn.new_block("rest")
                    fn.cbr(fn.icmp("sle", m, sch.lp), lp_bb, rest_bb)
                    fn.set_block(lp_bb)
                    lane_partial()
                    fn.br(done_bb)
                    fn.set_block(rest_bb)
                if sch.small == "fold":
                    _fold_item(fn, spec, c, x, w, y, m, sc, zp, ldx, ldy, FOLD_MR)
                    if spec.lora_rank:
                        _bwd_lora(fn, spec, y, ldy, m, fn.mul(c, span), extra, ldh)
                else:
                    whole_group(_bwd_stream_group_in_parts)
            else:
                lane_partial()
            fn.br(done_bb)
            fn.set_block(panel_bb)
        panel = fn.alloca("i8", 64, kcn * 8 * sch.nr * 64)
        wb = fn.gep(w, fn.mul(k0, rb // 2))  # row k0/2 of every n-block
        yb = fn.gep(y, fn.mul(k0, 4))
        if not spec.lora_rank:
            # this item's output block, for writing: the first chunk's accumulators load it (values
            # a select then drops, but the load still waits for the line: with the block not in
            # cache, a miss per accumulator on the dot chains' path). Zen 5, qwen3: kernel on MoE
            # routings of qlen 512 (gate/up) -12%, MoE backward without LoRA -8.4% (qlen 512) and
            # -3.4% (128); one group of 128/512 hot rows +-1%. The fused-LoRA kernels do without
            # (MoE backward +1.3%): their LoRA term rereads the block at the item's end, which has
            # the hardware prefetcher fetch the next items' blocks.
            with fn.loop(0, m, name="pwy") as i:
                yr = fn.gep(yb, fn.mul(i, ldy))
                for j in range(sch.nr):
                    vx.prefetch(fn, fn.gep(yr, j * 64), write=True)
        step_bytes = sch.nr * rb  # an eighth of this item's slice of one n-block
        # with pfn, the next chunk's slice (kcn * 8 * step_bytes bytes) is requested by the first
        # 2^shift full row blocks, 2^shift = the group's full row blocks up to `ps` (a power of two,
        # at most a step's lines), each a part of step_bytes >> shift bytes at every panel step
        shared = sch.pfn and sch.ps > 1 and step_bytes >= 128
        shift = "0"
        if shared:
            full = fn.val(f"udiv i64 {m}, {sch.mr}")
            for lvl in range(1, min(sch.ps, step_bytes // 64).bit_length()):
                shift = fn.val(f"select i1 {fn.icmp('uge', full, 1 << lvl)}, i64 {lvl}, i64 {shift}")
            no_full_block = fn.icmp("ult", m, sch.mr)
        part_bytes = fn.val(f"lshr i64 {step_bytes}, {shift}")
        with fn.loop(0, nb, kcn, name="nc") as nc0:
            with fn.loop(0, kcn, name="sl") as sl:
                s = fn.add(nc0, sl)
                wrow = fn.gep(wb, fn.mul(s, block_stride))
                if sch.pf and not shared:
                    ahead = fn.gep(wrow, sch.pf * block_stride)
                    for off in range(0, 8 * sch.nr * rb, 64):
                        vx.prefetch(fn, fn.gep(ahead, off), 2)
                dst = fn.gep(panel, fn.mul(sl, 8 * sch.nr * 64))
                # a run-time loop over the 16-k blocks j: one copy of the transposition (lowering
                # its shuffles is the costliest part of compiling this kernel)
                with fn.loop(0, sch.nr, name="pj") as j:
                    # block j's K-group: its scale and zero-point rows (per-channel modes: group 0)
                    grp = fn.val(f"udiv i64 {fn.add(k0, fn.mul(j, 16))}, {spec.group_size}") if spec.group_size else "0"
                    chan = fn.add(fn.mul(grp, spec.n), fn.mul(s, 16))
                    zw = _zero_for(fn, spec, fn.gep(zp, chan))
                    scp = fn.gep(sc, fn.mul(chan, 4)) if spec.quant != "bf16" else None
                    jrow = fn.gep(wrow, fn.mul(j, 8 * rb))
                    if sch.pf and shared:
                        # the fill's own prefetch (block s + pf, a 16-k block at a time) only where
                        # the shared one does not reach: the first chunk, and groups without a full
                        # row block
                        fill_fetch = fn.val(f"or i1 {no_full_block}, {fn.icmp('eq', nc0, 0)}")
                        with fn.if_then(fill_fetch, name="fpf"):
                            for off in range(0, 8 * rb, 64):
                                vx.prefetch(fn, fn.gep(jrow, sch.pf * block_stride + off), 2)
                    rows = [_swapped_row(fn, spec, fn.gep(jrow, r * rb), zw, scp, r % 2 == 1)
                            for r in range(8)]
                    jdst = fn.gep(dst, fn.mul(j, 64))
                    for q, v in enumerate(vx.transpose_qwords_8x8(fn, rows)):
                        fn.store(BF16x32, v, fn.gep(jdst, q * sch.nr * 64), 64)
            first = fn.icmp("eq", nc0, 0)
            xc = fn.gep(x, fn.mul(nc0, 32))  # dY column 16 nc0

            def fetch_next_chunk(g: str) -> None:
                """At step g of the fetching row blocks' steps (row block * 8 kcn + panel step): bytes
                g * part_bytes + (64 j mod part_bytes) of the next chunk's slice (block = byte / (8
                step_bytes)), j over a step's lines: a part of fewer lines is requested more than
                once (Zen 5 seems to drop software prefetches while its miss buffers are full; see
                PANEL_PREFETCH_SHARE)."""
                at0 = fn.mul(g, part_bytes)
                for off in range(0, step_bytes, 64):
                    at = fn.add(at0, fn.val(f"and i64 {off}, {fn.sub(part_bytes, 1)}")) if off else at0
                    blk = fn.add(fn.add(nc0, kcn), fn.val(f"udiv i64 {at}, {8 * step_bytes}"))
                    base = fn.add(fn.mul(blk, block_stride), fn.val(f"urem i64 {at}, {8 * step_bytes}"))
                    vx.prefetch(fn, fn.gep(wb, base), 2)

            def micro(m0: str, rows: int) -> None:
                accs = {}
                for i in range(rows):
                    yrow = fn.gep(yb, fn.mul(fn.add(m0, i), ldy))
                    for j in range(sch.nr):
                        p = fn.gep(yrow, j * 64)
                        acc = fn.var(I32x16, "zeroinitializer", 64) if spec.int_x else _open_acc(fn, spec, p, first)
                        accs[i, j] = (acc, p)
                # the forward micro-kernel, on the panel
                def mac(fetch_next: bool) -> None:
                    g0 = fn.mul(fn.val(f"udiv i64 {m0}, {sch.mr}"), kcn * 8) if shared else "0"
                    _panel_mac(fn, accs, panel, sch.nr, kcn * 8,
                               lambda i, q: fn.gep(xc, fn.add(fn.mul(fn.add(m0, i), ldx), fn.mul(q, 4))), spec.int_x,
                               (lambda q: fetch_next_chunk(fn.add(g0, q))) if fetch_next else None)

                if sch.pfn and rows == sch.mr:  # the first 2^shift row blocks fetch the next n-chunk while
                    # they compute (full blocks: groups this large are streamed unless sm < mr)
                    sharing = fn.icmp("ult", m0, fn.mul(fn.val(f"shl i64 1, {shift}"), sch.mr))
                    either(fn, fn.val(f"and i1 {fn.icmp('ult', fn.add(nc0, kcn), nb)}, {sharing}"), mac)
                else:
                    mac(False)
                for (i, _), (acc, p) in accs.items():
                    if spec.int_x:
                        _store_int(fn, spec, acc.get(), p, first,
                                   vx.splat_f32(fn, fn.gep(xsc, fn.mul(fn.add(m0, i), 4)), "f32"))
                    else:
                        fn.store(F32x16, acc.get(), p, 4)

            row_blocks(fn, m, sch.mr, micro)

        if spec.lora_rank:
            if lora_bb:
                fn.br(lora_bb)
                fn.set_block(lora_bb)
            _bwd_lora(fn, spec, y, ldy, m, k0, extra, ldh)
        if sch.sm:
            fn.br(done_bb)
            fn.set_block(done_bb)
        if sch.tl:
            fn.br(end_bb)
            fn.set_block(end_bb)

    return body


# n-blocks ahead; Zen 4 against 4: the prototype (16 rows) 2 +11%, 8 +9%, 16 +18%; the form at 32
# rows 3 / 6 / 8 within +-1%
LANES_PREFETCH = 4


def _bwd_lanes_item(fn: Function, spec: GemmSpec, k0: str, dyt: str, w: str, y: str, m: str, ldy: str) -> None:
    """``dX[:, k0 : k0 + 16 nr] (+)= dY W`` for one work item of a bf16 group, tokens in the lanes.

    ``dyt`` is the group's dY in the "lanes" layout of kernels/dytiles.py (per 16-row tile, one
    dword per token and n-pair). For each 16 outputs k and each row tile, 16 accumulators (one per
    output, a lane per token) stay in registers over the whole reduction: per n-block the item's 8
    packed rows are word-swapped into a stack scratch (dword 2q+e of row r: the n-pair q of output
    2r+e), and each n-pair's token vector meets every output's pair as an embedded broadcast
    (``vdpbf16ps acc, dyT, [scratch]{1to16}``: no shuffles and no broadcast instruction per dot). A
    16 x 16 transpose turns the accumulators into output rows. Row tiles after the first reread the
    item's weight slice from L2."""
    sch = spec.schedule
    blocks, block_stride = spec.n // 16, spec.k // 2 * 64
    scratch = fn.alloca("i8", 64, 8 * 64)
    # the broadcasts read the scratch through an offset LLVM cannot see: else it forwards the stored
    # rows into shuffles (three per broadcast, twice the time)
    bcast_base = fn.gep(scratch, vx.opaque_zero(fn))
    with fn.loop(0, sch.nr, name="lj") as j:
        ks = fn.add(k0, fn.mul(j, 16))
        wk = fn.gep(w, fn.mul(ks, 32))  # k-pair row ks / 2 of n-block 0
        yk = fn.gep(y, fn.mul(ks, 4))
        with fn.loop(0, fn.val(f"udiv i64 {fn.add(m, 15)}, 16"), name="lt") as mt:
            rows_here = fn.min(fn.sub(m, fn.mul(mt, 16)), 16)
            mask, pitch = vx.lane_mask(fn, rows_here), fn.mul(rows_here, 4)
            xt = fn.gep(dyt, fn.mul(mt, 32 * spec.n))
            accs = [fn.var(F32x16, "zeroinitializer", 64) for _ in range(16)]
            with fn.loop(0, blocks, name="ls") as s:
                wrow = fn.gep(wk, fn.mul(s, block_stride))
                for off in range(0, 8 * 64, 64):
                    vx.prefetch(fn, fn.gep(wrow, LANES_PREFETCH * block_stride + off))
                for r in range(8):
                    fn.store(BF16x32, vx.swap_k_n_pairs_at(fn, fn.gep(wrow, r * 64)), fn.gep(scratch, r * 64), 64)
                xs = fn.gep(xt, fn.mul(fn.mul(s, 8), pitch))
                # a run-time loop over the block's n-pairs q (one copy of their 16 dots each): the
                # unrolled 128 took a third of the kernel's compile time (125 -> 97 ms) and ran 2-4%
                # slower cold (kernel level, Zen 4; the same with the weights in L3)
                with fn.loop(0, 8, name="lq") as q:
                    tokens = vx.bitcast(fn, vx.masked_load(fn, I32x16, fn.gep(xs, fn.mul(pitch, q)), mask),
                                        I32x16, BF16x32)
                    pairs_q = fn.gep(bcast_base, fn.mul(q, 8))  # dwords 2q, 2q+1 of each swapped row
                    for r in range(8):
                        for e in range(2):
                            acc = accs[2 * r + e]
                            pair = vx.bcast_pair(fn, fn.gep(pairs_q, r * 64 + e * 4))
                            acc.set(vx.dpbf16(fn, acc.get(), tokens, pair))
            outs = vx.transpose_dwords_16x16(fn, [a.get() for a in accs], F32x16)
            yt = fn.gep(yk, fn.mul(fn.mul(mt, 16), ldy))
            for t, v in enumerate(outs):
                with fn.if_then(fn.icmp("sgt", rows_here, t), name="lrow"):
                    p = fn.gep(yt, fn.mul(ldy, t))
                    fn.store(F32x16, vx.fadd(fn, v, fn.load(F32x16, p, 4)) if spec.accumulate else v, p, 4)


STREAM_ALIASED_MAX = 12  # most rows streamed unless both row pitches are odd multiples of 64 B
STREAM_ROWS = 4  # token rows per block of the streamed form with int8 activations
# The streamed form's fp32 accumulators stay in registers over a pass of n-blocks: a group is cut
# into row blocks of at most STREAM_REG_ROWS rows (evenly: 17 rows run as 9 + 8), each reading and
# transposing the pass's blocks once. Row blocks of up to STREAM_ACCS / 2 rows take two
# accumulators per row (two dependency chains of 4 dot products per block), larger ones a second
# one for as many rows as STREAM_ACCS allows: with the 8 transposed vectors, 24 of the 32 zmm
# registers. Compiled per row count (STREAM_ROW_STEP 1; with 2 or more, blocks are padded with zero
# dY rows up to a multiple of it: fewer cases to compile).
# Until the forty-first session each block's outputs were loaded, accumulated over the block's 8
# n-pairs and stored, 4 rows at a time: a chain through memory per row and block. Zen 5, kernel
# level (qwen3 gate/up, 64 experts, weights hot): 5 rows -33%, 8 -16..-31%, 12-13 -15..-36%, 16
# -11..-34%, 20 (10 + 10) -18..+5%; MoE backward with LoRA, qlen 128, same-process A/B against the
# old code: fast memory mode qwen3 -10..-11%, deepseek-v2-lite -24%; slow mode qwen3 +1.7..+2.8%,
# deepseek-v2-lite -4.1..-4.9% (three runs each); dsv3-64e -4..-6%. STREAM_ROW_STEP 2 (6 cases)
# ran 5-6% slower in the fast mode, 12 rows per block lost deepseek-v2-lite's gain (+4%). Cost:
# the transposed GEMM takes ~160 ms of LLVM's time instead of ~60 (12 loops of up to 128 dot
# products; ~210 before the forty-second session hid their addresses from loop strength reduction),
# ~90 ms on two cores since the forty-third (STREAM_PART_ROWS), and its IR takes ~8.5 ms to build
# (no longer on a warm start: see codegen/cache.py; docs/benchmarks.md, forty-first to forty-third
# sessions).
STREAM_REG_ROWS = 16
STREAM_ROW_STEP = 1
STREAM_ACCS = 16
STREAM_BLOCKS = 4  # n-blocks read side by side by the lane-partial form (4 streams; 8 see LP_WIDE_QUANTS)


_LP_PFEVERY = 2  # see _bwd_lane_partial
LANE_PARTIAL_MAX = 8  # most rows of the bf16 lane-partial form (GemmSchedule.lp; int4, int8: QUAD_MAX_ROWS)
LANE_PARTIAL_UNROLL = 4  # rows up to this get code of their own (dY pairs in registers)


# Weights whose lane-partial form reads 8 n-blocks per step at 1-2 unrolled rows (see _bwd_lane_partial).
# MoE backward A/B on Zen 4 (qwen3, LoRA on) against 4 blocks: int8 qlen 1 -3..-5%, qlen 16 -2.5..-3%
# (kernel level, 8 cold experts: 1 row -5%, 2 rows -4%); int4 and int4_1 (with the zero points folded
# out and one byte shuffle per two rows; before that +-1%, and a loss on Zen 5) qlen 1 -2..-3%,
# qlen 16 -3..-6% (kernel level: 1 row -3.5%, 2 rows -6%): since the quad steps int4 takes its
# blocks per step from LP_QUAD_BLOCKS / KG_QUAD_BLOCKS.
LP_WIDE_QUANTS = ("bf16", "int8")  # (int4: LP_QUAD_BLOCKS)
def _far_prefetch(spec: GemmSpec) -> bool:
    """Whether the lane-partial form of ``spec`` adds the schedule's ``lf`` prefetch into L2:
    quantized weights, a distance beyond the L1 prefetch's, and not ``lps`` schedules (single-group
    calls, whose one-row steps go to 8 rows: not measured). Prefetches never fault past the
    weights' end."""
    return spec.quant != "bf16" and not spec.schedule.lps and spec.schedule.lf > spec.schedule.sp


def _lane_partial_slice(spec: GemmSpec, rows: int) -> int:
    """k-pair rows per slice (whole K-groups) of the lane-partial code for up to ``rows`` token
    rows: the schedule's ``ls`` up to LANE_PARTIAL_UNROLL rows, a quarter above (the accumulators,
    rows x slice x 64 bytes, stay in L1/L2). ``lps`` schedules size each code variant's slices by
    its own rows (single groups of 1-4 rows: +0..6% with the longer slices), and so do int4's
    unrolled quad variants (per channel 1-2 rows, K-groups 1-4; kernel A/B, Zen 4, 8 cold experts:
    1 row -6..-8%, 2 rows -3..-7%; MoE backward qlen 1 and 16 -3..-5%; before the quad steps the
    MoE's int4 groups of 1-4 rows measured 4-7% slower with the longer slices); the others size all
    by ``lp``.
    K-group weights take whole groups, as many as keep ``rows`` x slice within that target (the
    accumulators of 1-2 rows in L1): one 64-pair group reads each n-block in 1 KB pieces (per-channel
    int4 in 64-pair slices: 1.17-1.25x the time of 256-pair ones). Kernel A/B, Zen 4, 8 cold experts,
    int4 group 128, against one group per slice: 1 row -6%, 2 rows -3% (4 groups: 2 rows +7%, 4
    rows +33%); MoE backward qwen3 int4_kgroup qlen 16 -5..-6%, qlen 1 -0..-3%."""
    own = spec.quant == "int4" and rows <= QUAD_UNROLL[_quad_kind(spec.quant, spec.group_size)]  # (its quad code)
    bound = rows if spec.schedule.lps or own else spec.schedule.lp
    target = spec.schedule.ls if bound <= LANE_PARTIAL_UNROLL else spec.schedule.ls // 4
    if spec.group_size:  # as many whole groups as keep rows x slice within the target (one at least)
        pairs = spec.group_size // 2
        return pairs * _divisor(spec.k // spec.group_size, max(1, target // rows // pairs))
    return _chunk(spec.k // 2, target)


def _lane_partial_variants(spec: GemmSpec) -> tuple[int, ...]:
    """Most rows of each code variant of the lane-partial form: the unrolled ones (up to
    LANE_PARTIAL_UNROLL) and, above that, the generic one (the schedule's ``lp``)."""
    lp = spec.schedule.lp
    return (min(lp, LANE_PARTIAL_UNROLL),) + ((lp,) if lp > LANE_PARTIAL_UNROLL else ())


def _bwd_lane_partial_rows(fn: Function, spec: GemmSpec, x: str, w: str, y: str, sc: str, zp: str,
                           xsc: str | None, ldx: str, ldy: str, m: str, only: str | None = None) -> None:
    """:func:`_bwd_lane_partial` with code specialised for 1..LANE_PARTIAL_UNROLL rows (their dY
    pairs stay in registers over a step of n-blocks) and the generic form above that; ``only``:
    the index of the one K-slice to compute (default: all)."""
    # (quad: rows above QUAD_UNROLL take its step with rows in a loop)
    quad_unroll = QUAD_UNROLL[_quad_kind(spec.quant, spec.group_size)] if _quad_rows(spec) else LANE_PARTIAL_UNROLL
    unroll = min(spec.schedule.lp, quad_unroll)
    if unroll == 0:
        _bwd_lane_partial(fn, spec, x, w, y, sc, zp, xsc, ldx, ldy, m, only=only)
        return
    # one accumulator buffer for all variants (a variant's rows times its slice)
    acc = fn.alloca("i8", 64, max(r * _lane_partial_slice(spec, r) for r in range(1, spec.schedule.lp + 1)) * 64)
    # quantized weights: each variant in a module part of its own, compiled in parallel (with their
    # decoding, these variants take 15-125 ms each to compile, most of their kernels' time; bf16's
    # take ~5, less than a part's own cost)
    operands = _group_operands(x, w, y, sc, zp, xsc, ldx, ldy, m) + [("ptr", acc), ("i64", only)]

    def variant(rows: int | None) -> None:
        def emit(g: Function, x, w, y, sc, zp, xsc, ldx, ldy, m, acc, only) -> None:
            _bwd_lane_partial(g, spec, x, w, y, sc, zp, xsc, ldx, ldy, str(rows) if rows else m, rows or 0, acc, only)

        if spec.quant == "bf16":
            emit(fn, *(v for _, v in operands))
        else:
            fn.call_in_part(f"{spec.name}_lanes{rows or 'n'}", operands, emit)

    if unroll < spec.schedule.lp:
        few, many, done = fn.new_block("lpfew"), fn.new_block("lpmany"), fn.new_block("lpdone")
        fn.cbr(fn.icmp("sle", m, unroll), few, many)
        fn.set_block(many)
        variant(None)
        fn.br(done)
        fn.set_block(few)
    for rows in fn.switch(m, range(1, unroll + 1), name="lprows"):
        variant(rows)
    if unroll < spec.schedule.lp:
        fn.br(done)
        fn.set_block(done)


def _bwd_lane_partial(fn: Function, spec: GemmSpec, x: str, w: str, y: str, sc: str, zp: str, xsc: str | None,
                      ldx: str, ldy: str, m: str, unrolled: int = 0, acc_buf: str | None = None,
                      only: str | None = None) -> None:
    """``dX = dY W`` for one whole group of at most ``schedule.lp`` rows (or one K-slice of it,
    ``only``), without transposing the weight. Operands:
    bf16; integer kernels (per-channel modes): int16 rows of dY diag(s) with row scales ``xsc``
    against the integer codes; other quantized kernels (K-groups): the fold form's numerics, exact
    integer weights in bf16 against dY's pairs times their channel's scale in the slice's group.

    A packed row r of n-block s, its k-pair words swapped (one in-lane shuffle), holds in lane
    2p+e the pair (W[n_2p][2r+e], W[n_2p+1][2r+e]); a dot product with dY's pairs duplicated per
    dword gives in that lane the partial sum over the n-pair p for output 2r+e. The partials of
    every n-block accumulate in the lanes of one vector per (row, r), and 8 such vectors fold into
    16 outputs at the end (the fold form's arithmetic). Per 64 bytes of weight this costs one
    shuffle instead of the four of the transposition; it pays while the accumulator traffic is
    small (see default_schedule).

    ``acc_buf``: the accumulators' stack buffer (the largest variant's rows times its slice),
    shared by the row-count variants. ``only``: compute K-slice ``only`` alone (schedule ``lps``).
    ``unrolled`` (> 0: m equals it) unrolls the token rows and keeps their dY pairs in registers.

    Order: K in slices (:func:`_lane_partial_slice`; whole K-groups; their accumulators, 64 B per
    row and k-pair row, stay in L1/L2), within a slice the n-blocks STREAM_BLOCKS at a time side by
    side (8 at 1-2 rows, see LP_WIDE_QUANTS), so each block is read in contiguous pieces; a step
    runs the slice's K-groups one after another, each with its own scaled dY pairs and zero
    points. Integer kernels sum the products of a step in int32 (below 2^31: see QUAD_STEP_MAX) and add them
    to fp32 accumulators; the row scale is applied at the end.
    """
    integer = spec.int_x
    nb, rb, kp = spec.n // 16, spec.row_bytes, spec.k // 2
    block_stride = kp * rb
    # per-channel int4: sum_n dY (q - z) as sum_n dY q - sum_n dY z, the second term once per row
    # (MoE backward A/B on Zen 4, qwen3, int4 and int4_1: qlen 1 -6..-7%, qlen 16 -2.5..-3%)
    fold_zero = integer and spec.quant == "int4"
    rows_max = unrolled or spec.schedule.lp
    sl = _lane_partial_slice(spec, rows_max)
    # quad steps (_lane_partial_quad_step): int4 at every row count, int8 from 3 rows (kernel A/B,
    # Zen 4, 8 cold experts, against its unrolled code: 3 rows -9..-11%, 4 rows -22%; 1-2 rows +-1%)
    quad = _quad_rows(spec) and not (spec.quant == "int8" and 0 < unrolled <= 2)
    # per-channel quad steps read dY's pairs where they use them (not held over the step), so they
    # can take more n-blocks per step: fewer accumulator updates per weight byte (LP_QUAD_BLOCKS)
    # K-groups at unrolled rows hold their dY pairs and zero words over the step: KG_QUAD_BLOCKS
    quad_wide = ((KG_QUAD_BLOCKS if unrolled and not integer else LP_QUAD_BLOCKS[0 < unrolled <= 2]),) if quad else ()
    # bf16 and int8 (LP_WIDE_QUANTS) at 1-2 unrolled rows: 8 blocks per step halve the accumulator
    # traffic per weight byte (kernel A/B, Zen 5 fast-memory mode: bf16 m=1-2 -3..-5% on top of the
    # unrolling; int8: see LP_WIDE_QUANTS; at 3-4 rows the 24-32 dY vectors no longer fit the registers)
    wide = (2 * STREAM_BLOCKS,) if 0 < unrolled <= 2 and spec.quant in LP_WIDE_QUANTS and not spec.group_size else ()
    ns = max(d for d in (*quad_wide, *wide, STREAM_BLOCKS, 2, 1) if nb % d == 0)
    # bf16 at 8 blocks per step: software prefetch for every other one, the hardware prefetcher
    # keeps the rest going (kernel A/B, 8 cold experts, Zen 5 slow memory mode, 1 row -3.5..-4.4%,
    # 2 rows -0.9..-3.4%; in the fast mode 2 rows +1.5%; at 4 blocks per step, or prefetching one
    # block in 4 or 8: +5..+9%): fewer instructions per weight byte while streaming. (The int8 rows,
    # half a line, and the quad steps request every block's line once.)
    pf_every = _LP_PFEVERY if ns >= 2 * STREAM_BLOCKS else 1
    far = _far_prefetch(spec)
    # a slice holds whole K-groups: dY's pairs (scaled by the group's channel scales) and the zero
    # points change from one group to the next within each step of n-blocks
    gsl = spec.group_size // 2 if spec.group_size else sl
    acc = acc_buf or fn.alloca("i8", 64, rows_max * sl * 64)
    dyd = None if unrolled or (quad and integer) else fn.alloca("i8", 64, spec.schedule.lp * ns * 64)
    # K-group quad steps dot dY's scaled pairs with the codes as bf16 128 + q (one OR, no table):
    # sum_n dYs (128 + z) comes off every output of the group at the end, from these per-row sums
    offset_codes = quad and not integer
    cacc = fn.alloca("i8", 64, rows_max * (sl // gsl) * 64) if offset_codes else None
    first_slice = fn.mul(only, sl) if only is not None else "0"
    with fn.loop(first_slice, fn.add(first_slice, sl) if only is not None else kp, sl, name="lks") as ks:
        with fn.loop(0, fn.mul(m, sl), name="lz") as z:
            fn.store(F32x16, "zeroinitializer", fn.gep(acc, fn.mul(z, 64)), 64)
        if offset_codes:
            with fn.loop(0, fn.mul(m, sl // gsl), name="lzc") as z:
                fn.store(F32x16, "zeroinitializer", fn.gep(cacc, fn.mul(z, 64)), 64)
        # (without K-groups the slice is one step: no group loop, the code as before it existed)
        groups = fn.loop(0, sl, gsl, name="lkg") if spec.group_size else contextlib.nullcontext("0")
        with fn.loop(0, nb, ns, name="ls") as s0, groups as g0:
            k0 = fn.add(ks, g0) if spec.group_size else ks
            grp = fn.val(f"udiv i64 {k0}, {gsl}") if spec.group_size else "0"
            chans = [fn.add(fn.mul(grp, spec.n), fn.mul(fn.add(s0, b), 16)) for b in range(ns)]
            # the next group's scales (and zero points): a step runs for ~64 rows x 1 KB of codes, so
            # its first scale load found the line cold (kernel A/B, Zen 4, 8 cold experts: 1 row -3..-5%,
            # 2 rows -4%)
            if spec.group_size:
                for b in range(ns):
                    vx.prefetch(fn, fn.gep(sc, fn.mul(fn.add(chans[b], spec.n), 4)))
                    if spec.zero_point:
                        vx.prefetch(fn, fn.gep(zp, fn.add(chans[b], spec.n)))
            def dy_pairs(i: str | int) -> list[str]:  # dY pairs of these blocks, each dword twice
                xrow = fn.gep(x, fn.add(fn.mul(i, ldx), fn.mul(s0, 32)))  # (int4: the 8 dwords twice)
                if integer:  # (int8 at 1-2 rows; quad steps load their pairs where used)
                    return [vx.dup_dwords(fn, fn.gep(xrow, b * 32)) for b in range(ns)]
                return [_dy_pairs(fn, spec, fn.gep(xrow, b * 32), fn.gep(sc, fn.mul(chans[b], 4)), quad)
                        for b in range(ns)]

            # dy_at(i, b): row i's dY pairs of block b: per-channel int4 broadcast-loads them where
            # used; unrolled rows hold them in registers over the step; the others stage them per step
            dyv: list[list[str]] = []
            if quad and integer:
                def dy_at(i: str | int, b: int) -> str:
                    return vx.dup_halves(fn, fn.gep(x, fn.add(fn.add(fn.mul(i, ldx), fn.mul(s0, 32)), b * 32)))
            elif unrolled:
                dyv = [dy_pairs(i) for i in range(unrolled)]

                def dy_at(i: str | int, b: int) -> str:
                    return dyv[i][b]
            else:
                with fn.loop(0, m, name="ld") as i:
                    for b, pairs in enumerate(dy_pairs(i)):
                        fn.store(BF16x32, pairs, fn.gep(dyd, fn.add(fn.mul(i, ns * 64), b * 64)), 64)

                def dy_at(i: str | int, b: int) -> str:
                    return fn.load(BF16x32, fn.gep(dyd, fn.add(fn.mul(i, ns * 64), b * 64)), 64)
            wblk = fn.gep(w, fn.add(fn.mul(s0, block_stride), fn.mul(k0, rb)))
            if quad:
                qz = None if integer else [_quad_zero_words(fn, spec, fn.gep(zp, chans[b])) for b in range(ns)]
                if offset_codes:
                    cslot = fn.val(f"udiv i64 {g0}, {gsl}")

                    def offset_sum(i: str | int) -> None:
                        cp = fn.gep(cacc, fn.mul(fn.add(fn.mul(i, sl // gsl), cslot), 64))
                        t = fn.load(F32x16, cp, 64)
                        for b in range(ns):
                            t = vx.dpbf16(fn, t, vx.bitcast(fn, qz[b], I16x32, BF16x32), dy_at(i, b))
                        fn.store(F32x16, t, cp, 64)

                    if unrolled:
                        for i in range(unrolled):
                            offset_sum(i)
                    else:
                        with fn.loop(0, m, name="lco") as i:
                            offset_sum(i)
                _lane_partial_quad_step(fn, spec, wblk, block_stride, gsl, ns, dy_at, unrolled or m, acc,
                                        sl, g0 if spec.group_size else "0", qz)
            else:  # bf16, and int8 at 1-2 rows or in lps schedules: one k-pair row per step
                # rows shorter than a line (int8: 32 B) go per_line at a time: every block's line is
                # requested once, at the first of them (MoE backward A/B on Zen 5, int8 qwen3 qlen 16,
                # against every other block at each row: -1.6..-3%; kernel level, 4 blocks per step
                # against all of them at each row: -2%)
                per_line = max(1, 64 // rb)

                def k_pair_row(r: str, line_start: bool) -> None:
                    wrow = fn.gep(wblk, fn.mul(r, rb))
                    wv = []  # one swapped row per block
                    for b in range(ns):
                        p = fn.gep(wrow, b * block_stride)
                        requested_here = line_start if per_line > 1 else b % pf_every == 0
                        if requested_here:
                            vx.prefetch(fn, fn.gep(p, spec.schedule.sp))
                            if far:
                                vx.prefetch(fn, fn.gep(p, spec.schedule.lf), 2)
                        wv.append(_swapped_row(fn, spec, p, None, None, False))

                    def token_row(i: str | int, dy: list[str]) -> None:
                        kr = fn.add(g0, r) if spec.group_size else r
                        ap = fn.gep(acc, fn.mul(fn.add(fn.mul(i, sl), kr), 64))
                        v = fn.load(F32x16, ap, 64)
                        part = "zeroinitializer" if integer else v
                        for b in range(ns):
                            part = _dot(fn, part, wv[b], dy[b], integer)
                        if integer:
                            part = vx.fadd(fn, v, fn.val(f"sitofp {I32x16} {part} to {F32x16}"))
                        fn.store(F32x16, part, ap, 64)

                    if unrolled:
                        for i in range(unrolled):
                            token_row(i, dyv[i])
                    else:
                        with fn.loop(0, m, name="li") as i:
                            dp = fn.gep(dyd, fn.mul(i, ns * 64))
                            token_row(i, [fn.load(BF16x32, fn.gep(dp, b * 64), 64) for b in range(ns)])

                with fn.loop(0, gsl, per_line, name="lr") as r_line:
                    for j in range(per_line):
                        k_pair_row(fn.add(r_line, j) if j else r_line, j == 0)
        with fn.loop(0, m, name="lo") as i:
            if fold_zero:  # sum_n dY[i, n] z_n, the same for every output
                zsum = _zero_term(fn, spec, fn.gep(x, fn.mul(i, ldx)), zp)
            with fn.loop(0, sl // 8, name="lg") as g:
                ap = fn.gep(acc, fn.mul(fn.add(fn.mul(i, sl), fn.mul(g, 8)), 64))
                vs = [fn.load(F32x16, fn.gep(ap, j * 64), 64) for j in range(8)]
                order = QUAD_ORDER if spec.quant == "int4" else QUAD_ORDER_INT8
                out = vx.reduce_half_lanes(fn, vs, order) if quad else vx.reduce_pair_lanes(fn, vs)
                if offset_codes:  # (lanes 0-7 of the group's sums: its 8 n-pairs' parts; 8-15 the same again)
                    cv = fn.load(F32x16, fn.gep(cacc, fn.mul(fn.add(fn.mul(i, sl // gsl),
                                                                   fn.val(f"udiv i64 {fn.mul(g, 8)}, {gsl}")), 64)), 64)
                    lo8 = fn.val(f"shufflevector {F32x16} {cv}, {F32x16} poison, {vx.shuffle_mask(list(range(8)))}")
                    sym = fn.module.declare("llvm.vector.reduce.fadd.v8f32",
                                            "declare float @llvm.vector.reduce.fadd.v8f32(float, <8 x float>)")
                    csum = fn.val(f"call reassoc float {sym}(float 0.0, <8 x float> {lo8})")
                    out = fn.val(f"fsub {F32x16} {out}, {vx.f32_splat_value(fn, csum)}")
                if fold_zero:
                    out = fn.val(f"fsub {F32x16} {out}, {zsum}")
                if integer:
                    out = vx.fmul(fn, out, vx.splat_f32(fn, fn.gep(xsc, fn.mul(i, 4)), "f32"))
                p = fn.gep(y, fn.add(fn.mul(i, ldy), fn.mul(fn.add(ks, fn.mul(g, 8)), 8)))
                if spec.accumulate:
                    out = vx.fadd(fn, out, fn.load(F32x16, p, 4))
                fn.store(F32x16, out, p, 4)


# n-blocks per quad step of the K-group form at its unrolled 1-4 rows (kernel A/B, Zen 4, 8 cold
# experts, against 4: 1 / 2 / 3 / 4 rows -8 / -11 / -6 / -3..-4%; 16 at 1 row -9%)
KG_QUAD_BLOCKS = 8
# n-blocks per quad step of the per-channel form at 3-4 and at 1-2 rows (int32 step sums: up to 32
# products of 16383 x 3840 < 2^31). Kernel A/B, Zen 4, 8 cold experts, 16 against 8: 3 rows -8%, 4 rows
# -10%, 1-2 rows +1..+2% (against 4: 3-4 rows -13..-20%)
LP_QUAD_BLOCKS = (16, 8)
# largest int32 sum of a per-channel int4 quad step in one lane: 2 products per block of dY codes
# (at most ACT_MAX) and codes times 2^8 (at most 15 << 8)
QUAD_STEP_MAX = 2 * max(LP_QUAD_BLOCKS) * ACT_MAX * (15 << 8)
assert QUAD_STEP_MAX < 2**31
# The quad step's code vectors: word w of a 64-byte load (4 packed rows r..r+3 of a block, bytes
# 2w, 2w+1 = channel w % 16, elements j = 0, 1 of rows r + 2h, h = w // 16, in their low nibbles and
# of rows r + 2h + 1 in their high ones) cut to one nibble: code x holds k = 2r + 4h + QUAD_K[x]
# (per channel masked in place below the top nibble: see _quad_scale_bits)
QUAD_SHIFT = (0, 4, 8, 12)  # bit offset of code vector x's nibble in each word
QUAD_K = (0, 2, 1, 3)
# accumulator j of a group of 8 (slots r..r+7, r % 8 == 0) holds code j % 4 of the quad at r + 4 (j // 4):
# its half h sums output 8 (j // 4) + 4 h + QUAD_K[j % 4] of the group's 16
QUAD_ORDER = tuple(8 * (j // 4) + 4 * h + QUAD_K[j % 4] for j in range(8) for h in range(2))
# int8 in the same lanes: a 64-byte load holds k-pair rows r, r + 1; code x (the low or high byte of
# each word) holds k = 2r + 2h + x in lane 8h + p: accumulator j of a group of 8 (slots r..r+7) is code
# j % 2 of the step at r + 2 (j // 2), its half h output 4 (j // 2) + 2h + j % 2
QUAD_ORDER_INT8 = tuple(4 * (j // 2) + 2 * h + j % 2 for j in range(8) for h in range(2))


# most rows of the int4 lane-partial form (quad steps), per channel and K-groups, against the forms
# they replace (kernel A/B, Zen 4, 8 cold experts). Per channel: the lane-partial form's generic code
# at 5 / 6 / 8 rows -19 / -22 / -41%, the streamed form at 10 / 12 rows -27 / -26%, the panel at 16
# rows -13%, 24 rows +9..+15%, 32 rows +-1%. K-groups: the generic code at 5 / 7 rows -17 / -33%, the
# streamed form at 10 / 16 / 20 / 24 rows -11 / -31 / -6 / -3..-5%, the panel at 32 rows -13%, 48 -2.5%
# int8 (two k-pair rows per load in the quad step's structure: rows in chunks, 16 n-blocks; then with
# the other steps' shuffles and staged dY pairs): the streamed form at 6 / 8 / 12 rows -5 / -13 / -10%,
# the panel at 16 rows +-0 (the streamed form against the panel, eighteenth session: 12 / 14 / 16 /
# 20 / 24 rows -5 / +2 / +15 / +18 / +20%)
QUAD_MAX_ROWS = (16, 32, 12)
LP_ACC_BYTES = 256 << 10  # most bytes of the lane-partial form's stack accumulators (see runtime/threads.py)
# rows with code of their own (the unrolled lane-partial code) below the quad form's row loop, per
# channel, K-groups, int8 (whose 1-2 rows keep the one-row steps). Kernel A/B, Zen 4, 8 cold experts:
# per channel 3 rows in the loop -3..-5%; K-groups 3 rows unrolled (dY pairs in registers) -28..-30%,
# 4 rows +-4%
QUAD_UNROLL = (2, 4, 4)


def _quad_kind(quant: str, group_size: int) -> int:
    """Index of a quantized mode's values in QUAD_UNROLL and QUAD_MAX_ROWS: int4 per channel, int4
    K-groups, int8."""
    return 2 if quant == "int8" else int(bool(group_size))


def _quad_rows(spec: GemmSpec) -> bool:
    """Whether the lane-partial form of ``spec`` takes quad steps (int4 always, int8 from 3 rows;
    not for ``lps`` schedules). (Its slices are multiples of 16 k-pair rows: whole quads and groups
    of 8 accumulators.)"""
    return spec.quant != "bf16" and spec.schedule.lp > 0 and not spec.schedule.lps


QUAD_CODE_BASE = 0x4300  # bf16 128: OR-ed with a code q in 0..15 it is bf16 128 + q, exactly


def _quad_zero_words(fn: Function, spec: GemmSpec, zptr: str) -> str:
    """The words of bf16 128 + z matching the quad step's code vectors for the channels
    zptr[0..16] (word w is channel w % 16; z = 8 when symmetric)."""
    if not spec.zero_point:
        return vec_const("i16", [QUAD_CODE_BASE | 8] * 32)
    z = fn.val(f"zext <16 x i8> {fn.load('<16 x i8>', zptr, 1)} to <16 x i16>")
    zz = vx.shuffle(fn, "<16 x i16>", z, None, list(range(16)) * 2)
    return fn.val(f"or {I16x32} {zz}, {vec_const('i16', [QUAD_CODE_BASE] * 32)}")


def _lane_partial_quad_step(fn: Function, spec: GemmSpec, wblk: str, block_stride: int, gsl: int, ns: int,
                            dy_at, rows: int | str, acc: str, sl: int, kbase: str,
                            zero_words: list[str] | None) -> None:
    """One step of n-blocks of :func:`_bwd_lane_partial` in the quad form (int4, and int8 from 3
    rows): per block one 64-byte load of the step's packed k-pair rows (int4: four, int8:
    two), each token row's dots against it (dY pairs from ``dy_at(row, block)``), the step's sums
    added to the accumulators. ``rows``: a count (code per count, in balanced chunks of at most 4)
    or a run-time value (chunks of 4 in a loop, then a switch over the 1-3 left); each chunk keeps
    its sums (4 per row and code vector) in registers and reads the step's weights again (from L1
    after the first chunk).

    int4 (:func:`_quad_codes`): three masks and a shift split the load into four code vectors, no
    byte shuffle or zero extension (per 64 bytes one op on the shuffle ports instead of six).
    Per channel (integer, ``zero_words`` None, zero points folded out) the masked codes keep their
    2^_quad_scale_bits(x), undone in fp32 (int32 step sums below QUAD_STEP_MAX); K-groups take the
    codes as bf16 128 + q against dY times the group's scales, and :func:`_bwd_lane_partial`
    subtracts sum_n dYs (128 + z) per row and group at the end (``zero_words``: bf16 128 + z). Code
    vector x lands in accumulator slot ``kbase`` + r + x, its lane 8h + p summing n-pair p's part
    of output 2(kbase + r) + 4h + QUAD_K[x] (dY pairs in both 256-bit halves). int8: two k-pair
    rows per load, each word's two bytes sign-extended by shifts (no shuffle), in the same lanes:
    code x (byte x) in slot r + x sums output 2(kbase + r) + 2h + x (QUAD_ORDER_INT8); against the
    shuffles of the other steps (kernel A/B): 6 rows -8%, 8-12 rows +-0..-4%.

    Kernel A/B, Zen 4, 8 cold experts, per-channel int4 decode at unrolled rows: 1 row -2..+3% (at
    the memory's rate), 2 rows -7..-9%, 3 rows -13%; weights in L3, 1 row -29%. K-group: cold +-1%,
    in L3 -10%. The rows and blocks: see QUAD_MAX_ROWS, LP_QUAD_BLOCKS.

    Each step prefetches the line of every block ``sp`` bytes ahead (until the thirty-ninth session
    every other block's, as the bf16 form does; MoE backward A/B on Zen 5, qwen3, LoRA on, against
    that: qlen 128 int4 -11%, int4_1 -13%, int4_kgroup -12%, int8 -7%; qlen 16 int4 -3.5%,
    int4_1kgroup -10%, int8 -1%; Zen 4 not measured)."""
    rb = spec.row_bytes
    with fn.loop(0, gsl, 4 if spec.quant == "int4" else 2, name="lq") as r:
        wrow = fn.gep(wblk, fn.mul(r, rb))
        kr = fn.add(kbase, r)
        for b in range(ns):  # (a step reads one line of each block: every block's is requested)
            vx.prefetch(fn, fn.gep(wrow, b * block_stride + spec.schedule.sp))
            if _far_prefetch(spec):
                vx.prefetch(fn, fn.gep(wrow, b * block_stride + spec.schedule.lf), 2)
        if isinstance(rows, int):
            count = -(-rows // 4)
            for j in range(count):
                first = j * rows // count
                _quad_chunk(fn, spec, wrow, block_stride, ns, dy_at, first, (j + 1) * rows // count - first, acc, sl,
                            kr, zero_words)
        else:
            full = fn.val(f"udiv i64 {rows}, 4")
            with fn.loop(0, full, name="lqc") as q:
                _quad_chunk(fn, spec, wrow, block_stride, ns, dy_at, fn.mul(q, 4), 4, acc, sl, kr, zero_words)
            first = fn.mul(full, 4)
            for left in fn.switch(fn.sub(rows, first), range(1, 4), name="lqr"):
                _quad_chunk(fn, spec, wrow, block_stride, ns, dy_at, first, left, acc, sl, kr, zero_words)


def _quad_scale_bits(x: int) -> int:
    """Per-channel int4: code vector x holds its codes times 2^this (masked in place; the top
    nibble is shifted down)."""
    return QUAD_SHIFT[x] if QUAD_SHIFT[x] < 12 else 0


def _quad_codes(fn: Function, w: str, integer: bool) -> list[str]:
    """The four code vectors of a quad step's 64-byte load ``w`` (<32 x i16>), typed <32 x bfloat>:
    ``integer``, int16 codes times 2^_quad_scale_bits(x) (one mask each; the top nibble a shift);
    else bf16 128 + q (each code shifted down and OR-ed into the mantissa of 128)."""
    out = []
    for sh in QUAD_SHIFT:
        if integer and sh < 12:
            v = fn.val(f"and {I16x32} {w}, {vec_const('i16', [15 << sh] * 32)}")
        else:
            v = fn.val(f"lshr {I16x32} {w}, {vec_const('i16', [sh] * 32)}") if sh else w
            if sh < 12:
                v = fn.val(f"and {I16x32} {v}, {vec_const('i16', [15] * 32)}")
            if not integer:
                v = fn.val(f"or {I16x32} {v}, {vec_const('i16', [QUAD_CODE_BASE] * 32)}")
        out.append(vx.bitcast(fn, v, I16x32, BF16x32))
    return out


def _quad_chunk(fn: Function, spec: GemmSpec, wrow: str, block_stride: int, ns: int, dy_at, first: int | str,
                count: int, acc: str, sl: int, kr: str, zero_words: list[str] | None) -> None:
    """The quad step's work for the ``count`` token rows from row ``first`` (a count or a run-time
    value) at the step's k-pair rows from ``wrow`` (int4: 4, int8: 2; see
    :func:`_lane_partial_quad_step`)."""
    integer = zero_words is None
    rows = [first + j if isinstance(first, int) else fn.add(first, j) for j in range(count)]
    ncodes = 4 if spec.quant == "int4" else 2
    scale_bits = [_quad_scale_bits(c) for c in range(4)] if spec.quant == "int4" else [0, 0]
    parts = {(i, c): "zeroinitializer" for i in range(count) for c in range(ncodes)}
    for b in range(ns):
        p = fn.gep(wrow, b * block_stride)
        if spec.quant == "int8":  # word w: channel w % 16, its bytes j = 0, 1 of row r + w // 16, sign-extended
            w = fn.load(I16x32, p, 1)
            eight = vec_const("i16", [8] * 32)
            codes = [vx.bitcast(fn, fn.val(f"ashr {I16x32} {fn.val(f'shl {I16x32} {w}, {eight}')}, {eight}"), I16x32,
                                BF16x32),
                     vx.bitcast(fn, fn.val(f"ashr {I16x32} {w}, {eight}"), I16x32, BF16x32)]
        else:
            codes = _quad_codes(fn, fn.load(I16x32, p, 1), integer)
        for i, row in enumerate(rows):
            pairs = dy_at(row, b)
            for c in range(ncodes):
                parts[i, c] = _dot(fn, parts[i, c], codes[c], pairs, integer)
    for i, row in enumerate(rows):
        for c in range(ncodes):
            ap = fn.gep(acc, fn.mul(fn.add(fn.add(fn.mul(row, sl), kr), c), 64))
            v = fn.load(F32x16, ap, 64)
            if not integer:
                fn.store(F32x16, vx.fadd(fn, v, parts[i, c]), ap, 64)
                continue
            f = fn.val(f"sitofp {I32x16} {parts[i, c]} to {F32x16}")
            if scale_bits[c]:
                v = vx.fma(fn, f, vx.f32_splat(2.0 ** -scale_bits[c]), v)
            else:
                v = vx.fadd(fn, v, f)
            fn.store(F32x16, v, ap, 64)


def _stream_blocks(spec: GemmSpec) -> int:
    """n-blocks per pass of the streamed form: the largest of the schedule's ``sb``, 8, 4, 2, 1
    that is at most ``sb`` and divides N/16."""
    sb = spec.schedule.sb
    return max(d for d in (sb, 8, 4, 2, 1) if d <= sb and (spec.n // 16) % d == 0)


def _bwd_stream_group(fn: Function, spec: GemmSpec, x: str, w: str, y: str, sc: str, zp: str, xsc: str | None,
                      ldx: str, ldy: str, m: str, groups: Sequence[int] | None = None) -> None:
    """``dX = dY W`` for one whole (small) group (above the lane-partial form's rows), reading the
    packed weight in forward order: ``ns`` (up to the schedule's ``sb``) n-blocks side by side, 8
    k-pair rows (512 B) of each per step, so the weight streams like the forward's. Each 8-row
    group is transposed in registers (as in the panel form) and multiplied into the ``m x K`` fp32
    output (in L1/L2 for small groups): for each 16 outputs k, the rows' accumulators stay in
    registers over the pass's n-blocks (:func:`_stream_row_block`; groups above STREAM_REG_ROWS
    rows in even row blocks, each transposing the pass's blocks again). int8 activations keep
    int32 sums per block, flushed into the output with the row's scale, 4 rows at a time.

    K-group weights (bf16 numerics; their scale varies along K, the output dimension here) stay exact
    integers in bf16 (one ``vpermw`` per row) and their group's scales move onto dY instead: when K
    enters a group, each row's dY over the pass's n-blocks is multiplied by the group's channel
    scales and rounded to bf16 into a scratch (``sm x ns x 32`` bytes) that the dot products read
    (the numerics of the fold and lane-partial forms; MoE measurements in default_schedule).

    ``groups``: the row counts of the groups this copy of the form is for (its row-count cases:
    :func:`_stream_row_variants`); default all it takes.
    """
    nb, rb = spec.n // 16, spec.row_bytes
    block_stride = spec.k // 2 * rb
    ns = _stream_blocks(spec)
    regroup = bool(spec.group_size) and not spec.int_x
    if regroup:
        sld = ns * 32  # scratch row pitch: the pass's n-blocks of one row, 16 bf16 each
        sdy = fn.alloca("i8", 64, spec.schedule.sm * sld)
    # row blocks as _stream_row_split: block j has `base` rows, one more for the first `extra`
    row_blocks_n, base = _stream_row_blocks(fn, m)
    extra = fn.val(f"urem i64 {m}, {row_blocks_n}")
    zero_rows = None
    if STREAM_ROW_STEP > 1 and not spec.int_x:  # the dY of padding rows: zeros (a pass's n-blocks)
        zero_rows = fn.alloca("i8", 64, ns * 32)
        for off in range(0, ns * 32, 32):
            fn.store("<8 x i32>", "zeroinitializer", fn.gep(zero_rows, off), 32)
    with fn.loop(0, nb, ns, name="sb") as s0:
        first = fn.icmp("eq", s0, 0)
        wblk = fn.gep(w, fn.mul(s0, block_stride))
        with fn.loop(0, spec.k // 16, name="kb") as kb:
            k0 = fn.mul(kb, 16)
            grp = fn.val(f"udiv i64 {k0}, {spec.group_size}") if spec.group_size else "0"
            if regroup:
                with fn.if_then(fn.icmp("eq", fn.val(f"urem i64 {k0}, {spec.group_size}"), 0), name="sdy"):
                    with fn.loop(0, m, name="sdr") as i:
                        xrow = fn.gep(x, fn.add(fn.mul(i, ldx), fn.mul(s0, 32)))
                        for b in range(ns):
                            chan = fn.add(fn.mul(grp, spec.n), fn.mul(fn.add(s0, b), 16))
                            v = vx.fmul(fn, vx.load_f32x16(fn, fn.gep(xrow, b * 32), "bf16"),
                                        fn.load(F32x16, fn.gep(sc, fn.mul(chan, 4)), 4))
                            fn.store("<16 x bfloat>", fn.val(f"fptrunc {F32x16} {v} to <16 x bfloat>"),
                                     fn.gep(sdy, fn.add(fn.mul(i, sld), b * 32)), 32)

            def block(b: str) -> list[str]:
                """The 8 transposed vectors of n-block s0+b at this kb (q = n-pair within the block)."""
                wrow = fn.gep_unseen(wblk, fn.add(fn.mul(b, block_stride), fn.mul(kb, 8 * rb)))
                for off in range(0, 8 * rb, 64):
                    vx.prefetch(fn, fn.gep(wrow, spec.schedule.sp + off))
                chan = fn.add(fn.mul(grp, spec.n), fn.mul(fn.add(s0, b), 16))
                zw = _zero_for(fn, spec, fn.gep(zp, chan))
                scp = fn.gep(sc, fn.mul(chan, 4)) if spec.quant != "bf16" and not regroup else None
                wrows = [_swapped_row(fn, spec, fn.gep(wrow, r * rb), zw, scp, r % 2 == 1)
                         for r in range(8)]
                return vx.transpose_qwords_8x8(fn, wrows)

            if not spec.int_x:
                with fn.loop(0, row_blocks_n, name="rblk") as j:
                    # block j: rows m0 .. m0 + rows - 1
                    longer = fn.icmp("ult", j, extra)
                    rows = fn.add(base, fn.val(f"zext i1 {longer} to i64"))
                    m0 = fn.add(fn.mul(j, base), fn.val(f"select i1 {longer}, i64 {j}, i64 {extra}"))
                    padded = rows if STREAM_ROW_STEP == 1 else \
                        fn.val(f"and i64 {fn.add(rows, STREAM_ROW_STEP - 1)}, {-STREAM_ROW_STEP}")
                    # a loop of its own per row count (the transposition compiled in each: a shared
                    # loop with the switch inside ran 3-10% slower)
                    for r in fn.switch(padded, _stream_row_variants(spec, groups), name="rows"):
                        _stream_row_block(fn, spec, block, x, y, ldx, ldy, m0, rows, r, first, k0, s0, ns,
                                          (sdy, sld) if regroup else None, zero_rows)
            else:  # int8 activations (schedules that stream int8 weights): int32 sums of each block,
                # flushed into dX with the row's scale; blocks of STREAM_ROWS rows share a transposition
                with fn.loop(0, ns, name="blk") as b:
                    tv = block(b)
                    zero_first = fn.val(f"and i1 {first}, {fn.icmp('eq', b, 0)}")

                    def micro(m0: str, n_rows: int) -> None:  # tv stays in registers across the row blocks
                        xs = fn.gep(x, fn.add(fn.mul(fn.add(s0, b), 32), fn.mul(m0, ldx)))
                        accs = [[fn.var(I32x16, "zeroinitializer", 64) for _ in range(2 if n_rows == 1 else 1)]
                                for _ in range(n_rows)]
                        for q, wv in enumerate(tv):
                            for i, chs in enumerate(accs):
                                xb = vx.bcast_pair(fn, fn.gep(xs, fn.add(fn.mul(i, ldx), q * 4)))
                                acc = chs[q % len(chs)]
                                acc.set(_dot(fn, acc.get(), wv, xb, True))
                        for i, chs in enumerate(accs):
                            v = chs[0].get()
                            for ch in chs[1:]:
                                v = fn.val(f"add {I32x16} {v}, {ch.get()}")
                            p = fn.gep(y, fn.add(fn.mul(fn.add(m0, i), ldy), fn.mul(k0, 4)))
                            _store_int(fn, spec, v, p, zero_first,
                                       vx.splat_f32(fn, fn.gep(xsc, fn.mul(fn.add(m0, i), 4)), "f32"))

                    row_blocks(fn, m, STREAM_ROWS, micro)


def _stream_row_split(m: int) -> set[int]:
    """The row counts of the streamed form's row blocks for a group of m rows: ceil(m /
    STREAM_REG_ROWS) blocks as even as can be (the first m mod that count one row longer)."""
    blocks = -(-m // STREAM_REG_ROWS)
    return {m // blocks, -(-m // blocks)}


def _stream_row_blocks(fn: Function, m: str) -> tuple[str, str]:
    """At run time, as :func:`_stream_row_split`: how many row blocks a group of ``m`` rows takes,
    and the rows of its smallest."""
    n = fn.val(f"udiv i64 {fn.add(m, STREAM_REG_ROWS - 1)}, {STREAM_REG_ROWS}")
    return n, fn.val(f"udiv i64 {m}, {n}")


def _stream_row_variants(spec: GemmSpec, groups: Sequence[int] | None = None) -> list[int]:
    """The row-block sizes the streamed form compiles (cases of a switch in the kernel: a block size
    without one would leave its outputs unwritten): those of every group it takes (lp+1..sm rows, or
    1..sm without lane-partial rows; or of the groups of ``groups`` rows), rounded up to a multiple
    of STREAM_ROW_STEP."""
    step = STREAM_ROW_STEP
    return sorted({-(-r // step) * step for m in (groups or _stream_groups(spec)) for r in _stream_row_split(m)})


def _stream_groups(spec: GemmSpec) -> range:
    """The row counts of the groups the streamed form takes."""
    sch = spec.schedule
    return range(sch.lp + 1 if sch.lp < sch.sm else 1, sch.sm + 1)


# Groups whose row blocks all have at least this many rows run the streamed form's code in a module
# part of its own (codegen/ir.py Module.part), which compiles on a second core: the form's loops
# (one per row count, 5-16 rows) are most of the transposed GEMM's compile time. With 9 the two
# parts take about as long (bf16 qwen3 shape, Zen 5: ~85 ms each against ~160 ms for the whole).
STREAM_PART_ROWS = 9


def _group_operands(x: str, w: str, y: str, sc: str, zp: str, xsc: str | None, ldx: str, ldy: str,
                    m: str) -> list[tuple[str, str | None]]:
    return [("ptr", x), ("ptr", w), ("ptr", y), ("ptr", sc), ("ptr", zp), ("ptr", xsc), ("i64", ldx),
            ("i64", ldy), ("i64", m)]


def _bwd_stream_group_in_parts(fn: Function, spec: GemmSpec, x: str, w: str, y: str, sc: str, zp: str,
                               xsc: str | None, ldx: str, ldy: str, m: str) -> None:
    """:func:`_bwd_stream_group`, for groups whose row blocks all have STREAM_PART_ROWS rows or more
    in a function of a module part (a call per group), for the others inline."""
    groups = _stream_groups(spec)
    large = [g for g in groups if min(_stream_row_split(g)) >= STREAM_PART_ROWS]
    if spec.int_x or not large or len(large) == len(groups):  # (the int8-activation form has no row cases)
        _bwd_stream_group(fn, spec, x, w, y, sc, zp, xsc, ldx, ldy, m)
        return
    def form(in_part: bool) -> None:
        if in_part:
            fn.call_in_part(f"{spec.name}_rows{STREAM_PART_ROWS}", _group_operands(x, w, y, sc, zp, xsc, ldx, ldy, m),
                            lambda g, *a: _bwd_stream_group(g, spec, *a, groups=large))
        else:
            _bwd_stream_group(fn, spec, x, w, y, sc, zp, xsc, ldx, ldy, m,
                              groups=[g for g in groups if g not in large])

    either(fn, fn.icmp("uge", _stream_row_blocks(fn, m)[1], STREAM_PART_ROWS), form)


def _stream_row_block(fn: Function, spec: GemmSpec, block, x: str, y: str, ldx: str, ldy: str, m0: str,
                      rows: str, r: int, first: str, k0: str, s0: str, ns: int,
                      scratch: tuple[str, int] | None, zero_rows: str | None) -> None:
    """One row block of the streamed form at one 16-k block: ``rows`` (run time, <= r) token rows
    from m0, their 16 outputs at k0 accumulated in registers over the pass's ``ns`` n-blocks
    (``block(b)`` gives block b's 8 transposed vectors), then stored; rows r > rows read zero dY
    (``zero_rows``) and store nothing. ``scratch``: (pointer, row pitch) of the K-group form's
    scaled dY rows, read instead of dY."""
    two = [i < STREAM_ACCS - r for i in range(r)]  # rows with a second accumulator
    padded = [i >= r - STREAM_ROW_STEP + 1 for i in range(r)]  # rows that may be padding
    reload = "true" if spec.accumulate else fn.val(f"xor i1 {first}, true")
    outs = [fn.gep(y, fn.add(fn.mul(fn.add(m0, i), ldy), fn.mul(k0, 4))) for i in range(r)]
    accs = []
    for i in range(r):
        acc = fn.var(F32x16, "zeroinitializer", 64)
        live = fn.val(f"and i1 {fn.icmp('ult', i, rows)}, {reload}") if padded[i] else reload
        # past the pass's first: the outputs so far (no load on the first pass: a miss for nothing)
        with fn.if_then(live, name="ain"):
            acc.set(fn.load(F32x16, outs[i], 4))
        accs.append([acc] + ([fn.var(F32x16, "zeroinitializer", 64)] if two[i] else []))
    src, pitch = scratch if scratch else (fn.gep(x, fn.mul(s0, 32)), ldx)
    row_at = []
    for i in range(r):
        p = fn.gep(src, fn.mul(fn.add(m0, i), pitch))
        if padded[i]:
            p = fn.val(f"select i1 {fn.icmp('ult', i, rows)}, ptr {p}, ptr {zero_rows}")
        row_at.append(p)
    with fn.loop(0, ns, name="blk") as b:
        tv = block(b)
        # (these and the weight rows' addresses unseen by loop strength reduction: it took ~50 of the
        # transposed GEMM's ~210 compile ms for the same run time)
        at = [fn.gep_unseen(p, fn.mul(b, 32)) for p in row_at]
        vals = [[a.get() for a in chs] for chs in accs]
        for q, wv in enumerate(tv):
            for i in range(r):
                c = q % len(vals[i])
                vals[i][c] = vx.dpbf16(fn, vals[i][c], wv, vx.bcast_pair(fn, fn.gep(at[i], q * 4)))
        for chs, vs in zip(accs, vals, strict=True):
            for a, v in zip(chs, vs, strict=True):
                a.set(v)
    for i in range(r):
        v = accs[i][0].get()
        if two[i]:
            v = vx.fadd(fn, v, accs[i][1].get())
        if padded[i]:
            with fn.if_then(fn.icmp("ult", i, rows), name="aout"):
                fn.store(F32x16, v, outs[i], 4)
        else:
            fn.store(F32x16, v, outs[i], 4)


def _old_out(fn: Function, p: str, accumulate: bool | str) -> str | None:
    """The 16 fp32 outputs at ``p`` an accumulating copy-out adds to: None without ``accumulate``;
    with a run-time i1 ``accumulate``, zeros where it is false."""
    if not accumulate:
        return None
    old = fn.load(F32x16, p, 4)
    if isinstance(accumulate, str):
        old = fn.val(f"select i1 {accumulate}, {F32x16} {old}, {F32x16} zeroinitializer")
    return old


def _copy_rows_out(fn: Function, src: str, dst: str, rows: str, ldy: str, vecs: int,
                   accumulate: bool | str, scales: list[str] | None = None) -> None:
    """dst[i, 0:16*vecs] (+)= src[i*64*?] (times ``scales[j]``, one <16 x float> per 16 columns):
    copy ``rows`` fp32 rows of a staged C tile pair; ``accumulate`` may be a run-time i1."""
    with fn.loop(0, rows, name="cp") as i:
        drow = fn.gep(dst, fn.mul(i, ldy))
        for j in range(vecs):
            v = fn.load(F32x16, fn.gep(src, fn.add(fn.mul(i, 64), j * 1024)), 64)
            p = fn.gep(drow, j * 64)
            old = _old_out(fn, p, accumulate)
            if scales:
                v = vx.fma(fn, v, scales[j], old) if old is not None else fn.val(f"fmul {F32x16} {v}, {scales[j]}")
            elif old is not None:
                v = vx.fadd(fn, v, old)
            fn.store(F32x16, v, p, 4)


# Quantized weights on AMX: each 16-row block of codes (int8: 512 B, int4: 256 B) is decoded with
# AVX-512 into a 1 KB bf16 tile in the bf16 packed layout on the stack, then used like a packed
# bf16 block (B tile of the forward, A tile of the transposed GEMM); x and dY stay bf16. Forwards
# decode exact integers (q, or q - z) and apply the scales to fp32 outputs: per channel once, per
# K-group to each group's partial products (up to 32 rows, see _amx_quant_fwd_body). The
# per-channel transposed GEMM (channel scales along the reduction) takes dY diag(s) rounded to
# bf16 (spec.scaled_dy) with the same exact codes; K-group weights are otherwise decoded as s (q -
# z), rounded once to bf16 (as the AVX-512 panel form does; in the transposed GEMM the scales vary
# along both dimensions). Above 32 rows both kernels decode each block once per work item, not per
# 32-row chunk (the transposed GEMM in pieces of at most 4096 outputs, AMX_PREDECODE_BYTES).
# Decoding is the cost of these kernels: measured on Zen 4 with the tile instructions removed, the
# decode alone streams 16-26 GB/s of codes on 2 threads (int8, exact int4, the K-group forward at
# groups of 128; 14 at 64, 10 at 32), ~13 GB/s where it also scales (docs/benchmarks.md,
# "Twenty-fourth/fifth session").

AMX_QUANT_PREFETCH = 4  # 16-row blocks ahead that the quantized AMX GEMMs prefetch (0: none)


def _prefetch_block(fn: Function, spec: GemmSpec, block: str) -> None:
    """Prefetch the lines of the 16-row block of codes at ``block``."""
    for line in range(0, 16 * spec.row_bytes, 64):
        vx.prefetch(fn, fn.gep(block, line))


def _amx_block_offsets(spec: GemmSpec) -> tuple[int, int]:
    """Bytes between consecutive n-blocks of the packed weight, and between its 16-row blocks."""
    return spec.k // 2 * spec.row_bytes, 16 * spec.row_bytes


def _quant_params(fn: Function, spec: GemmSpec, sc: str, zp: str, n0, kb) -> tuple[str, str]:
    """Pointers to the fp32 scales and uint8 zero points of the 16 channels from ``n0`` in the
    K-group of 16-row block ``kb`` (per-channel modes: group 0)."""
    row = n0
    if spec.group_size:
        row = fn.add(fn.mul(fn.val(f"udiv i64 {fn.mul(kb, 32)}, {spec.group_size}"), spec.n), n0)
    return fn.gep(sc, fn.mul(row, 4)), fn.gep(zp, row)


def _decode_block(fn: Function, spec: GemmSpec, src: str, dst: str, zero_words: str | None,
                  scales: str | None) -> None:
    """One 16-row block of quantized codes at ``src`` -> 16 x 32 bf16 at ``dst`` (64-byte rows):
    the exact integers (``scales`` None) or times the 16 channels' fp32 ``scales``; int4 takes
    ``zero_words`` from :func:`_zero_words`."""
    if scales is not None:
        # row element e (channel e // 2) sits, as fp32, in dword d of the low or high word
        # interleave (vpunpck{l,h}wd: 128-bit lane d // 4, word d % 4, or + 4 for the high one);
        # vcvtne2ps2bf16 puts the low products first, one word permutation restores the row order
        # (a vpermpd: whole qwords move). ~6 operations per row against ~11 through fpext/fptrunc
        # (decode-only, K-group transposed GEMM at 16 rows: 9.4 -> 13.1 GB/s of codes)
        s16 = fn.load(F32x16, scales, 4)
        lo_e = [8 * (d // 4) + d % 4 for d in range(16)]
        hi_e = [e + 4 for e in lo_e]
        s_lo = vx.shuffle(fn, F32x16, s16, None, [e // 2 for e in lo_e])
        s_hi = vx.shuffle(fn, F32x16, s16, None, [e // 2 for e in hi_e])
        order = lo_e + hi_e
        back = "<" + ", ".join(f"i16 {order.index(e)}" for e in range(32)) + ">"
        cvt = fn.module.declare("llvm.x86.avx512bf16.cvtne2ps2bf16.512",
                                f"declare {BF16x32} @llvm.x86.avx512bf16.cvtne2ps2bf16.512({F32x16}, {F32x16})")
        perm = fn.module.declare("llvm.x86.avx512.permvar.hi.512",
                                 f"declare {I16x32} @llvm.x86.avx512.permvar.hi.512({I16x32}, {I16x32})")

    def put(r: int, row: str) -> None:
        if scales is not None:
            words = vx.bitcast(fn, row, BF16x32, I16x32)
            halves = []
            for es, sv in ((lo_e, s_lo), (hi_e, s_hi)):
                mask = [v for e in es for v in (32, e)]  # (zero word below each bf16: its fp32 value)
                wide = fn.val(f"shufflevector {I16x32} {words}, {I16x32} zeroinitializer, "
                              f"<32 x i32> <{', '.join(f'i32 {v}' for v in mask)}>")
                halves.append(fn.val(f"fmul {F32x16} {vx.bitcast(fn, wide, I16x32, F32x16)}, {sv}"))
            packed = fn.val(f"call {BF16x32} {cvt}({F32x16} {halves[1]}, {F32x16} {halves[0]})")
            row = vx.bitcast(fn, fn.val(f"call {I16x32} {perm}({I16x32} {vx.bitcast(fn, packed, BF16x32, I16x32)}, "
                                        f"{I16x32} {back})"), I16x32, BF16x32)
        fn.store(BF16x32, row, fn.gep(dst, 64 * r), 64)

    # (each row stored as soon as it is made: 16 rows decoded first would not fit the registers)
    for r in range(0, 16, 2):
        if spec.quant == "int8":
            pair = [_weight_row(fn, spec, fn.gep(src, 32 * (r + e))) for e in range(2)]
        else:  # rows 2i and 2i+1 share one 32-byte load
            pair = [_int4_row(fn, codes, zero_words, False) for codes in _int4_code_pairs(fn, fn.gep(src, 16 * r))]
        for e, row in enumerate(pair):
            put(r + e, row)


def _amx_fwd_body(spec: GemmSpec):
    if spec.quant != "bf16":
        return _amx_quant_fwd_body(spec)
    kb_count = spec.k // 32
    block_stride, kb_bytes = _amx_block_offsets(spec)

    def body(fn: Function, ctx: str, item: str, t: Tiles) -> None:
        scratch = fn.alloca("i8", 64, 4096)
        c, x, w, y, m, *_ = _group(fn, ctx, item, spec.items_per_group)
        ldx, ldy = ARGS.load(fn, ctx, "ldx"), ARGS.load(fn, ctx, "ldy")
        w0 = fn.gep(w, fn.mul(c, 2 * block_stride))
        w1 = fn.gep(w0, block_stride)
        yb = fn.gep(y, fn.mul(c, 128))
        with fn.loop(0, m, 32, name="mt") as m0:
            rem = fn.sub(m, m0)
            xa = fn.gep(x, fn.mul(m0, ldx))

            def tiles(n_mt: int) -> None:
                xb = fn.gep(xa, fn.mul(16, ldx)) if n_mt == 2 else None
                with fn.loop(0, kb_count, name="kb") as kb:
                    koff = fn.mul(kb, 64)
                    t.load(0, fn.gep(xa, koff), ldx)
                    if n_mt == 2:
                        t.load(1, fn.gep(xb, koff), ldx)
                    boff = fn.mul(kb, kb_bytes)
                    t.load(2, fn.gep(w0, boff), 64)
                    t.load(3, fn.gep(w1, boff), 64)
                    t.dp_bf16(4, 0, 2)
                    t.dp_bf16(5, 0, 3)
                    if n_mt == 2:
                        t.dp_bf16(6, 1, 2)
                        t.dp_bf16(7, 1, 3)
                for ct in range(4, 4 + 2 * n_mt):
                    t.store(ct, fn.gep(scratch, (ct - 4) * 1024), 64)

            _by_row_tiles(fn, t, rem, tiles)
            _copy_rows_out(fn, scratch, fn.gep(yb, fn.mul(m0, ldy)), fn.min(rem, 16), ldy, 2, spec.accumulate)
            with fn.if_then(fn.icmp("sgt", rem, 16)):
                _copy_rows_out(fn, fn.gep(scratch, 2048), fn.gep(yb, fn.mul(fn.add(m0, 16), ldy)),
                               fn.min(fn.sub(rem, 16), 16), ldy, 2, spec.accumulate)

    return body


def _by_row_tiles(fn: Function, t: Tiles, rem: str, emit) -> None:
    """``emit(n_mt)`` with the C tiles of ``n_mt`` row tiles zeroed: one (``rem`` <= 16) or two."""
    one_bb, two_bb, join = fn.new_block("one"), fn.new_block("two"), fn.new_block("join")
    fn.cbr(fn.icmp("sgt", rem, 16), two_bb, one_bb)
    for label, n_mt in ((one_bb, 1), (two_bb, 2)):
        fn.set_block(label)
        for ct in range(4, 4 + 2 * n_mt):
            t.zero(ct)
        emit(n_mt)
        fn.br(join)
    fn.set_block(join)


AMX_DECODE_UNIT = 32  # most k-blocks the quantized AMX forward decodes at once above 32 rows (64 KB)


def _decode_unit(spec: GemmSpec) -> int:
    """k-blocks per decode unit of the quantized AMX forward above 32 rows (the last may be shorter)."""
    return min(spec.k // 32, AMX_DECODE_UNIT)


def _amx_quant_fwd_body(spec: GemmSpec):
    # Up to 32 rows (one row chunk) each block is decoded just before its tile loads (1 KB per
    # n-block, hot in L1), to exact integers (q, or q - z): the C tiles sum all of K, or a K-group,
    # and the scales are applied to those fp32 sums as they go to Y (per K-group and 16 rows 32
    # multiply-adds; decoding s (q - z) for every weight read 9 GB/s of codes at groups of 128
    # against 17 for this, Zen 4, tile instructions removed).
    # Above 32 rows a work item runs decode unit by decode unit along K: the unit's blocks are
    # decoded once, into at most 64 KB of the stack, and every 32-row chunk multiplies them and
    # adds its C tiles to Y (per channel times the scales). The decode, the cost of these kernels,
    # then no longer grows with the row count (decoded per chunk, int8 went from 25 GB/s of codes at
    # 16 rows to 7.5 at 128; per unit 16-17 at 128, tile instructions removed). K-groups decode s (q -
    # z) here, rounded once to bf16 as in the transposed GEMM: a copy-out per group and chunk cost
    # more than the decode (4 GB/s of codes at 128 rows). The B tiles then come from L2; the unit's
    # size trades that against one copy-out per unit and chunk (to time on an AMX CPU).
    kb_count, unit = spec.k // 32, _decode_unit(spec)
    group_blocks = spec.group_size // 32 if spec.group_size else kb_count
    block_stride, kb_bytes = _amx_block_offsets(spec)

    def body(fn: Function, ctx: str, item: str, t: Tiles) -> None:
        scratch = fn.alloca("i8", 64, 4096)
        decoded = fn.alloca("i8", 64, unit * 2048)  # block (kb, n-block j) at (2 (kb - unit start) + j) KB
        c, x, w, y, m, sc, zp = _group(fn, ctx, item, spec.items_per_group)
        ldx, ldy = ARGS.load(fn, ctx, "ldx"), ARGS.load(fn, ctx, "ldy")
        wj = [fn.gep(w, fn.mul(c, 2 * block_stride))]
        wj.append(fn.gep(wj[0], block_stride))
        yb = fn.gep(y, fn.mul(c, 128))
        n0 = fn.mul(c, 32)

        def quant_params(kb) -> tuple[list[str], list[str | None]]:
            """Pointers to the scales, and the zero words, of both n-blocks at k-block ``kb``."""
            params = [_quant_params(fn, spec, sc, zp, fn.add(n0, 16 * j), kb) for j in range(2)]
            return [sptr for sptr, _ in params], [_zero_words(fn, spec, zptr) for _, zptr in params]

        def scale_vectors(sptrs: list[str]) -> list[str]:
            return [fn.load(F32x16, sptr, 4) for sptr in sptrs]

        if not spec.group_size:  # per channel: the same for all of K
            channel_scales, channel_zeros = quant_params(0)
            channel_scales = scale_vectors(channel_scales)

        def decode(kb, dst, zeros, scales=(None, None)) -> None:
            """Both n-blocks' blocks at k-block ``kb`` -> dst, dst + 1 KB (times ``scales``)."""
            boff = fn.mul(kb, kb_bytes)
            for j in range(2):
                if AMX_QUANT_PREFETCH:
                    _prefetch_block(fn, spec, fn.gep(wj[j], fn.add(boff, AMX_QUANT_PREFETCH * kb_bytes)))
                _decode_block(fn, spec, fn.gep(wj[j], boff), fn.gep(dst, 1024 * j), zeros[j], scales[j])

        def mac(xa: str, n_mt: int, kb, blocks: str) -> None:
            """C tiles += x's k-block ``kb`` (``n_mt`` row tiles from ``xa``) times the decoded pair."""
            for h in range(n_mt):
                t.load(h, fn.gep(xa, fn.add(fn.mul(16 * h, ldx), fn.mul(kb, 64))), ldx)
            t.load(2, blocks, 64)
            t.load(3, fn.gep(blocks, 1024), 64)
            for h in range(n_mt):
                t.dp_bf16(4 + 2 * h, h, 2)
                t.dp_bf16(5 + 2 * h, h, 3)

        def flush(m0: str, rem: str, n_mt: int, later, scales: list[str] | None, rezero: bool = False) -> None:
            """Y rows m0.. (+)= the C tiles (times ``scales``); ``rezero``: then the C tiles are zero."""
            for ct in range(4, 4 + 2 * n_mt):
                t.store(ct, fn.gep(scratch, (ct - 4) * 1024), 64)
                if rezero:
                    t.zero(ct)
            for h in range(n_mt):
                _copy_rows_out(fn, fn.gep(scratch, 2048 * h), fn.gep(yb, fn.mul(fn.add(m0, 16 * h), ldy)),
                               fn.min(fn.sub(rem, 16 * h), 16), ldy, 2, later, scales)

        def one_chunk(n_mt: int) -> None:  # m <= 32: decode each block as it is used
            with fn.loop(0, kb_count, group_blocks, name="grp") as g0:
                if spec.group_size:
                    sptrs, zeros = quant_params(g0)
                else:
                    zeros = channel_zeros
                with fn.loop(g0, fn.add(g0, group_blocks), name="kb") as kb:
                    decode(kb, decoded, zeros)
                    mac(x, n_mt, kb, decoded)
                if spec.group_size:
                    flush("0", m, n_mt, True if spec.accumulate else fn.icmp("ne", g0, 0), scale_vectors(sptrs),
                          rezero=True)
            if not spec.group_size:
                flush("0", m, n_mt, spec.accumulate, channel_scales)

        def chunks() -> None:  # m > 32: decode a unit of blocks once for every row chunk
            with fn.loop(0, kb_count, unit, name="u") as u0:
                n = fn.min(unit, fn.sub(kb_count, u0))  # (the last unit may be shorter)
                with fn.loop(0, n, name="dec") as d:
                    kb = fn.add(u0, d)
                    dst = fn.gep(decoded, fn.mul(d, 2048))
                    if spec.group_size:
                        sptrs, zeros = quant_params(kb)
                        decode(kb, dst, zeros, sptrs)
                    else:
                        decode(kb, dst, channel_zeros)
                later = True if spec.accumulate else fn.icmp("ne", u0, 0)  # (Y holds the earlier units' sums)
                with fn.loop(0, m, 32, name="mt") as m0:
                    rem = fn.sub(m, m0)
                    xa = fn.gep(x, fn.mul(m0, ldx))

                    def unit_chunk(n_mt: int) -> None:
                        with fn.loop(0, n, name="kb") as d:
                            mac(xa, n_mt, fn.add(u0, d), fn.gep(decoded, fn.mul(d, 2048)))
                        flush(m0, rem, n_mt, later, None if spec.group_size else channel_scales)

                    _by_row_tiles(fn, t, rem, unit_chunk)

        with fn.if_then(fn.icmp("sgt", m, 0)):  # (an empty group reads nothing)
            either(fn, fn.icmp("sle", m, 32), lambda few: _by_row_tiles(fn, t, m, one_chunk) if few else chunks())

    return body


# most decoded bytes per item the quantized AMX transposed GEMM keeps (on the stack: see
# runtime/threads.py); above (N > 4096) it decodes the item's n-blocks in pieces
AMX_PREDECODE_BYTES = 256 << 10


def _bwd_pieces(spec: GemmSpec) -> tuple[int, int]:
    """(pieces, n-blocks per piece; the last may be fewer) in which the quantized AMX transposed
    GEMM decodes an item's N / 16 blocks above 32 rows: as few as keep a piece's 1 KB tiles within
    AMX_PREDECODE_BYTES, about equal."""
    nb = spec.n // 16
    pieces = -(-nb * 1024 // AMX_PREDECODE_BYTES)
    return pieces, -(-nb // pieces)


def _amx_bwd_body(spec: GemmSpec):
    nb = spec.n // 16
    block_stride, kb_bytes = _amx_block_offsets(spec)
    quant = spec.quant != "bf16"
    # quantized, above 32 rows: the item's nb blocks are decoded once, before its row-tile pairs
    # (decoded per pair, the decode, the cost of these kernels, would grow with the rows); where
    # they pass AMX_PREDECODE_BYTES (N > 4096), piece by piece, each piece's products added to dX
    # by its own transposed copy-out
    pieces, piece_nb = _bwd_pieces(spec)

    def body(fn: Function, ctx: str, item: str, t: Tiles) -> None:
        scratch = fn.alloca("i8", 64, 4096)
        decoded = fn.alloca("i8", 64, piece_nb * 1024) if quant else None
        kb, x, w, y, m, sc, zp = _group(fn, ctx, item, spec.items_per_group)
        ldy = ARGS.load(fn, ctx, "ldy")
        wk = fn.gep(w, fn.mul(kb, kb_bytes))
        yb = fn.gep(y, fn.mul(kb, 128))
        n_mt = fn.val(f"udiv i64 {fn.add(m, 15)}, 16")

        def slot(s: str, s0: str | int) -> str:
            """Where n-block ``s`` is decoded in a piece from n-block ``s0``."""
            return fn.gep(decoded, fn.mul(fn.sub(s, s0), 1024))

        def decode(s: str, dst: str) -> str:
            """n-block ``s``'s block of this item's codes -> dst (a bf16 tile); returns dst."""
            block = fn.gep(wk, fn.mul(s, block_stride))
            if AMX_QUANT_PREFETCH:  # (blocks of one item are block_stride apart)
                _prefetch_block(fn, spec, fn.gep(block, AMX_QUANT_PREFETCH * block_stride))
            # K-groups: their scales are decoded into the weights (per channel: on dY)
            scales, zptr = _quant_params(fn, spec, sc, zp, fn.mul(s, 16), kb)
            _decode_block(fn, spec, block, dst, _zero_words(fn, spec, zptr), None if spec.scaled_dy else scales)
            return dst

        def row_tiles(s0: str | int, s1: str | int, decoded_once: bool, accumulate: bool | str) -> None:
            """dX (+)= the products of n-blocks [s0, s1), over every pair of row tiles (``decoded_once``:
            the quantized blocks are at ``decoded`` from s0 on, else each is decoded as used)."""

            def a_tile(s: str) -> str:
                """The A tile of n-block ``s``: the packed bf16 block, or its codes decoded."""
                if not quant:
                    return fn.gep(wk, fn.mul(s, block_stride))
                return slot(s, s0) if decoded_once else decode(s, decoded)

            with fn.loop(0, n_mt, 2, name="mt") as mt0:

                def tiles(count: int) -> None:
                    with fn.loop(s0, s1, name="s") as s:
                        t.load(0, a_tile(s), 64)
                        for h in range(count):
                            # dY tiles of m-tile (mt0+h), n-block s: even-k then odd-k selector
                            dyt = fn.gep(x, fn.mul(fn.add(fn.mul(fn.add(mt0, h), nb), s), 2048))
                            t.load(2, dyt, 64)
                            t.load(3, fn.gep(dyt, 1024), 64)
                            t.dp_bf16(4 + 2 * h, 0, 2)
                            t.dp_bf16(5 + 2 * h, 0, 3)
                    for ct in range(4, 4 + 2 * count):
                        t.store(ct, fn.gep(scratch, (ct - 4) * 1024), 64)

                _by_row_tiles(fn, t, fn.sub(m, fn.mul(mt0, 16)), tiles)
                for h in range(2):
                    tok0 = fn.mul(fn.add(mt0, h), 16)
                    valid = fn.min(fn.sub(m, tok0), 16)
                    with fn.loop(0, valid, name=f"tr{h}") as j:
                        # C_e[r][j] and C_o[r][j] -> dX[tok0 + j, 32*kb + 2r + e]
                        cols = []
                        for e in range(2):
                            base = fn.gep(scratch, fn.add(fn.mul(j, 4), (2 * h + e) * 1024))
                            v = "poison"
                            for r in range(16):
                                f = fn.load("float", fn.gep(base, r * 64), 4)
                                v = fn.val(f"insertelement {F32x16} {v}, float {f}, i64 {r}")
                            cols.append(v)
                        lo = vx.shuffle(fn, F32x16, cols[0], cols[1], [i // 2 + 16 * (i % 2) for i in range(16)])
                        hi = vx.shuffle(fn, F32x16, cols[0], cols[1], [8 + i // 2 + 16 * (i % 2) for i in range(16)])
                        row = fn.gep(yb, fn.mul(fn.add(tok0, j), ldy))
                        for q, v in enumerate((lo, hi)):
                            p = fn.gep(row, q * 64)
                            old = _old_out(fn, p, accumulate)
                            fn.store(F32x16, v if old is None else vx.fadd(fn, v, old), p, 4)

        def decoded_pieces() -> None:
            """Above 32 rows: each piece of n-blocks decoded once, then its row tiles."""
            with fn.loop(0, nb, piece_nb, name="piece") as s0:
                s1 = fn.min(fn.add(s0, piece_nb), nb)
                with fn.loop(s0, s1, name="dec") as s:
                    decode(s, slot(s, s0))
                # (the first piece writes dX as the spec says, the others add to it)
                row_tiles(s0, s1, True, spec.accumulate or (pieces > 1 and fn.icmp("ne", s0, 0)))

        def each_block_as_used() -> None:
            row_tiles(0, nb, False, spec.accumulate)

        if quant:
            either(fn, fn.icmp("sgt", m, 32), lambda many: decoded_pieces() if many else each_block_as_used())
        else:
            each_block_as_used()

    return body


def build_ir(spec: GemmSpec) -> str:
    """LLVM IR text of the worker ``<spec.name>(ptr ctx)``."""
    target = target_for(spec.isa)
    mod = Module(spec.name, target.fn_attrs)
    if spec.isa == "avx512":
        if spec.op == "fwd":
            body = _avx512_fwd_body(spec)
        else:
            body = _avx512_bwd_panel_body(spec) if spec.is_panel else _avx512_bwd_body(spec)
            if spec.op == "bwd" and spec.quant == "bf16":
                mod.pipeline = "light"  # see codegen/compile.py (measured on the bf16 kernels)
        build_worker(mod, spec.name, ARGS, body, lookahead=spec.schedule.pfi)
    else:
        body = _amx_fwd_body(spec) if spec.op == "fwd" else _amx_bwd_body(spec)
        build_worker(mod, spec.name, ARGS, body, TileConfig.uniform(), emulate_amx=spec.isa == "amx_emu")
    return mod.render()


# ---------------------------------------------------------------------------------------------
# Python entry points


class GemmKernel:
    """A compiled GEMM worker plus its launch convention."""

    def __init__(self, spec: GemmSpec) -> None:
        self.spec = spec
        # (the IR is built only when the disk cache's index does not name the kernel: the spec and
        # kt_jit's code and constants are all it is made from)
        self.addr = get_or_compile(spec.name, repr(spec), lambda: build_ir(spec), target_for(spec.isa),
                                   [spec.name])[spec.name]

    def launch(self, groups, ldx: int, ldy: int,
               num_threads: int | None = None, ldh: int = 0) -> None:
        """Run over ``groups``; pitches (``ldh``: of the fused-LoRA H rows) in bytes.

        ``groups`` is an int64 table [G, spec.group_fields] (torch, NumPy or flat ctypes; see
        codegen.worker.group_table): x ptr, packed-w ptr, y ptr, m, scales ptr, zero-points ptr,
        for integer kernels (``spec.int_x``) the row scales [m] fp32 of the int16 x, for kernels
        with the tokens-in-lanes form (``schedule.tl``) x in the "lanes" layout of
        kernels/dytiles.py (2 m N bytes; read for the groups that form takes), and for fused
        LoRA the H rows [m, rank * (2 if split else 1)] bf16 and the B [N or split, rank] bf16 of
        each adapter. Pointers are trusted: callers validate shapes first (see
        :func:`linear`).
        """
        if self.spec.isa == "amx":
            require_amx()
        n_groups, addr = group_table(groups, self.spec.group_fields)
        n_items = n_groups * self.spec.items_per_group
        if n_items == 0:
            return
        dispatch(self.addr, ARGS.make(n_items, groups=addr, ldx=ldx, ldy=ldy, ldh=ldh), num_threads, keep=(groups,))


@functools.cache
def get_kernel(spec: GemmSpec) -> GemmKernel:
    """The compiled kernel for ``spec`` (memoised; compiled or loaded from the disk cache once)."""
    return GemmKernel(spec)


def kernel_for(op: str, n: int, k: int, accumulate: bool = False, isa: str | None = None,
               schedule: GemmSchedule | None = None, quant: str = "bf16", group_size: int = 0,
               zero_point: bool = False, one_group: bool = False, lora_rank: int = 0,
               lora_split: int = 0, lanes_dy: bool = False) -> GemmKernel:
    """The kernel for this problem on ``isa`` (default: the active ISA for bf16 weights, AVX-512
    for quantized ones; fused LoRA always uses the AVX-512 kernels) with the default schedule
    (``one_group``: for launches of a single group; ``lanes_dy``: transposed launches that also
    pass dY in the tokens-in-lanes layout; see :func:`default_schedule`)."""
    if lora_rank or (quant != "bf16" and isa is None):
        isa = "avx512"
    return _kernel_for(op, n, k, accumulate, isa or active_isa(), schedule, quant, group_size, zero_point,
                       one_group, lora_rank, lora_split, lanes_dy, host_tuning())


@functools.cache
def _kernel_for(op: str, n: int, k: int, accumulate: bool, isa: str, schedule: GemmSchedule | None,
                quant: str, group_size: int, zero_point: bool, one_group: bool, lora_rank: int,
                lora_split: int, lanes_dy: bool, tuning: HostTuning) -> GemmKernel:
    # (``tuning``: the host's values in effect, the memo's key and default_schedule's input)
    if schedule is None:
        schedule = default_schedule(op, isa, n, k, quant, one_group, group_size, lanes_dy, tuning)
        if group_size and (op, isa) == ("fwd", "avx512"):  # a K-chunk within one group: its scale is applied per chunk
            schedule = dataclasses.replace(schedule, kc=_chunk(group_size // 2, schedule.kc))
        while op == "fwd" and lora_split % (16 * schedule.nr):  # a work item's outputs use one adapter
            schedule = dataclasses.replace(schedule, nr=schedule.nr // 2)
        if lora_rank and schedule.lps:  # the fused LoRA term goes by output column blocks: the fold form
            schedule = dataclasses.replace(schedule, lp=0, lps=False)
    return get_kernel(GemmSpec(op, n, k, isa, accumulate, schedule, quant, group_size, zero_point, lora_rank,
                               lora_split))


def _one_group(x: int, w: int, y: int, m: int, scales: int = 0, zeros: int = 0,
               xscales: int | None = None) -> ctypes.Array:
    """A one-group table; ``xscales``: the per-row scales of the int16 x of integer kernels."""
    fields = (x, w, y, m, scales, zeros) + ((xscales,) if xscales is not None else ())
    return (ctypes.c_int64 * len(fields))(*fields)


def pack_dy_for_amx(dy: torch.Tensor, scales: torch.Tensor | None = None) -> torch.Tensor:
    """Arrange dY [M, N] bf16 (times the column ``scales`` [N] fp32, rounded to bf16, for kernels
    with ``spec.scaled_dy``) into the B tiles of the AMX transposed GEMM.

    Returns ``[ceil(M/16), N/16, 2, 16, 16, 2]`` bf16: ``out[mt, s, e, i, j, e] = dY[16mt+j, 16s+i]``
    and zero in the other half of each pair (tokens past M are zero).
    """
    m, n = dy.shape
    if scales is not None:
        dy = (dy.float() * scales).bfloat16()
    mt = (m + 15) // 16
    padded = torch.zeros(mt * 16, n, dtype=torch.bfloat16)
    padded[:m] = dy
    t = padded.view(mt, 16, n // 16, 16).permute(0, 2, 3, 1)  # [mt, s, i, j]
    out = aligned_zeros((mt, n // 16, 2, 16, 16, 2), torch.bfloat16)
    out[:, :, 0, :, :, 0] = t
    out[:, :, 1, :, :, 1] = t
    return out


def _check_packed(packed: torch.Tensor, scales: torch.Tensor | None) -> str:
    """Validate a packed weight (and its scales); returns its quant mode."""
    if not isinstance(packed, torch.Tensor) or packed.dim() != 4 or packed.shape[2:] != (16, 2) \
            or not packed.is_contiguous() or packed.dtype not in (torch.bfloat16, torch.int8) \
            or packed.device.type != "cpu":
        raise ValueError("weight must be a contiguous packed tensor [N/16, K/2, 16, 2] from "
                         "kt_jit.pack_bf16 (bf16) or kt_jit.kernels.quant.pack_int8 (int8)")
    if packed.dtype == torch.bfloat16:
        if scales is not None:
            raise ValueError("scales are only for quantized (int8) weights")
        return "bf16"
    n = packed.shape[0] * 16
    if scales is None or scales.dtype != torch.float32 or tuple(scales.shape) != (n,) \
            or not scales.is_contiguous() or scales.device.type != "cpu":
        raise ValueError(f"int8 weights need their per-channel scales: a contiguous float32 tensor [{n}]")
    return "int8"


def _check_operands(a: torch.Tensor, packed: torch.Tensor, a_cols: int, what: str) -> None:
    if a.dim() != 2:
        raise ValueError(f"{what} must be 2-D [M, {a_cols}], got shape {tuple(a.shape)}")
    if a.dtype != torch.bfloat16:
        raise ValueError(f"{what} must be bfloat16, got {a.dtype}; convert with .bfloat16()")
    if a.device.type != "cpu" or packed.device.type != "cpu":
        raise ValueError("kt_jit kernels run on CPU tensors only")
    if a.shape[1] != a_cols:
        raise ValueError(f"{what} has {a.shape[1]} columns but the weight needs {a_cols}")
    if not a.is_contiguous():
        raise ValueError(f"{what} must be contiguous; call .contiguous() first")


def _pad_rows_for_amx(x: torch.Tensor) -> torch.Tensor:
    m = x.shape[0]
    if m % 16 == 0:
        return x
    padded = torch.zeros((m + 15) // 16 * 16, x.shape[1], dtype=x.dtype)
    padded[:m] = x
    return padded


def _output(out: torch.Tensor | None, m: int, cols: int, accumulate: bool) -> torch.Tensor:
    if out is None:
        if accumulate:
            raise ValueError("accumulate=True needs an output tensor to add into")
        return torch.empty(m, cols, dtype=torch.float32)
    if out.shape != (m, cols) or out.dtype != torch.float32 or not out.is_contiguous() or out.device.type != "cpu":
        raise ValueError(f"out must be a contiguous float32 CPU tensor of shape {(m, cols)}, "
                         f"got {tuple(out.shape)} {out.dtype}")
    return out


def linear(x: torch.Tensor, packed: torch.Tensor, out: torch.Tensor | None = None,
           accumulate: bool = False, num_threads: int | None = None, isa: str | None = None,
           scales: torch.Tensor | None = None) -> torch.Tensor:
    """``Y[M, N] (fp32) (+)= X[M, K] (bf16) @ W^T`` with W given packed (``[N/16, K/2, 16, 2]``,
    bf16; or int8 with per-channel ``scales [N]`` fp32)."""
    quant = _check_packed(packed, scales)
    n, k = packed.shape[0] * 16, packed.shape[1] * 2
    _check_operands(x, packed, k, "x")
    if num_threads is not None:
        knobs.check_thread_count(num_threads)
    m = x.shape[0]
    y = _output(out, m, n, accumulate)
    kern = kernel_for("fwd", n, k, accumulate, isa, quant=quant)
    if m == 0:
        return y
    with immediate_launches():  # (returns what it computed, from temporaries)
        if kern.spec.int_x:
            xq, xs = quantize_rows(x)
            table = _one_group(xq.data_ptr(), packed.data_ptr(), y.data_ptr(), m, scales.data_ptr(), 0,
                               xs.data_ptr())
            kern.launch(table, k * 2, n * 4, num_threads)
            return y
        xp = _pad_rows_for_amx(x) if kern.spec.isa != "avx512" else x
        sptr = scales.data_ptr() if scales is not None else 0
        kern.launch(_one_group(xp.data_ptr(), packed.data_ptr(), y.data_ptr(), m, sptr), k * 2, n * 4, num_threads)
    return y


def linear_t(dy: torch.Tensor, packed: torch.Tensor, out: torch.Tensor | None = None,
             accumulate: bool = False, num_threads: int | None = None, isa: str | None = None,
             scales: torch.Tensor | None = None) -> torch.Tensor:
    """``dX[M, K] (fp32) (+)= dY[M, N] (bf16) @ W`` reading the same packed W (and scales) as
    :func:`linear`."""
    quant = _check_packed(packed, scales)
    n, k = packed.shape[0] * 16, packed.shape[1] * 2
    _check_operands(dy, packed, n, "dy")
    if num_threads is not None:
        knobs.check_thread_count(num_threads)
    m = dy.shape[0]
    dx = _output(out, m, k, accumulate)
    kern = kernel_for("bwd", n, k, accumulate, isa, quant=quant, one_group=True)
    if m == 0:
        return dx
    with immediate_launches():  # (returns what it computed, from temporaries)
        src = pack_dy_for_amx(dy, scales if kern.spec.scaled_dy else None) if kern.spec.isa != "avx512" else dy
        sptr = scales.data_ptr() if scales is not None else 0
        kern.launch(_one_group(src.data_ptr(), packed.data_ptr(), dx.data_ptr(), m, sptr), n * 2, k * 4,
                    num_threads)
    return dx

"""Forward and backward of the routed-expert MoE layer with per-expert LoRA (the math of DESIGN.md).

Per active expert e with tokens X (scale s = alpha / rank)::

    [G | U] = X [Wg; Wu]^T + s [(X Ag^T) Bg^T | (X Au^T) Bu^T]      one GEMM, N = 2I
    A = silu(G) * U                                                  (bf16, the down input)
    Y = A Wd^T + s (A Ad^T) Bd^T ;  out[t] += w[t,k] Y[t]

Backward, with D = dOut Wd + s (dOut Bd) Ad (per routed row, unweighted)::

    dw[t,k] = <D, A>            (= <dOut[t], Y_k[t]>, so Y is never stored; A recomputed in fp32
                                 from the kept bf16 [G | U], which is all the forward keeps per pair)
    dA = w D ;  dG = dA U silu'(G) ;  dU = dA silu(G)
    dX = [dG | dU] [Wg; Wu] + s (dG Bg) Ag + s (dU Bu) Au          one transposed GEMM, N = 2I

The base weights are read once per pass from the single packed copy (forward: gate_up, down;
backward: down, gate_up, both transposed in-kernel). The LoRA intermediates H = s X A^T are
computed first and rounded to bf16 once; on the AVX-512 kernels the forward GEMMs then add H B^T
as extra k-steps of their own micro-kernel (no second pass over the fp32 outputs), and the
backward uses the same bf16 H for the B gradients.
"""

from __future__ import annotations

import functools
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from ..codegen.plan import Capture, Plan, Span, group_rows
from ..codegen.worker import LaunchBatch
from ..kernels import fill, gemm
from ..kernels import lora as lk
from ..kernels.activation import kernel_for as act_kernel
from ..kernels.dytiles import kernel_for as dytiles_kernel
from ..kernels.rowquant import quantize_rows_into
from ..kernels.rows import kernel_for as rows_kernel
from ..runtime import knobs
from ..runtime.amx import active_isa
from ..runtime.buffers import aligned_empty, array_address
from ..runtime.memory import keep_freed_memory
from .gradbuf import LoraGradBuffers
from .routing import SEGMENT_ALIGN, Routing, route
from .weights import MoEExperts, lora_shapes


@dataclass
class Saved:
    """What backward needs from forward (per routed pair 2I bf16; with LoRA 3r bf16 per segment row)."""

    x: torch.Tensor          # [T, H] bf16 input (re-gathered in backward, not stored per row)
    topk_weights: torch.Tensor  # [T, K] fp32
    routing: Routing
    # the kept per-row buffers in one 64-byte aligned uint8 block, laid out by ``kept`` (see
    # :meth:`kept_rows`; one allocation and one saved tensor instead of four: at decode sizes each
    # torch allocation and saved tensor costs microseconds): gu16 [T K, 2I] bf16 ([G | U] before the
    # activation, rounded once, one row per routed pair in the routing's slot order; the backward
    # recomputes the activation A from it) and, with LoRA, hgu = s [X Ag^T | X Au^T] [R, 2r] and
    # hd = s A Ad^T [R, r] (bf16, as the forward's B products used them; R: the per-expert segments'
    # rows)
    block: torch.Tensor
    kept: _Layout
    rank: int = 0            # LoRA rank and scaling the forward ran with (rank 0: no LoRA)
    scaling: float = 0.0
    x_version: int = 0       # tensor versions at forward time (in-place changes invalidate)
    w_version: int = 0
    experts_config: tuple = ()  # experts_config() of the forward (its backward needs the same shapes)
    lora_state: tuple | None = None  # (address, version) of each adapter tensor at forward time, when the
    # caller keeps them (MoESFTOp); None: not checked

    def __setstate__(self, state: dict) -> None:  # a copy (deepcopy, pickle) owns new tensors: new baselines
        self.__dict__.update(state)
        self.x_version, self.w_version = self.x._version, self.topk_weights._version
        self.lora_state = None  # (the copy's adapters are other tensors, at addresses unknown here)

    def kept_rows(self) -> dict[str, _Rows]:
        """The kept buffers by name ([hgu, hd,] gu16) at the block's current address."""
        return _rows_at(self.block.data_ptr(), self.routing.rows, self.kept, self.routing.pairs)

    def kept_spans(self) -> list[Span]:
        """The kept buffers as launch-plan operands (see :func:`_spans_at`)."""
        return _spans_at(self.block.data_ptr(), self.routing.rows, self.kept, self.routing.pairs)


class _Col(NamedTuple):
    """One column of a group-descriptor table: ``base + row_pitch * (the expert's first row) +
    expert_pitch * (the expert's id) + per_count * (its row count)`` for each active expert."""

    base: int
    row_pitch: int = 0
    expert_pitch: int = 0
    per_count: int = 0


COUNT = _Col(0, 0, 0, 1)  # the column of the expert's row count


def _rows(buf: torch.Tensor | _Rows, col: int = 0) -> _Col:
    """Each active expert's first row in a per-expert row buffer (plus a column offset)."""
    if isinstance(buf, _Rows):
        return _Col(buf.addr + col * buf.itemsize, buf.pitch)
    return _Col(buf.data_ptr() + col * buf.element_size(), buf.stride(0) * buf.element_size())


def _per_expert(t: torch.Tensor | None) -> _Col:
    """Each active expert's slice of an [E, ...] tensor (0 for None)."""
    return _Col(0) if t is None else _Col(t.data_ptr(), 0, t.stride(0) * t.element_size())


def _table(r: Routing, cols: list[_Col]) -> np.ndarray:
    """Group descriptors int64 [active experts, len(cols)]: one small integer matrix product of the
    routing's per-expert (1, first row, id, count) with the columns' coefficients."""
    return group_rows(r.basis, [cols])


def _groups(basis: np.ndarray, *parts: tuple[_Col, ...]) -> np.ndarray:
    """Group descriptors (x, w, y, m[, s]) of the LoRA kernels: for each (x, w, y[, s]) part a group
    per row of ``basis`` (a routing's, see :class:`Routing`), the parts one after the other."""
    return group_rows(basis, [[*part[:3], COUNT, *part[3:]] for part in parts])


LoraOperands = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]  # rows, adapter 0, adapter 1


def _gemm_groups(r: Routing, x: _Col, experts: MoEExperts, name: str, y: _Col,
                 lora: LoraOperands | None = None, xscales: _Col | None = None,
                 x_lanes: _Col | None = None) -> np.ndarray:
    """GEMM group descriptors (x, w, y, m, scales, zeros[, x row scales][, x in the tokens-in-lanes
    layout][, lora rows, adapter 0, adapter 1]) for the expert matrix ``name``."""
    cols = [x, _per_expert(experts.tensors[name]), y, COUNT, _per_expert(experts.scales(name)),
            _per_expert(experts.zeros(name))]
    if xscales is not None:
        cols.append(xscales)
    if x_lanes is not None:
        cols.append(x_lanes)
    if lora is not None:
        rows, a0, a1 = lora
        cols += [_rows(rows), _per_expert(a0), _per_expert(a1 if a1 is not None else a0)]
    return _table(r, cols)


class _Rows(NamedTuple):
    """Per-expert scratch rows of one pass inside an :class:`_Arena`: no tensor object, only what
    the kernels take (address, row pitch in bytes) and the row's shape."""

    addr: int
    pitch: int
    cols: int
    itemsize: int


def _row_pitch(cols: int, itemsize: int) -> int:
    """Row pitch of a per-expert row buffer: an odd multiple of 64 bytes (64 bytes of padding when
    it would be even): the streamed transposed GEMM keeps up to 24 rows of dY and dX in L1, and
    rows whose pitch is an even multiple (a multiple of 4 KB at worst) fall into few L1 sets
    (measured: streaming 13-24 rows went from 0.3-0.8x to 1.1-1.6x the panel path's speed)."""
    b = -(-cols * itemsize // 64) * 64
    return b + 64 if b % 128 == 0 else b


Buffers = tuple[tuple[str, tuple[int, int, bool]], ...]  # (name, (columns, item size, padded pitch))


class _Layout:
    """The row buffers of an arena or a saved block: ``items`` = (name, (columns, item size, padded
    pitch (see :func:`_row_pitch`) or exact)) per buffer, one row per row of the per-expert
    segments (each expert's first at a multiple of 16), and ``per_pair`` the same for buffers with
    one row per routed pair in slot order (the activation kernels' rows: no padding). Memo keys hash
    it by identity (the nested tuples took microseconds to hash at decode sizes);
    :func:`_forward_buffers` and :func:`_backward_buffers` memoise one per configuration."""

    def __init__(self, items: Buffers, per_pair: Buffers = ()) -> None:
        self.items, self.per_pair = items, per_pair


ARENA_KEEP_MAX = 64 << 20  # bytes of scratch a thread keeps for its next pass (larger passes allocate theirs)
_kept_scratch = threading.local()


class _Arena:
    """A pass's scratch row buffers in one 64-byte aligned block, each buffer 64-byte aligned.

    At decode sizes the host side of a pass costs as much as its kernels, and each torch
    allocation (and view) costs ~20 us there: the previous layer's weights have just streamed
    through the caches. So the block is NumPy memory, and a thread reuses one block (up to
    ``ARENA_KEEP_MAX``) from pass to pass, with the buffers' places memoised: nothing a pass
    returns or saves lives in it, and a thread runs one pass at a time."""

    def __init__(self, rows: int, layout: _Layout) -> None:
        total = _arena_layout(rows, layout)[0] + 64
        mem = getattr(_kept_scratch, "mem", None)
        if mem is None or mem.size < total:
            mem = np.empty(total, dtype=np.uint8)
            if total <= ARENA_KEEP_MAX:
                _kept_scratch.mem = mem
        self._mem = mem  # (alive while the pass runs, also when not kept)
        base = -(-array_address(mem) // 64) * 64
        self.span = Span(base, total - 64)
        self.rows = dict(_arena_rows(base, rows, layout))


@functools.lru_cache(maxsize=64)
def _arena_layout(rows: int, layout: _Layout, pairs: int = 0,
                  ) -> tuple[int, dict[str, tuple[int, int, int, int, int]]]:
    """(bytes, name -> (offset, pitch, columns, item size, row count)) of the buffers of an arena or
    saved block of ``rows`` segment rows and ``pairs`` routed pairs."""
    places, total = {}, 0
    for items, n in ((layout.items, rows), (layout.per_pair, pairs)):
        for name, (cols, size, pad) in items:
            pitch = _row_pitch(cols, size) if pad else cols * size
            places[name] = (total, pitch, cols, size, n)
            total += -(-pitch * n // 64) * 64
    return total, places


def _rows_at(base: int, rows: int, layout: _Layout, pairs: int = 0) -> dict[str, _Rows]:
    """The buffers of an arena or saved block at ``base``."""
    return {name: _Rows(base + off, pitch, cols, size)
            for name, (off, pitch, cols, size, _) in _arena_layout(rows, layout, pairs)[1].items()}


# (an arena's base rarely changes: a thread reuses its scratch; a saved block's changes every time)
_arena_rows = functools.lru_cache(maxsize=64)(_rows_at)  # callers copy the dict before changing it


def _spans_at(base: int, rows: int, layout: _Layout, pairs: int = 0) -> list[Span]:
    """Launch-plan operands of the buffers of a block at ``base`` (see :func:`_rows_at`): one each,
    so that a plan does not depend on where they lie relative to each other (their block's layout
    varies with the row count)."""
    return [Span(base + off, pitch * n) for off, pitch, _, _, n in _arena_layout(rows, layout, pairs)[1].values()]


def _addr(buf: torch.Tensor | _Rows) -> int:
    return buf.addr if isinstance(buf, _Rows) else buf.data_ptr()


def _pitch(buf: torch.Tensor | _Rows) -> int:
    return buf.pitch if isinstance(buf, _Rows) else buf.stride(0) * buf.element_size()


def _ncols(buf: torch.Tensor | _Rows) -> int:
    return buf.cols if isinstance(buf, _Rows) else buf.shape[1]


def _gather(src: torch.Tensor, r: Routing, dst: _Rows,
            a_products: tuple[torch.Tensor | _Rows, torch.Tensor, torch.Tensor, float] | None = None) -> None:
    """``dst`` (bf16 per-expert rows, ``C`` columns) gets ``src[t]`` (fp32 or bf16, contiguous
    [T, C]) at the row of every routed pair (t, k); padding rows are left unset (never read back).

    ``a_products = (h, a0, a1, alpha)``: the same launch writes ``h[row] = alpha [dst[row] a0_e^T |
    dst[row] a1_e^T]`` (bf16, A [E, r, C] bf16) for every row it writes."""
    src_dtype = "bf16" if src.dtype == torch.bfloat16 else "f32"
    rows = (dst.addr, src.data_ptr(), r.slot_row_addr, r.slot_token_addr, r.pairs)
    if a_products is None:
        rows_kernel("gather", dst.cols, src_dtype).gather(*rows, ldd=dst.pitch)
        return
    h, a0, a1, alpha = a_products
    rows_kernel("gather", dst.cols, src_dtype, lora_rank=a0.shape[1]).gather(
        *rows, ldd=dst.pitch, alpha=alpha, eid=r.slot_expert_addr, a0=a0.data_ptr(), a1=a1.data_ptr(),
        astride=a0.stride(0) * a0.element_size(), h=_addr(h), ldh=_pitch(h))


GATHER_A_ROWS_MAX = 2  # rows per active expert (mean) up to which the gather computes the A-products


def _combine(y: torch.Tensor | _Rows, r: Routing, weights: torch.Tensor | None, out: torch.Tensor) -> None:
    """``out[t] = sum_k w[t, k] y[row(t, k)]`` (w = 1 when None; out [T, C] fp32 or bf16, contiguous)
    from the fp32 per-expert rows ``y``."""
    t, k = r.tokens, r.k
    cols = _ncols(y)
    kern = rows_kernel("combine", cols, "f32", "bf16" if out.dtype == torch.bfloat16 else "f32", weights is not None)
    kern.combine(out.data_ptr(), _addr(y), r.row_of_addr, weights.data_ptr() if weights is not None else 0, t, k,
                 ldy=_pitch(y))


def _quantize(x: torch.Tensor | _Rows, r: Routing, q: _Rows, scales: _Rows,
              col_scales: torch.Tensor | None = None) -> None:
    """The routed rows of ``x`` (bf16) as int16 rows ``q`` (x's pitch) with fp32 row scales (see
    kernels/rowquant.py); ``col_scales`` [E, C] fp32: each row first multiplied by its expert's."""
    if col_scales is not None:
        col_scales = (col_scales.data_ptr(), col_scales.stride(0) * 4, r.slot_expert_addr)
    quantize_rows_into(_addr(x), _pitch(x), _ncols(x), q.addr, scales.addr, r.pairs, r.slot_row_addr,
                       col_scales)


def _dims(experts: MoEExperts, name: str) -> tuple[int, int]:
    packed = experts.tensors[name]
    return packed.shape[1] * 16, packed.shape[2] * 2


# Quantized experts on AMX CPUs: a pass whose routed rows per active expert (mean) reach this takes
# the AMX kernels (codes decoded to bf16 tiles, kernels/gemm.py), sparser ones keep the AVX-512
# integer kernels (which fuse LoRA). Set on Zen 4 without AMX, from the AMX kernels with their tile
# instructions removed (the decode, a lower bound of their cost) against the AVX-512 kernels, cold
# experts, GB/s of codes: at 4 rows AVX-512 is faster (int8 32 against 25); at 8 the decode alone
# is as fast or faster (int8 forward 25.5 against 22.9, int4 23 against 12, int4 K-group forward
# 21.8 against 11.7 and transposed 9.9 against 6.9-10.1). Not timed on an AMX CPU yet
# (docs/benchmarks.md, "Twenty-fourth session" and "Twenty-fifth session").
AMX_QUANT_MIN_ROWS = 8
# bf16 experts on AMX CPUs: a pass below this many routed rows per active expert (mean) takes the
# AVX-512 kernels. At a few rows both stream the weights at the memory's rate (AVX-512: one
# vdpbf16ps per 64 weight bytes and row), and the AVX-512 kernels fuse the LoRA products where the
# AMX path adds them in separate passes and first packs dY into tiles for its transposed GEMMs.
# KTransformers' bf16 MoE switches similarly (AVX-512 vec_mul until T*K/E, the mean over all
# experts rather than the active ones, passes 4). Not timed on an AMX CPU yet.
AMX_BF16_MIN_ROWS = 4


def pass_isa(experts: MoEExperts, r: Routing) -> str | None:
    """The ISA of a pass's GEMMs when it is not the default (:func:`gemm.kernel_for`: the active ISA
    for bf16 experts, AVX-512 for quantized ones), on AMX CPUs only: AVX-512 for bf16 experts below
    ``AMX_BF16_MIN_ROWS`` routed rows per active expert, AMX for quantized ones at
    ``AMX_QUANT_MIN_ROWS`` or more."""
    isa = active_isa()
    if isa == "avx512" or not r.pairs:
        return None
    active = r.basis.shape[0]
    if experts.storage == "bf16":
        return "avx512" if r.pairs < AMX_BF16_MIN_ROWS * active else None
    return isa if r.pairs >= AMX_QUANT_MIN_ROWS * active else None


def _kernel(op: str, experts: MoEExperts, name: str, lora_rank: int = 0, lora_split: int = 0,
            isa: str | None = None) -> gemm.GemmKernel:
    """The GEMM kernel of ``op`` for the expert matrix ``name`` on ``isa`` (from :func:`pass_isa`;
    the transposed ones take the dY of their tokens-in-lanes form's groups, see :func:`_grouped_bwd`)."""
    n, k = _dims(experts, name)
    return gemm.kernel_for(op, n, k, isa=isa, quant=experts.storage, group_size=experts.group_size,
                           zero_point=experts.zero_point, lora_rank=lora_rank, lora_split=lora_split,
                           lanes_dy=op == "bwd")


def _fuses_lora(experts: MoEExperts, isa: str | None = None) -> bool:
    """Whether the forward GEMMs add the LoRA B products themselves (the AVX-512 kernels can),
    instead of separate accumulate passes over the fp32 outputs (the AMX kernels)."""
    return _kernel("fwd", experts, "gate_up", isa=isa).spec.isa == "avx512"


def _grouped_fwd(x: torch.Tensor | _Rows, experts: MoEExperts, name: str, y: torch.Tensor | _Rows, r: Routing,
                 lora: LoraOperands | None = None, xq: tuple[_Rows, _Rows] | None = None,
                 isa: str | None = None) -> None:
    """y[rows of e] = x[rows of e] @ W_e^T for every active expert (one launch, on ``isa`` from
    :func:`pass_isa`); the integer kernels take x as int16 rows with per-row scales, quantized here
    into ``xq`` (see kernels/rowquant.py).

    ``lora = (h, b0, b1)`` fuses ``y += h[:, :r] b0_e^T`` (outputs below the split; with ``b1``,
    ``y += h[:, r:] b1_e^T`` above it): h [rows, r or 2r] bf16, b [E, out, r] bf16."""
    if lora is None:
        kern = _kernel("fwd", experts, name, isa=isa)
    else:
        h, b0, b1 = lora
        kern = _kernel("fwd", experts, name, b0.shape[2], b0.shape[1] if b1 is not None else 0)
    xscales = None
    if kern.spec.int_x:
        q, qs = xq
        _quantize(x, r, q, qs)
        x, xscales = q, _rows(qs)
    groups = _gemm_groups(r, _rows(x), experts, name, _rows(y), lora, xscales)
    if lora is None:
        kern.launch(groups, _pitch(x), _pitch(y))
        return
    kern.launch(groups, _pitch(x), _pitch(y), ldh=_pitch(h))


def _grouped_bwd(dy: _Rows, experts: MoEExperts, name: str, dx: _Rows, r: Routing,
                 lora: LoraOperands | None = None, dyq: tuple[_Rows, _Rows] | None = None,
                 dyt: _Rows | None = None, isa: str | None = None) -> None:
    """dx[rows of e] = dy[rows of e] @ W_e for every active expert (one launch, on ``isa`` from
    :func:`pass_isa`); the integer kernels
    take dY diag(s_e) as int16 rows, quantized here into ``dyq``; the AMX kernels take dY as B
    tiles, packed here into ``dyt`` (8 n bytes per row: two 16 x 16 pair tiles per 16 rows and 16 n);
    bf16 AVX-512 kernels take the groups of their tokens-in-lanes form also in that layout, packed
    here into ``dyt`` (2 n bytes per row).

    ``lora = (t, a0, a1)`` (AVX-512 kernels) fuses ``dx += t[:, :r] a0_e (+ t[:, r:] a1_e)``:
    t [rows, r or 2r] bf16, a [E, r, K] bf16."""
    n, k = _dims(experts, name)
    if lora is not None:
        t, a0, a1 = lora
        kern = _kernel("bwd", experts, name, a0.shape[1], n // 2 if a1 is not None else 0)
    else:
        kern = _kernel("bwd", experts, name, isa=isa)
    xscales = None
    if kern.spec.int_x:  # integer kernel: dY diag(s_e) as int16 rows (per-channel scales s_e)
        q, qs = dyq
        _quantize(dy, r, q, qs, experts.scales(name))
        dy, xscales = q, _rows(qs)
    x, x_lanes = _rows(dy), None
    if kern.spec.isa != "avx512":  # AMX reads dY pre-arranged in tiles; segments are whole tiles
        if kern.spec.scaled_dy:  # (per-channel quantized: dY diag(s_e) in the tiles)
            dytiles_kernel(n, scaled=True).launch(
                _table(r, [x, _rows(dyt), COUNT, _per_expert(experts.scales(name))]), _pitch(dy))
        else:
            dytiles_kernel(n).launch(_table(r, [x, _rows(dyt), COUNT]), _pitch(dy))
        x = _rows(dyt)  # (each expert's first row is a multiple of 16: its tiles start at first * 8n)
    elif kern.spec.schedule.tl:  # (each expert's dY in lanes takes its rows' 2n bytes each)
        assert dyt is not None, "the backward's buffers lack the tokens-in-lanes dY (see _backward_buffers)"
        x_lanes = _rows(dyt)
        if r.pairs >= kern.spec.schedule.tl:  # (fewer routed rows than that: no group can take the form)
            dytiles_kernel(n, "lanes", kern.spec.schedule.tl).launch(_table(r, [x, x_lanes, COUNT]), _pitch(dy))
    groups = _gemm_groups(r, x, experts, name, _rows(dx), lora, xscales, x_lanes)
    if lora is not None:
        kern.launch(groups, _pitch(dy), _pitch(dx), ldh=_pitch(lora[0]))
        return
    kern.launch(groups, _pitch(dy), _pitch(dx))


# The LoRA weight gradients as bf16 products over token pairs (kernels/lora.py, ``token_pairs``):
# MoE backward on Zen 4, qwen3, in one process against the fp32 form: the four gradient launches
# qlen 512 7.8 -> 5.9 ms, qlen 128 3.0 -> 2.4 ms; gradient errors against the float32 reference
# (tests' layer) 0.27-0.33% -> 0.31-0.38% (the bf16 rounding of P or of the row-weighted Q). (Part of
# the launch plans' key: a plan records its kernels.)
XTY_TOKEN_PAIRS = True


def _lora(form: str, n: int, k: int, groups: np.ndarray, ldx: int, ldy: int, alpha: float = 1.0,
          x_dtype: str = "bf16", accumulate: bool = False, w_dtype: str = "bf16", ldw: int = 0,
          y_dtype: str = "f32", ldz: int = 0) -> None:
    """A LoRA kernel launch; a 5th group field is xty's row weights or xb's bf16 copy (pitch ``ldz``)."""
    fifth = groups.shape[1] == 5
    kern = lk.kernel_for(form, n, k, x_dtype, w_dtype, accumulate, y_dtype, fifth and form == "xty",
                         fifth and form == "xb", form == "xty" and XTY_TOKEN_PAIRS)
    kern.launch(groups, ldx, ldw, ldy, alpha, ldz=ldz)


FOLD_ZEROS_MAX = 16  # idle experts to zero: up to this many ride along in the xty launches


class _LoraGrads(NamedTuple):
    """The LoRA gradients a backward writes: the six tensors (bf16, kernel rank), the pool they came
    from, and the basis of the gradient launches (the routing's, plus a zero-row group per folded
    idle expert)."""

    grads: tuple[torch.Tensor, ...]
    pool: LoraGradBuffers
    basis: np.ndarray


@functools.lru_cache(maxsize=16)
def _grad_shapes(e: int, h: int, i: int, rank: int) -> tuple[tuple[int, int, int], ...]:
    """The six LoRA gradients' shapes (those of the adapters, in LORA_NAMES order)."""
    return tuple(lora_shapes(e, h, i, rank).values())


def _acquire_grads(r: Routing, experts: MoEExperts, rank: int, grad_buffers: LoraGradBuffers | None) -> _LoraGrads:
    """Gradient buffers (kernel ``rank``) for a backward; idle experts to zero are zeroed now (more
    than ``FOLD_ZEROS_MAX``) or folded into the gradient launches as zero-row groups."""
    pool = grad_buffers if grad_buffers is not None else LoraGradBuffers()
    folded = np.empty((r.basis.shape[0] + max(FOLD_ZEROS_MAX, 0), 4), dtype=np.int64)
    shapes = _grad_shapes(experts.num_experts, experts.hidden_size, experts.intermediate_size, rank)
    grads, to_zero, n_zero = pool.acquire(shapes, r.basis, FOLD_ZEROS_MAX, folded)
    basis = r.basis
    if n_zero > FOLD_ZEROS_MAX:  # one launch over every gradient (a Tensor.zero_ per run of idle
        # experts and gradient took 0.90 ms at qlen 1, zero-row xty launches 2.2 ms; the gradients'
        # slices are multiples of 64 bytes: their dims are multiples of 16 and 32)
        fill.zero_slices(to_zero, grads)
    elif n_zero:  # the xty launches zero those experts' slices: zero-row groups
        basis = folded[:r.basis.shape[0] + n_zero]
    return _LoraGrads(grads, pool, basis)


def _lora_grads(kept: dict[str, _Rows], gp: _LoraGrads, dos: _Rows, t_d: _Rows, w_row: _Rows, dgu: _Rows, t_gu: _Rows,
                xs: _Rows, act: _Rows) -> None:
    """The six LoRA gradients' launches (into ``gp.grads``) from the forward's ``kept`` rows and the
    backward's per-row operands: dos and xs (gathered dOut and X), t_d = s dOut Bd and t_gu = s
    [dG Bg | dU Bu] (fp32), w_row (each row's routing weight), dgu = [dG | dU] (bf16), act (the
    recomputed activation, bf16); the folded idle experts' slices become zero."""
    hdim, idim, rank = dos.cols, act.cols, gp.grads[0].shape[1]
    hgu, hd = kept["hgu"], kept["hd"]
    g_ga, g_gb, g_ua, g_ub, g_da, g_db = gp.grads
    basis = gp.basis
    # the down adapters' gradients weight each row by its routing weight w (dY = w dOut; hd and t_d
    # carry the scaling): dBd = dOut^T diag(w) hd, dAd = t_d^T diag(w) A
    w = _rows(w_row)
    _lora("xty", rank, hdim, _groups(basis, (_rows(dos), _rows(hd), _per_expert(g_db), w)), _pitch(dos),
          0, 1.0, ldw=_pitch(hd), y_dtype="bf16")
    _lora("xty", idim, rank, _groups(basis, (_rows(t_d), _rows(act), _per_expert(g_da), w)), _pitch(t_d),
          0, 1.0, x_dtype="f32", ldw=_pitch(act), y_dtype="bf16")
    parts = (_rows(dgu), _rows(hgu), _per_expert(g_gb)), (_rows(dgu, idim), _rows(hgu, rank), _per_expert(g_ub))
    _lora("xty", rank, idim, _groups(basis, *parts), _pitch(dgu), 0, 1.0, ldw=_pitch(hgu),
          w_dtype="bf16", y_dtype="bf16")
    parts = (_rows(t_gu), _rows(xs), _per_expert(g_ga)), (_rows(t_gu, rank), _rows(xs), _per_expert(g_ua))
    _lora("xty", hdim, rank, _groups(basis, *parts), _pitch(t_gu), 0, 1.0, x_dtype="f32",
          ldw=_pitch(xs), y_dtype="bf16")


def kernel_rank(rank: int) -> int:
    """The rank the LoRA kernels run at: 16 or a multiple of 32 (others are zero-padded up)."""
    return 16 if rank <= 16 else -(-rank // 32) * 32


def pad_lora(lora: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """LoRA tensors as the kernels read them: unchanged (zero-copy) when the rank is supported,
    else zero-padded copies (A gains zero rows, B zero columns; the product is unchanged)."""
    rank = lora[0].shape[1]
    rk = kernel_rank(rank)
    if rk == rank:
        return lora
    out = []
    for i, p in enumerate(lora):
        if i % 2 == 0:  # A [E, r, in]
            q = torch.zeros(p.shape[0], rk, p.shape[2], dtype=p.dtype)
            q[:, :rank] = p
        else:           # B [E, out, r]
            q = torch.zeros(p.shape[0], p.shape[1], rk, dtype=p.dtype)
            q[:, :, :rank] = p
        out.append(q)
    return tuple(out)


def unpad_grads(grads: tuple[torch.Tensor, ...], rank: int) -> tuple[torch.Tensor, ...]:
    if grads[0].shape[1] == rank:
        return grads
    return tuple(g[:, :rank] if i % 2 == 0 else g[:, :, :rank] for i, g in enumerate(grads))


def _forward_launches(x: torch.Tensor, topk_weights: torch.Tensor, experts: MoEExperts,
                      lora: tuple[torch.Tensor, ...] | None, scaling: float, r: Routing, b: dict,
                      xq: tuple[_Rows, _Rows] | None, aq: tuple[_Rows, _Rows] | None, rank: int,
                      out: torch.Tensor, isa: str | None) -> None:
    """The forward's launches into the buffers ``b`` and ``out`` (GEMMs on ``isa``, see :func:`pass_isa`)."""
    hdim, idim = x.shape[1], experts.intermediate_size
    xs, gu, act, y = b["xs"], b["gu"], b["act"], b["y"]
    if lora is None:
        _gather(x, r, xs)
        _grouped_fwd(xs, experts, "gate_up", gu, r, xq=xq, isa=isa)
    else:
        # H = s X A^T first (rounded to bf16 once: the B products and the backward use the same H)
        ga, gb, ua, ub, da, db = lora  # (padded to the kernel rank by the caller, which keeps them alive)
        fused = _fuses_lora(experts, isa)
        hgu, hd = b["hgu"], b["hd"]
        if r.pairs <= GATHER_A_ROWS_MAX * r.basis.shape[0]:  # each row rereads its expert's A
            _gather(x, r, xs, (hgu, ga, ua, scaling))
        else:  # one pass over each expert's A for all its rows
            _gather(x, r, xs)
            _lora("xat", rank, hdim, _groups(r.basis, (_rows(xs), _per_expert(ga), _rows(hgu)),
                                             (_rows(xs), _per_expert(ua), _rows(hgu, rank))),
                  _pitch(xs), _pitch(hgu), scaling, y_dtype="bf16")
        if fused:
            _grouped_fwd(xs, experts, "gate_up", gu, r, (hgu, gb, ub), xq=xq)
        else:
            _grouped_fwd(xs, experts, "gate_up", gu, r, xq=xq, isa=isa)
            _lora("xat", idim, rank, _groups(r.basis, (_rows(hgu), _per_expert(gb), _rows(gu)),
                                             (_rows(hgu, rank), _per_expert(ub), _rows(gu, idim))),
                  _pitch(hgu), _pitch(gu), accumulate=True)
    # only the routed rows (segments are padded to 16 rows: at qlen 16 most rows are padding); with
    # LoRA the same launch computes H = s A Ad^T of each row it writes
    keep = "gu16" in b  # (saved: [G | U] in bf16 for the backward, from the same launch)
    rows = dict(idx=r.slot_row_addr, gu=_addr(gu), act=_addr(act), gu16=b["gu16"].addr if keep else 0)
    if lora is None:
        act_kernel("fwd", idim, keep_gu=keep).launch(r.pairs, **rows)
        _grouped_fwd(act, experts, "down", y, r, xq=aq, isa=isa)
    else:
        act_kernel("fwd", idim, rank, keep_gu=keep).launch(
            r.pairs, **rows, eid=r.slot_expert_addr, a=da.data_ptr(),
            astride=da.stride(0) * da.element_size(), h=_addr(hd), ldh=_pitch(hd), alpha=scaling)
        if fused:
            _grouped_fwd(act, experts, "down", y, r, (hd, db, None), xq=aq)
        else:
            _grouped_fwd(act, experts, "down", y, r, xq=aq, isa=isa)
            _lora("xat", hdim, rank, _groups(r.basis, (_rows(hd), _per_expert(db), _rows(y))), _pitch(hd),
                  _pitch(y), accumulate=True)
    _combine(y, r, topk_weights, out)


# Launch plans of the passes (codegen/plan.py), per configuration: shapes, quantization, flags, token
# count and number of active experts. A plan replays what the pass's Python would launch from the
# addresses of its operands; a configuration that cannot be planned maps to the reason (it runs
# through Python). A configuration is captured at its RECORD_AT_CALL-th call: one that never comes
# back (e.g. a token count seen once) costs no capture (~0.5 ms of compiling and checking).
PLANS_MAX = 1024
RECORD_AT_CALL = 2
_plans: dict[tuple, Plan | str] = {}
_calls: dict[tuple, int] = {}  # calls of configurations not captured yet


def _run_pass(key: tuple, operands: list, bases: tuple[np.ndarray, ...], launches: Callable[[], None]) -> None:
    """Run a pass: from its plan when ``key`` has one, else by calling ``launches`` (which makes the
    plan). ``operands`` are every tensor (contiguous) or :class:`Span` whose memory the launches
    address, in an order fixed by ``key``; ``bases`` the basis arrays their group tables use."""
    # (plans replay deferred launches: with deferral off, as with plans off, the Python runs)
    plan = _plans.get(key) if knobs.launch_plans() and knobs.defer_launches() else "off"
    if isinstance(plan, Plan):
        plan.run([o.data_ptr() if isinstance(o, torch.Tensor) else o.addr for o in operands], bases)
        return
    capture = None
    if plan is None:
        calls = _calls.pop(key, 0) + 1
        if calls >= RECORD_AT_CALL:
            capture = Capture()
        else:
            _evict(_calls, PLANS_MAX)
            _calls[key] = calls
    with LaunchBatch(capture):  # every launch is prepared first, then they run back to back
        launches()
    if capture is not None:
        spans = [Span(o.data_ptr(), o.numel() * o.element_size()) if isinstance(o, torch.Tensor) else o
                 for o in operands]
        if not all(o.is_contiguous() for o in operands if isinstance(o, torch.Tensor)):
            plan = "a non-contiguous operand"
        else:
            try:
                plan = capture.compile(spans, bases)
            except Exception as e:  # (the pass itself ran: keep its results, run this configuration in Python)
                warnings.warn(f"kt_jit: could not make a launch plan ({e!r}); this configuration keeps running "
                              "through Python", RuntimeWarning, stacklevel=3)
                plan = f"compiling failed: {e!r}"
        _evict(_plans, PLANS_MAX)
        _plans[key] = plan


def _evict(memo: dict, limit: int) -> None:
    """Drop the oldest entries of ``memo`` until there is room for one more."""
    while len(memo) >= limit:
        try:
            memo.pop(next(iter(memo)), None)
        except (StopIteration, RuntimeError):  # (another thread changed the dict meanwhile)
            break


def experts_config(experts: MoEExperts) -> tuple:
    """What a saved forward's rows and routing depend on in the experts (count, sizes, storage)."""
    return (experts.num_experts, experts.hidden_size, experts.intermediate_size, experts.storage,
            experts.group_size, experts.zero_point)


def _config(experts: MoEExperts, lora: tuple[torch.Tensor, ...] | None, scaling: float) -> tuple:
    """What fixes a pass's kernels and tables besides its token count, routing and flags (a bad
    KT_JIT_TUNING raises here, before the pass does anything)."""
    return experts_config(experts) + (lora[0].shape[1] if lora is not None else 0, scaling, knobs.raw("KT_JIT_ISA"),
                                      gemm.host_tuning(), XTY_TOKEN_PAIRS)


def _expert_operands(experts: MoEExperts) -> list[torch.Tensor]:
    """The experts' tensors in name order (fixed by the quantization mode, whatever order they were
    loaded in)."""
    return [t for _, t in sorted(experts.tensors.items()) if t is not None]


def _row_bound(r: Routing) -> int:
    """Rows the per-expert buffers of a routing may need: T*K plus each active expert's padding at
    most (a bound fixed by the token count and the active experts, so the scratch layout is too)."""
    return r.pairs + (SEGMENT_ALIGN - 1) * r.basis.shape[0]


@functools.lru_cache(maxsize=256)
def _forward_buffers(config: tuple, rank: int, save: bool, isa: str | None) -> tuple[_Layout, _Layout]:
    """The forward's scratch rows (one arena) and the rows it keeps for the backward (one saved
    block when saved, else scratch too), for a :func:`_config` configuration and a pass's GEMMs on
    ``isa`` (:func:`pass_isa`)."""
    _, hdim, idim, storage, group_size, zero_point, *_ = config
    # what backward reads: [G | U] in bf16 and the LoRA H rows (s [X Ag^T | X Au^T] and s A Ad^T, bf16
    # as the B products use them), contiguous; the GEMMs' fp32 [G | U] and the activation are scratch
    kept = {"hgu": (2 * rank, 2, False), "hd": (rank, 2, False)} if rank else {}
    per_pair = {"gu16": (2 * idim, 2, False)} if save else {}
    scratch = {"xs": (hdim, 2, True), "y": (hdim, 4, True), "gu": (2 * idim, 4, False), "act": (idim, 2, False)}
    gate_up = gemm.kernel_for("fwd", 2 * idim, hdim, isa=isa, quant=storage, group_size=group_size,
                              zero_point=zero_point)
    if gate_up.spec.int_x:  # integer kernels take int16 rows with the pitch of what they quantize, and scales
        scratch |= {"xq": (hdim, 2, True), "xqs": (1, 4, False), "aq": (idim, 2, False), "aqs": (1, 4, False)}
    if not save:
        scratch |= kept
    return _Layout(tuple(scratch.items())), _Layout(tuple(kept.items()), tuple(per_pair.items()))


@functools.lru_cache(maxsize=256)
def _backward_buffers(config: tuple, rank: int, need_dx: bool, need_lora_grads: bool, isa: str | None) -> _Layout:
    """The backward's scratch rows (one arena) for a :func:`_config` configuration and a pass's
    GEMMs on ``isa`` (:func:`pass_isa`)."""
    _, hdim, idim, storage, group_size, zero_point, *_ = config
    scratch = {"dos": (hdim, 2, True), "d": (idim, 4, True), "dgu": (2 * idim, 2, True)}
    if need_dx:
        scratch["dxs"] = (hdim, 4, True)
    if rank:  # T = s dOut Bd, s [dG Bg | dU Bu] (fp32) and the bf16 copies the GEMMs add
        scratch |= {"t_d": (rank, 4, False), "t_gu": (2 * rank, 4, False), "t_d16": (rank, 2, False),
                    "t_gu16": (2 * rank, 2, False)}
        if need_lora_grads:  # (the activation, recomputed, for the down adapter's A gradient)
            scratch |= {"xs": (hdim, 2, True), "w_row": (1, 4, False), "act": (idim, 2, False)}
    down = gemm.kernel_for("bwd", hdim, idim, isa=isa, quant=storage, group_size=group_size, zero_point=zero_point,
                           lanes_dy=True)
    if down.spec.int_x:  # integer kernels take int16 dY rows and scales
        scratch |= {"dosq": (hdim, 2, True), "dosqs": (1, 4, False), "dguq": (2 * idim, 2, True),
                    "dguqs": (1, 4, False)}
    if down.spec.isa != "avx512":  # AMX kernels take dY as B tiles: 8 bytes per row and column
        scratch["dost"] = (4 * hdim, 2, False)
        if need_dx:
            scratch["dgut"] = (8 * idim, 2, False)
    elif down.spec.schedule.tl:  # the tokens-in-lanes form's dY: 2 bytes per row and column
        scratch["dost"] = (hdim, 2, False)
        if need_dx:
            scratch["dgut"] = (2 * idim, 2, False)
    return _Layout(tuple(scratch.items()))


def forward(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, experts: MoEExperts,
            lora: tuple[torch.Tensor, ...] | None, scaling: float, save: bool,
            out_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, Saved | None]:
    """MoE forward. x [T, H] bf16, topk_ids [T, K] int64, topk_weights [T, K] fp32 (validated).

    Returns out [T, H] (``out_dtype``) and, with ``save``, what :func:`backward` needs.
    """
    keep_freed_memory()
    r = route(topk_ids, experts.num_experts)
    user_rank = lora[0].shape[1] if lora is not None else 0
    rank = kernel_rank(user_rank) if lora is not None else 0
    config = _config(experts, lora, scaling)
    isa = pass_isa(experts, r)
    scratch, kept = _forward_buffers(config, rank, save, isa)
    arena = _Arena(_row_bound(r), scratch)
    b = arena.rows
    block, kept_spans = None, []
    if save:
        block = aligned_empty((_arena_layout(r.rows, kept, r.pairs)[0],), torch.uint8)
        b |= _rows_at(block.data_ptr(), r.rows, kept, r.pairs)
        kept_spans = _spans_at(block.data_ptr(), r.rows, kept, r.pairs)
    xq, aq = ((b["xq"], b["xqs"]), (b["aq"], b["aqs"])) if "xq" in b else (None, None)
    padded = pad_lora(lora) if lora is not None else ()  # (alive until the launches ran)
    out = torch.empty(x.shape, dtype=out_dtype)
    key = ("fwd", save, out_dtype, x.shape[0], topk_ids.shape[1], r.basis.shape[0], isa, *config)
    operands = [x, topk_weights, out, arena.span, *r.spans, *padded, *kept_spans, *_expert_operands(experts)]
    _run_pass(key, operands, (r.basis,), lambda: _forward_launches(
        x, topk_weights, experts, padded or None, scaling, r, b, xq, aq, rank, out, isa))
    saved = None
    if save:
        saved = Saved(x, topk_weights, r, block, kept, user_rank, scaling, x._version, topk_weights._version,
                      experts_config(experts))
    return out, saved


def backward(saved: Saved, grad_out: torch.Tensor, experts: MoEExperts, lora: tuple[torch.Tensor, ...] | None,
             scaling: float, grad_buffers: LoraGradBuffers | None = None, need_dx: bool = True,
             need_lora_grads: bool = True, dx_dtype: torch.dtype = torch.float32,
             ) -> tuple[torch.Tensor | None, torch.Tensor, tuple[torch.Tensor, ...] | None]:
    """Gradients for x ([T, H], ``dx_dtype``: fp32 or bf16, rounded once from the fp32 sums),
    topk_weights (fp32 [T, K]) and the six LoRA tensors (bf16).

    ``grad_buffers`` (the adapters' :class:`LoraGradBuffers`) lets the LoRA gradients reuse the
    buffers of a previous backward that the caller has dropped; without it they are fresh.
    ``need_dx=False`` skips the input gradient (returned as None): the transposed gate/up GEMM,
    two thirds of the backward's weight reads, is not run (autograd asks for no input gradient
    when nothing before the layer trains, e.g. the first MoE layer of a LoRA-only fine-tune).
    ``need_lora_grads=False`` skips the adapters' gradients (returned as None)."""
    r = saved.routing
    if grad_out.dtype not in (torch.float32, torch.bfloat16):
        grad_out = grad_out.float()
    g_out = grad_out if grad_out.is_contiguous() else grad_out.contiguous()
    rank = kernel_rank(lora[0].shape[1]) if lora is not None else 0
    need_lora_grads = need_lora_grads and lora is not None
    config = _config(experts, lora, scaling)
    isa = pass_isa(experts, r)
    arena = _Arena(_row_bound(r), _backward_buffers(config, rank, need_dx, need_lora_grads, isa))
    b = arena.rows
    dw = torch.empty(saved.topk_weights.shape, dtype=torch.float32)
    dx = torch.empty(saved.x.shape, dtype=dx_dtype) if need_dx else None
    padded = pad_lora(lora) if lora is not None else ()
    gp = _acquire_grads(r, experts, rank, grad_buffers) if need_lora_grads else None
    kept = saved.kept_rows()
    key = ("bwd", need_dx, need_lora_grads, dx_dtype, g_out.dtype, g_out.shape[0], r.k,
           r.basis.shape[0], gp.basis.shape[0] if gp is not None else 0, isa, *config)
    operands = [saved.x, saved.topk_weights, *saved.kept_spans(), g_out, dw, *([dx] if need_dx else []),
                arena.span, *r.spans, *padded, *(gp.grads if gp is not None else ()), *_expert_operands(experts)]
    _run_pass(key, operands, (r.basis,) if gp is None else (r.basis, gp.basis),
              lambda: _backward_launches(saved, kept, g_out, experts, padded or None, scaling, r, b, gp, dw, dx, rank,
                                         isa))
    grads = None
    if gp is not None:
        gp.pool.zeroed(gp.grads)
        grads = unpad_grads(gp.grads, lora[0].shape[1])
    return dx, dw, grads


def _backward_launches(saved: Saved, kept: dict[str, _Rows], g_out: torch.Tensor, experts: MoEExperts,
                       lora: tuple[torch.Tensor, ...] | None, scaling: float, r: Routing, b: dict,
                       gp: _LoraGrads | None, dw: torch.Tensor, dx: torch.Tensor | None, rank: int,
                       isa: str | None) -> None:
    """The backward's launches (buffers ``b``, the forward's ``kept`` rows, see :func:`backward`;
    ``gp``: the LoRA gradients to write, or None; GEMMs on ``isa``, see :func:`pass_isa`)."""
    hdim, idim = saved.x.shape[1], experts.intermediate_size
    dos, d, dgu, dxs = b["dos"], b["d"], b["dgu"], b.get("dxs")
    int_dy = "dosq" in b
    dosq, dguq = ((b["dosq"], b["dosqs"]), (b["dguq"], b["dguqs"])) if int_dy else (None, None)
    fused = lora is not None and _fuses_lora(experts, isa)
    _gather(g_out, r, dos)
    if lora is None:
        _grouped_bwd(dos, experts, "down", d, r, dyq=dosq, dyt=b.get("dost"), isa=isa)
    else:
        # T = s dY B first (fp32, for the A gradients); the transposed GEMMs add T A themselves
        # from its bf16 copy on AVX-512, else separate passes add it
        ga, gb, ua, ub, da, db = lora
        t_d, t_gu, t_d16, t_gu16 = b["t_d"], b["t_gu"], b["t_d16"], b["t_gu16"]
        copy = (_rows(t_d16),) if fused else ()  # (the fused GEMM adds T A from T's bf16 copy)
        _lora("xb", rank, hdim, _groups(r.basis, (_rows(dos), _per_expert(db), _rows(t_d), *copy)), _pitch(dos),
              _pitch(t_d), scaling, ldz=t_d16.pitch)
        _grouped_bwd(dos, experts, "down", d, r, (t_d16, da, None) if fused else None, dyq=dosq, dyt=b.get("dost"),
                     isa=isa)
        if not fused:
            _lora("xb", idim, rank, _groups(r.basis, (_rows(t_d), _per_expert(da), _rows(d))), _pitch(t_d),
                  _pitch(d), x_dtype="f32", accumulate=True)
    w_row = b.get("w_row")  # routing weight of each routed row (written by the activation kernel)
    act = b.get("act")  # (the activation, recomputed for the LoRA gradients)
    act_kernel("bwd", idim, write_act=gp is not None).launch(
        r.pairs, idx=r.slot_row_addr, tok=r.slot_token_addr, kk=r.slot_k_addr, k=r.k,
        d=d.addr, act=act.addr if gp is not None else 0, gu16=kept["gu16"].addr, w=saved.topk_weights.data_ptr(),
        dw=dw.data_ptr(), wrow=w_row.addr if w_row is not None else 0, dgu=dgu.addr, ldd=d.pitch,
        lddgu=dgu.pitch)
    if lora is not None and (dx is not None or gp is not None):
        copies = ((_rows(t_gu16),), (_rows(t_gu16, rank),)) if fused and dx is not None else ((), ())
        _lora("xb", rank, idim, _groups(r.basis, (_rows(dgu), _per_expert(gb), _rows(t_gu), *copies[0]),
                                        (_rows(dgu, idim), _per_expert(ub), _rows(t_gu, rank), *copies[1])),
              _pitch(dgu), _pitch(t_gu), scaling, ldz=t_gu16.pitch)
    if gp is not None:
        _gather(saved.x, r, b["xs"])
        _lora_grads(kept, gp, dos, t_d, w_row, dgu, t_gu, b["xs"], act)
    if dx is not None:
        _grouped_bwd(dgu, experts, "gate_up", dxs, r, (t_gu16, ga, ua) if fused else None, dyq=dguq,
                     dyt=b.get("dgut"), isa=isa)
        if lora is not None and not fused:
            for col, a in ((0, ga), (rank, ua)):  # two launches: both add into the same dX rows
                _lora("xb", hdim, rank, _groups(r.basis, (_rows(t_gu, col), _per_expert(a), _rows(dxs))),
                      _pitch(t_gu), _pitch(dxs), x_dtype="f32", accumulate=True)
        _combine(dxs, r, None, dx)

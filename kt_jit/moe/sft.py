"""Forward and backward of the routed-expert MoE layer with per-expert LoRA (the math of DESIGN.md).

Per active expert e with tokens X (scale s = alpha / rank)::

    [G | U] = X [Wg; Wu]^T + s [(X Ag^T) Bg^T | (X Au^T) Bu^T]      one GEMM, N = 2I
    A = silu(G) * U                                                  (bf16, the down input)
    Y = A Wd^T + s (A Ad^T) Bd^T ;  out[t] += w[t,k] Y[t]

Backward, with D = dOut Wd + s (dOut Bd) Ad (per routed row, unweighted)::

    dw[t,k] = <D, A>            (= <dOut[t], Y_k[t]>, so Y is never stored)
    dA = w D ;  dG = dA U silu'(G) ;  dU = dA silu(G)
    dX = [dG | dU] [Wg; Wu] + s (dG Bg) Ag + s (dU Bu) Au          one transposed GEMM, N = 2I

The base weights are read once per pass from the single packed copy (forward: gate_up, down;
backward: down, gate_up, both transposed in-kernel).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels import gemm
from ..runtime.buffers import aligned_empty
from .routing import Routing, route
from .weights import MoEExperts


@dataclass
class Saved:
    """What backward needs from forward (bytes per routed row: 2I fp32 + I bf16 + 3r fp32)."""

    x: torch.Tensor          # [T, H] bf16 input (re-gathered in backward, not stored per row)
    topk_weights: torch.Tensor  # [T, K] fp32
    routing: Routing
    gate: torch.Tensor       # [R, I] fp32 (view of gate_up)
    up: torch.Tensor         # [R, I] fp32 (view of gate_up)
    act: torch.Tensor        # [R, I] bf16
    lora_h: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # X Ag^T, X Au^T, A Ad^T [R, r] fp32

    def nbytes(self) -> int:
        n = self.gate.untyped_storage().nbytes() + self.act.numel() * 2
        if self.lora_h is not None:
            n += sum(h.numel() * 4 for h in self.lora_h)
        return n


def _groups(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, r: Routing) -> torch.Tensor:
    """Group descriptors (x, w, y, m) of the active experts over per-expert row buffers."""
    g = torch.empty(r.num_active, 4, dtype=torch.int64)
    g[:, 0] = x.data_ptr() + r.starts * (x.stride(0) * x.element_size())
    g[:, 1] = w.data_ptr() + r.experts * (w.stride(0) * w.element_size())
    g[:, 2] = y.data_ptr() + r.starts * (y.stride(0) * y.element_size())
    g[:, 3] = r.counts
    return g


def _grouped_fwd(x: torch.Tensor, packed: torch.Tensor, y: torch.Tensor, r: Routing) -> None:
    """y[rows of e] = x[rows of e] @ W_e^T for every active expert (one launch)."""
    n, k = packed.shape[1] * 16, packed.shape[2] * 2
    kern = gemm.kernel_for("fwd", n, k)
    kern.launch(_groups(x, packed, y, r), k * 2, n * 4)


def _grouped_bwd(dy: torch.Tensor, packed: torch.Tensor, dx: torch.Tensor, r: Routing) -> None:
    """dx[rows of e] = dy[rows of e] @ W_e for every active expert (one launch)."""
    n, k = packed.shape[1] * 16, packed.shape[2] * 2
    kern = gemm.kernel_for("bwd", n, k)
    src = dy
    groups = _groups(dy, packed, dx, r)
    if kern.spec.isa != "avx512":  # AMX reads dY pre-arranged in tiles; segments are whole tiles
        src = gemm.pack_dy_for_amx(dy)
        groups[:, 0] = src.data_ptr() + (r.starts // 16) * (n // 16) * 2048
    kern.launch(groups, n * 2, k * 4)


def _segments(r: Routing):
    for e, start, m in zip(r.experts.tolist(), r.starts.tolist(), r.counts.tolist(), strict=True):
        yield e, slice(start, start + m)


def forward(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, experts: MoEExperts,
            lora: tuple[torch.Tensor, ...] | None, scaling: float, save: bool,
            out_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, Saved | None]:
    """MoE forward. x [T, H] bf16, topk_ids [T, K] int64, topk_weights [T, K] fp32 (validated).

    Returns out [T, H] (``out_dtype``) and, with ``save``, what :func:`backward` needs.
    """
    t, hdim = x.shape
    idim = experts.intermediate_size
    r = route(topk_ids, experts.num_experts)
    xs = aligned_empty((r.rows, hdim), torch.bfloat16)
    xs[r.slot_row] = x[r.slot_token]
    gu = aligned_empty((r.rows, 2 * idim), torch.float32)
    _grouped_fwd(xs, experts.gate_up, gu, r)
    gate, up = gu[:, :idim], gu[:, idim:]
    lora_h = None
    if lora is not None:
        ga, gb, ua, ub, _, _ = lora
        rank = ga.shape[1]
        hg = torch.zeros(r.rows, rank)
        hu = torch.zeros(r.rows, rank)
        for e, seg in _segments(r):
            xe = xs[seg].float()
            hg[seg] = xe @ ga[e].float().T
            hu[seg] = xe @ ua[e].float().T
            gate[seg] += scaling * (hg[seg] @ gb[e].float().T)
            up[seg] += scaling * (hu[seg] @ ub[e].float().T)
    act = (torch.nn.functional.silu(gate) * up).to(torch.bfloat16)
    y = aligned_empty((r.rows, hdim), torch.float32)
    _grouped_fwd(act, experts.down, y, r)
    if lora is not None:
        da, db = lora[4], lora[5]
        hd = torch.zeros(r.rows, rank)
        for e, seg in _segments(r):
            hd[seg] = act[seg].float() @ da[e].float().T
            y[seg] += scaling * (hd[seg] @ db[e].float().T)
        lora_h = (hg, hu, hd)
    out = torch.zeros(t, hdim, dtype=torch.float32)
    wrow = topk_weights[r.slot_token, r.slot_k].unsqueeze(1)
    out.index_add_(0, r.slot_token, y[r.slot_row] * wrow)
    saved = Saved(x, topk_weights, r, gate, up, act, lora_h) if save else None
    return out.to(out_dtype), saved


def backward(saved: Saved, grad_out: torch.Tensor, experts: MoEExperts, lora: tuple[torch.Tensor, ...] | None,
             scaling: float) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...] | None]:
    """Gradients for x (fp32 [T, H]), topk_weights (fp32 [T, K]) and the six LoRA tensors (fp32)."""
    r = saved.routing
    t, hdim = saved.x.shape
    kdim = saved.topk_weights.shape[1]
    idim = experts.intermediate_size
    dos = aligned_empty((r.rows, hdim), torch.bfloat16)
    dos[r.slot_row] = grad_out[r.slot_token].to(torch.bfloat16)
    d = aligned_empty((r.rows, idim), torch.float32)
    _grouped_bwd(dos, experts.down, d, r)
    grads = None
    if lora is not None:
        ga, gb, ua, ub, da, db = lora
        hg, hu, hd = saved.lora_h
        grads = [torch.zeros_like(p, dtype=torch.float32) for p in lora]
        t_d = torch.zeros(r.rows, ga.shape[1])
        for e, seg in _segments(r):
            t_d[seg] = dos[seg].float() @ db[e].float()
            d[seg] += scaling * (t_d[seg] @ da[e].float())
    act = saved.act
    dw_rows = (d[r.slot_row] * act[r.slot_row].float()).sum(1)
    dw = torch.zeros(t, kdim, dtype=torch.float32)
    dw[r.slot_token, r.slot_k] = dw_rows
    w_row = torch.zeros(r.rows, 1)
    w_row[r.slot_row, 0] = saved.topk_weights[r.slot_token, r.slot_k]
    d_act = d * w_row
    sig = torch.sigmoid(saved.gate)
    d_up = d_act * saved.gate * sig
    d_gate = d_act * saved.up * sig * (1 + saved.gate * (1 - sig))
    dgu = torch.cat([d_gate, d_up], 1).to(torch.bfloat16)
    dxs = aligned_empty((r.rows, hdim), torch.float32)
    _grouped_bwd(dgu, experts.gate_up, dxs, r)
    if lora is not None:
        xs = torch.zeros(r.rows, hdim, dtype=torch.bfloat16)
        xs[r.slot_row] = saved.x[r.slot_token]
        for e, seg in _segments(r):
            dye = dos[seg].float() * w_row[seg]
            grads[5][e] = scaling * dye.T @ hd[seg]                          # d down_lora_b
            grads[4][e] = scaling * (t_d[seg] * w_row[seg]).T @ act[seg].float()  # d down_lora_a
            xe = xs[seg].float()
            for dz, h, a, b, ia, ib in ((d_gate, hg, ga, gb, 0, 1), (d_up, hu, ua, ub, 2, 3)):
                tz = dz[seg] @ b[e].float()
                dxs[seg] += scaling * (tz @ a[e].float())
                grads[ib][e] = scaling * dz[seg].T @ h[seg]
                grads[ia][e] = scaling * tz.T @ xe
        grads = tuple(grads)
    dx = torch.zeros(t, hdim, dtype=torch.float32)
    dx.index_add_(0, r.slot_token, dxs[r.slot_row])
    return dx, dw, grads

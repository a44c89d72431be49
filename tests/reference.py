"""The float32 PyTorch oracle for every kernel test (one implementation, used everywhere)."""

from __future__ import annotations

import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """mean|a - b| / mean|b| (the project's accuracy metric)."""
    a, b = a.float(), b.float()
    return ((a - b).abs().mean() / b.abs().mean().clamp_min(1e-30)).item()


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Y[M, N] = X[M, K] @ W[N, K]^T in float32."""
    return x.float() @ w.float().T


def linear_t(dy: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """dX[M, K] = dY[M, N] @ W[N, K] in float32."""
    return dy.float() @ w.float()


def moe(x, topk_ids, topk_weights, gate, up, down, lora=None, scaling=0.0):
    """Routed-expert MoE with per-expert LoRA, float32, differentiable (autograd gives the gradients).

    x [T, H], topk_ids [T, K], topk_weights [T, K]; gate/up [E, I, H], down [E, H, I] (HF layout);
    lora = (gate_a [E,r,H], gate_b [E,I,r], up_a, up_b, down_a [E,r,I], down_b [E,H,r]) or None.
    """
    x, topk_weights = x.float(), topk_weights.float()
    out = torch.zeros_like(x)
    for e in range(gate.shape[0]):
        tok, kk = torch.nonzero(topk_ids == e, as_tuple=True)
        if tok.numel() == 0:
            continue
        xe = x[tok]
        g = xe @ gate[e].float().T
        u = xe @ up[e].float().T
        if lora is not None:
            ga, gb, ua, ub, da, db = (t[e].float() for t in lora)
            g = g + scaling * (xe @ ga.T) @ gb.T
            u = u + scaling * (xe @ ua.T) @ ub.T
        a = torch.nn.functional.silu(g) * u
        y = a @ down[e].float().T
        if lora is not None:
            y = y + scaling * (a @ da.T) @ db.T
        out = out.index_add(0, tok, y * topk_weights[tok, kk].unsqueeze(1))
    return out

"""The plain PyTorch implementation of kt_jit's math: the oracle of every test (in float32) and the
baseline of the benchmarks (in bfloat16, with autograd). Slow by design: a per-expert loop."""

from __future__ import annotations

import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """mean|a - b| / mean|b| (the project's accuracy metric)."""
    a, b = a.float(), b.float()
    return ((a - b).abs().mean() / b.abs().mean().clamp_min(1e-30)).item()


def linear(x: torch.Tensor, w: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Y[M, N] = X[M, K] @ W[N, K]^T."""
    return x.to(dtype) @ w.to(dtype).T


def linear_t(dy: torch.Tensor, w: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """dX[M, K] = dY[M, N] @ W[N, K]."""
    return dy.to(dtype) @ w.to(dtype)


def moe(x, topk_ids, topk_weights, gate, up, down, lora=None, scaling=0.0, dtype=torch.float32):
    """Routed-expert MoE with per-expert LoRA, differentiable (autograd gives the gradients).

    x [T, H], topk_ids [T, K], topk_weights [T, K]; gate/up [E, I, H], down [E, H, I] (HF layout);
    lora = (gate_a [E,r,H], gate_b [E,I,r], up_a, up_b, down_a [E,r,I], down_b [E,H,r]) or None.
    Computes in ``dtype`` (float32 for the oracle); returns float32 [T, H].
    """
    x = x.to(dtype)
    w = topk_weights.to(dtype)
    out = torch.zeros(x.shape, dtype=torch.float32)
    for e in torch.unique(topk_ids).tolist():
        tok, kk = torch.nonzero(topk_ids == e, as_tuple=True)
        xe = x[tok]
        g = xe @ gate[e].to(dtype).T
        u = xe @ up[e].to(dtype).T
        if lora is not None:
            ga, gb, ua, ub, da, db = (t[e].to(dtype) for t in lora)
            g = g + scaling * (xe @ ga.T) @ gb.T
            u = u + scaling * (xe @ ua.T) @ ub.T
        a = torch.nn.functional.silu(g) * u
        y = a @ down[e].to(dtype).T
        if lora is not None:
            y = y + scaling * (a @ da.T) @ db.T
        out = out.index_add(0, tok, (y * w[tok, kk].unsqueeze(1)).float())
    return out

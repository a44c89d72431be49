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

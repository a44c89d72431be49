"""Checks at the public boundary: bad input becomes a ValueError that says what to fix, never a
pointer handed to a kernel. (The expert ids' range is checked by the routing kernel as it copies
them, kernels/route.py, before anything indexes with them.)"""

from __future__ import annotations

import torch

from ..moe.weights import MoEExperts

_FLOATS = (torch.bfloat16, torch.float16, torch.float32)


def check_moe_inputs(hidden_states: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                     experts: MoEExperts) -> None:
    """hidden_states [T, H] float, topk_ids [T, K] int64, topk_weights [T, K] float; CPU, contiguous
    (the routing raises ValueError for ids outside [0, E))."""
    if not isinstance(experts, MoEExperts):
        raise ValueError(f"experts must be a kt_jit.MoEExperts, got {type(experts).__name__}")
    for name, t in (("hidden_states", hidden_states), ("topk_ids", topk_ids), ("topk_weights", topk_weights)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device.type != "cpu":
            raise ValueError(f"{name} is on {t.device}; kt_jit runs on the CPU: move it with .cpu()")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous; call .contiguous() first")
    if hidden_states.dtype not in _FLOATS:
        raise ValueError(f"hidden_states must be bfloat16/float16/float32, got {hidden_states.dtype}")
    if hidden_states.shape[1] != experts.hidden_size:
        raise ValueError(f"hidden_states has hidden size {hidden_states.shape[1]}, the experts have "
                         f"{experts.hidden_size}")
    if topk_ids.dtype != torch.int64:
        raise ValueError(f"topk_ids must be int64, got {topk_ids.dtype}; use topk_ids.long()")
    if topk_weights.dtype not in _FLOATS:
        raise ValueError(f"topk_weights must be a float tensor, got {topk_weights.dtype}")
    t = hidden_states.shape[0]
    if topk_ids.shape[0] != t or topk_weights.shape != topk_ids.shape:
        raise ValueError(f"hidden_states {tuple(hidden_states.shape)}, topk_ids {tuple(topk_ids.shape)} and "
                         f"topk_weights {tuple(topk_weights.shape)} disagree: need [T, H], [T, K], [T, K]")
    if topk_ids.shape[1] < 1:
        raise ValueError("topk_ids must route every token to at least one expert (K >= 1)")
    # (the ids' range is checked by the routing kernel, before any kernel indexes with them)

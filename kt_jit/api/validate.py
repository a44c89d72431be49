"""Checks at the public boundary: bad input becomes a ValueError that says what to fix, never a
pointer handed to a kernel. (The expert ids' range is checked by the routing kernel as it copies
them, kernels/route.py, before anything indexes with them.)"""

from __future__ import annotations

import torch

from ..moe.weights import MoEExperts, MoELoRA

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # hidden_states and topk_weights


def check_moe_inputs(hidden_states: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                     experts: MoEExperts) -> None:
    """hidden_states [T, H] float, topk_ids [T, K] int64, topk_weights [T, K] float; CPU, contiguous
    (the routing raises ValueError for ids outside [0, E))."""
    if not isinstance(experts, MoEExperts):
        raise ValueError(f"experts must be a kt_jit.MoEExperts, got {type(experts).__name__}")
    for name, t in (("hidden_states", hidden_states), ("topk_ids", topk_ids), ("topk_weights", topk_weights)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_cpu:  # (t.device builds an object: ~10 us at decode sizes)
            raise ValueError(f"{name} is on {t.device}; kt_jit runs on the CPU: move it with .cpu()")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous; call .contiguous() first")
    if hidden_states.dtype not in FLOAT_DTYPES:
        raise ValueError(f"hidden_states must be bfloat16/float16/float32, got {hidden_states.dtype}")
    if hidden_states.shape[1] != experts.hidden_size:
        raise ValueError(f"hidden_states has hidden size {hidden_states.shape[1]}, the experts have "
                         f"{experts.hidden_size}")
    if topk_ids.dtype != torch.int64:
        raise ValueError(f"topk_ids must be int64, got {topk_ids.dtype}; use topk_ids.long()")
    if topk_weights.dtype not in FLOAT_DTYPES:
        raise ValueError(f"topk_weights must be a float tensor, got {topk_weights.dtype}")
    t = hidden_states.shape[0]
    if topk_ids.shape[0] != t or topk_weights.shape != topk_ids.shape:
        raise ValueError(f"hidden_states {tuple(hidden_states.shape)}, topk_ids {tuple(topk_ids.shape)} and "
                         f"topk_weights {tuple(topk_weights.shape)} disagree: need [T, H], [T, K], [T, K]")
    if topk_ids.shape[1] < 1:
        raise ValueError("topk_ids must route every token to at least one expert (K >= 1)")
    # (the ids' range is checked by the routing kernel, before any kernel indexes with them)


def check_lora_arg(lora: object) -> None:
    """``lora``: a :class:`MoELoRA` or None."""
    if lora is not None and not isinstance(lora, MoELoRA):
        raise ValueError(f"lora must be a kt_jit.MoELoRA or None, got {type(lora).__name__}")


def check_saveable(hidden_states: torch.Tensor, topk_weights: torch.Tensor) -> None:
    """A forward that saves for backward keeps these two and checks their versions later, which
    tensors made under ``torch.inference_mode()`` do not have."""
    for name, t in (("hidden_states", hidden_states), ("topk_weights", topk_weights)):
        if t.is_inference():
            raise ValueError(f"{name} was created under torch.inference_mode(), so it cannot be saved for "
                             "backward: create it outside inference mode (or .clone() it there), or run this "
                             "forward without saving (torch.no_grad(), or save_for_backward=False)")


def check_grad_output(grad_output: object, t: int, h: int) -> None:
    """grad_output: a dense CPU tensor [T, H] of a real floating dtype (converted and made contiguous
    by the backward)."""
    if not isinstance(grad_output, torch.Tensor):
        raise ValueError(f"grad_output must be a [{t}, {h}] tensor matching the forward, got "
                         f"{type(grad_output).__name__}")
    if tuple(grad_output.shape) != (t, h):
        raise ValueError(f"grad_output must be a [{t}, {h}] tensor matching the forward, got "
                         f"{tuple(grad_output.shape)}")
    if grad_output.device.type != "cpu" or grad_output.layout != torch.strided:
        raise ValueError(f"grad_output must be a dense CPU tensor, got {grad_output.layout} on "
                         f"{grad_output.device}; use .cpu() (and .to_dense())")
    if not grad_output.dtype.is_floating_point:
        raise ValueError(f"grad_output must be a real floating-point tensor, got {grad_output.dtype}")

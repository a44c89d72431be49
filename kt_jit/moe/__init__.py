"""The MoE operator: weights, routing, forward/backward orchestration."""

from .weights import MoEExperts, MoELoRA

__all__ = ["MoEExperts", "MoELoRA"]

"""Public operator API (validation at the boundary, autograd, op object)."""

from .sft import MoESFTOp, moe_sft

__all__ = ["MoESFTOp", "moe_sft"]

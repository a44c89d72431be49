"""Public operator API (validation at the boundary, autograd, op object)."""

from .sft import MoESFTOp, moe_sft
from .wrapper import KTMoEWrapper

__all__ = ["KTMoEWrapper", "MoESFTOp", "moe_sft"]

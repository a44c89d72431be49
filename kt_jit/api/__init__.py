"""Public operator API (validation at the boundary, autograd, op object)."""

from .checkpointing import moe_checkpoint_context
from .sft import MoESFTOp, moe_sft
from .wrapper import KTMoEWrapper

__all__ = ["KTMoEWrapper", "MoESFTOp", "moe_checkpoint_context", "moe_sft"]

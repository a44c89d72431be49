"""kt_jit: JIT-compiled AMX / AVX-512 kernels for Mixture-of-Experts LoRA fine-tuning on CPUs."""

from .api import KTMoEWrapper, MoESFTOp, moe_checkpoint_context, moe_sft
from .codegen.cache import cache_info, clear_cache
from .kernels.gemm import linear, linear_t
from .kernels.pack import pack_bf16, unpack_bf16
from .moe import MoEExperts, MoELoRA
from .runtime.amx import active_isa, amx_status
from .runtime.cpu import cpu_info

__version__ = "0.1.0"

__all__ = [
    "KTMoEWrapper", "MoEExperts", "MoELoRA", "MoESFTOp", "__version__", "active_isa", "amx_status", "cache_info",
    "clear_cache", "cpu_info", "linear", "linear_t", "moe_checkpoint_context", "moe_sft", "pack_bf16", "unpack_bf16",
]

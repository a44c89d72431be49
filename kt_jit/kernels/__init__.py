"""Kernel families: each module holds a frozen spec, an IR builder and a get_kernel entry point."""

from .gemm import GemmSchedule, GemmSpec, get_kernel, linear, linear_t
from .pack import pack_bf16, unpack_bf16

__all__ = ["GemmSchedule", "GemmSpec", "get_kernel", "linear", "linear_t", "pack_bf16", "unpack_bf16"]

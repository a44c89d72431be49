"""Lowest layer: CPU features, AMX permission, thread launcher, aligned buffers, knobs."""

from .amx import active_isa, amx_status, require_amx
from .buffers import aligned_empty, aligned_zeros
from .cpu import CpuInfo, cpu_info
from .threads import default_num_threads, launch

__all__ = [
    "CpuInfo", "active_isa", "aligned_empty", "aligned_zeros", "amx_status", "cpu_info",
    "default_num_threads", "launch", "require_amx",
]

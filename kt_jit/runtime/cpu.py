"""CPU feature detection.

Features come from the kernel's view (/proc/cpuinfo flags: what the OS enables) intersected with
what LLVM reports for the host. LLVM's host CPU *name* is not trusted (on AMX VMs it reports
"rocketlake"); :func:`llvm_cpu_name` picks one from the features instead.
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass
from pathlib import Path

from .knobs import parse_size

# /proc/cpuinfo flag -> LLVM feature name
_FLAG_TO_LLVM = {
    "amx_tile": "amx-tile",
    "amx_bf16": "amx-bf16",
    "amx_int8": "amx-int8",
    "avx512f": "avx512f",
    "avx512bw": "avx512bw",
    "avx512vl": "avx512vl",
    "avx512dq": "avx512dq",
    "avx512_bf16": "avx512bf16",
    "avx512_vnni": "avx512vnni",
    "avx512_fp16": "avx512fp16",
    "avx512vbmi": "avx512vbmi",
    "avx2": "avx2",
    "fma": "fma",
}


@dataclass(frozen=True)
class CpuInfo:
    """What this CPU and OS support. ``flags`` are the /proc/cpuinfo names."""

    model_name: str
    flags: frozenset[str]
    llvm_host_name: str
    llvm_features: str  # LLVM feature string of the host, e.g. "+avx512f,-amx-tile,..."

    def has(self, flag: str) -> bool:
        return flag in self.flags

    @property
    def amx_bf16(self) -> bool:
        return {"amx_tile", "amx_bf16"} <= self.flags

    @property
    def amx_int8(self) -> bool:
        return {"amx_tile", "amx_int8"} <= self.flags

    @property
    def avx512_bf16(self) -> bool:
        return {"avx512f", "avx512bw", "avx512vl", "avx512_bf16"} <= self.flags

    def summary(self) -> dict[str, bool]:
        return {flag: flag in self.flags for flag in _FLAG_TO_LLVM}


def _read_cpuinfo() -> tuple[str, frozenset[str]]:
    model, flags = platform.processor() or "unknown", frozenset()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, val = line.partition(":")
                key = key.strip()
                if key == "model name" and model in ("unknown", "x86_64", ""):
                    model = val.strip()
                elif key == "flags":
                    flags = frozenset(val.split())
                    break
    except OSError:
        pass
    return model, flags


@functools.lru_cache(maxsize=1)
def cpu_info() -> CpuInfo:
    """Detected CPU features of this machine (cached)."""
    import llvmlite.binding as llvm

    model, flags = _read_cpuinfo()
    host_feats = llvm.get_host_cpu_features()
    llvm_on = {name for name, on in host_feats.items() if on}
    if not flags:  # no /proc/cpuinfo: trust LLVM
        flags = frozenset(f for f, lf in _FLAG_TO_LLVM.items() if lf in llvm_on)
    else:  # the OS may hide what the silicon has; keep what both agree on
        flags = frozenset(f for f in flags if f not in _FLAG_TO_LLVM or _FLAG_TO_LLVM[f] in llvm_on)
    return CpuInfo(model, flags, llvm.get_host_cpu_name(), host_feats.flatten())


@functools.lru_cache(maxsize=4)
def _cache_bytes(level: int) -> int:
    """Size of one core's data (or unified) cache of this level in bytes, from sysfs (0 if unknown)."""
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    try:
        for index in sorted(base.glob("index*")):
            here = (index / "level").read_text().strip()
            kind = (index / "type").read_text().strip()
            if here == str(level) and kind in ("Data", "Unified"):
                return parse_size((index / "size").read_text()) or 0
    except OSError:
        pass
    try:  # glibc knows it on some systems without the sysfs entries
        return max(0, int(os.sysconf("SC_LEVEL1_DCACHE_SIZE" if level == 1 else f"SC_LEVEL{level}_CACHE_SIZE")))
    except (ValueError, OSError, AttributeError):
        return 0


def l1d_cache_bytes() -> int:
    """Size of one core's level-1 data cache in bytes, from sysfs (0 if unknown). Some kernel
    schedules size what they keep in flight by it (Zen 4: 32 KB, Zen 5 and Sapphire Rapids: 48 KB)."""
    return _cache_bytes(1)


def l2_cache_bytes() -> int:
    """Size of one core's level-2 cache in bytes (0 if unknown); part of the key a tuned setting is
    stored under (runtime/tuning_store.py)."""
    return _cache_bytes(2)


def llvm_cpu_name(info: CpuInfo, want_amx: bool) -> str:
    """The CPU name kt_jit compiles for: chosen from features, not from LLVM's host guess."""
    if want_amx:
        return "sapphirerapids"
    if info.llvm_host_name.startswith("znver") or info.llvm_host_name in (
        "sapphirerapids", "graniterapids", "emeraldrapids", "cooperlake"
    ):
        return info.llvm_host_name
    return "cooperlake"

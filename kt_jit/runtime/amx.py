"""AMX tile-data permission (Linux ``arch_prctl``) and the ISA choice that follows from it.

A tile instruction executed before the kernel grants XTILEDATA kills the process with SIGILL, so
every AMX kernel launch goes through :func:`require_amx` first; it asks once per process.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading

from . import knobs
from .cpu import cpu_info

_SYS_ARCH_PRCTL = 158  # x86_64
_ARCH_GET_XCOMP_PERM = 0x1022
_ARCH_REQ_XCOMP_PERM = 0x1023
_XFEATURE_XTILEDATA = 18

_lock = threading.Lock()
_state: tuple[bool, str] | None = None


def _request() -> tuple[bool, str]:
    info = cpu_info()
    if not info.has("amx_tile"):
        return False, f"this CPU ({info.model_name}) has no AMX (amx_tile missing from /proc/cpuinfo)"
    if sys.platform != "linux":
        return False, "AMX permission is only implemented for Linux"
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    rc = libc.syscall(ctypes.c_long(_SYS_ARCH_PRCTL), ctypes.c_long(_ARCH_REQ_XCOMP_PERM),
                      ctypes.c_ulong(_XFEATURE_XTILEDATA))
    if rc != 0:
        err = ctypes.get_errno()
        return False, f"the kernel refused AMX tile data (arch_prctl ARCH_REQ_XCOMP_PERM: {os.strerror(err)})"
    mask = ctypes.c_ulong(0)
    rc = libc.syscall(ctypes.c_long(_SYS_ARCH_PRCTL), ctypes.c_long(_ARCH_GET_XCOMP_PERM), ctypes.byref(mask))
    if rc != 0 or not (mask.value >> _XFEATURE_XTILEDATA) & 1:
        return False, "arch_prctl did not grant XTILEDATA"
    return True, "AMX tile data granted"


def amx_status() -> tuple[bool, str]:
    """(usable, reason). Requests the permission on first call; later calls are free."""
    global _state
    if _state is None:
        with _lock:
            if _state is None:
                _state = _request()
    return _state


def require_amx() -> None:
    """Raise RuntimeError (instead of dying with SIGILL) when AMX cannot run here."""
    ok, why = amx_status()
    if not ok:
        raise RuntimeError(f"AMX kernels cannot run: {why}. Set KT_JIT_ISA=avx512 (or auto) to use the "
                           "AVX-512 BF16 kernels instead.")


_isa_memo: dict[str, str] = {}


def active_isa() -> str:
    """The instruction set kernels are generated for: "amx", "avx512" or "amx_emu".

    ``KT_JIT_ISA=auto`` picks AMX when the CPU has it and the OS grants it, else AVX-512 BF16.
    """
    raw = knobs.raw("KT_JIT_ISA") or ""
    isa = _isa_memo.get(raw)
    if isa is None:
        isa = _isa_memo[raw] = _resolve_isa()
    return isa


def _resolve_isa() -> str:
    req = knobs.isa_request()
    info = cpu_info()
    if req == "amx":
        require_amx()
        return "amx"
    if req == "amx_emu":
        return "amx_emu"
    if req == "avx512":
        if not info.avx512_bf16:
            raise RuntimeError(f"KT_JIT_ISA=avx512 needs AVX-512 BF16, which {info.model_name} lacks")
        return "avx512"
    if info.amx_bf16 and amx_status()[0]:
        return "amx"
    if info.avx512_bf16:
        return "avx512"
    raise RuntimeError(
        f"kt_jit needs Intel AMX (amx_bf16) or AVX-512 BF16 (avx512_bf16); {info.model_name} has neither. "
        "Set KT_JIT_ISA=amx_emu to run the (slow) AMX emulation for testing."
    )

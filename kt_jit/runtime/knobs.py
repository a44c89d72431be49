"""Every environment variable kt_jit reads, read in one place.

KT_JIT_CACHE_DIR    on-disk kernel cache (default ~/.cache/kt_jit)
KT_JIT_DUMP_DIR     if set, each compiled kernel's .ll and .s are written here
KT_JIT_PERF_MAP     "1" writes each loaded kernel's address range and name to /tmp/perf-<pid>.map,
                    where Linux perf looks for names of JIT code (codegen/perfmap.py; the file is
                    left in place for perf report)
KT_JIT_NUM_THREADS  worker threads per kernel launch (default: cores this process may use)
KT_JIT_ISA          "auto" (default), "amx", "avx512" or "amx_emu" (AMX kernels run through an
                    IR-level tile emulator; for testing the AMX code path on CPUs without AMX)
KT_JIT_DISABLE_CACHE  "1" compiles every kernel afresh and writes nothing to disk
KT_JIT_MALLOC_TUNE  "0" leaves glibc's malloc thresholds alone (see runtime/memory.py)
KT_JIT_REUSE_LORA_GRADS  "0" allocates fresh LoRA gradient buffers on every backward instead of
                    reusing dropped ones (see moe/gradbuf.py for when reuse happens)
KT_JIT_DEFER_LAUNCHES  "0" runs every kernel launch of an MoE pass at once instead of preparing them
                    all and running them back to back (codegen/worker.LaunchBatch; for A/B runs and
                    debugging; also turns launch plans off)
KT_JIT_LAUNCH_PLANS  "0" prepares every MoE pass's launches in Python instead of replaying a launch plan
                    recorded for its configuration (codegen/plan.py; for A/B runs and debugging)
KT_JIT_TUNING       overrides of the schedule values kt_jit picks per CPU for its AVX-512 GEMMs
                    (mostly the transposed ones), as comma-separated name=value pairs (names: the fields of
                    kernels/gemm.HostTuning, e.g. "stream_group_blocks=16,lanes_min_rows=0");
                    tools/tune.py measures them; they apply on top of a stored setting
KT_JIT_STORED_TUNING  "0" ignores the setting tools/tune.py --save stored for this CPU kind under
                    KT_JIT_CACHE_DIR/tuning (see runtime/tuning_store.py)

Read, not owned: OMP_STACKSIZE and GOMP_STACKSIZE (the stack of libgomp's threads, which run the
kernels; see runtime/threads.py).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .checks import check_int

ISA_CHOICES = ("auto", "amx", "avx512", "amx_emu")

# On POSIX os.environ keeps its variables in a dict of bytes, updated by every os.environ change.
# The knobs read on each MoE call look there directly: os.environ.get runs several Python-level
# calls, ~5-10 us each time a weight stream has just emptied the caches.
_ENVIRON_BYTES = getattr(os.environ, "_data", None) if os.name == "posix" else None


def _get(name: str, default: str | None = None) -> str | None:
    """``os.environ.get(name, default)``, cheaper on POSIX."""
    if _ENVIRON_BYTES is None:
        return os.environ.get(name, default)
    value = _ENVIRON_BYTES.get(name.encode())
    return default if value is None else value.decode("utf-8", "surrogateescape")


def _switched_on(name: str) -> bool:
    """A switch that is on unless set to 0, false, no or off."""
    return _get(name, "1").strip() not in ("0", "false", "no", "off")


def cache_dir() -> Path:
    """Directory of the on-disk kernel cache."""
    raw = os.environ.get("KT_JIT_CACHE_DIR")
    return Path(raw).expanduser() if raw else Path.home() / ".cache" / "kt_jit"


def dump_dir() -> Path | None:
    """Directory to write each kernel's .ll and .s into, or None."""
    raw = os.environ.get("KT_JIT_DUMP_DIR")
    return Path(raw).expanduser() if raw else None


def perf_map() -> bool:
    """KT_JIT_PERF_MAP: name loaded kernels for perf in /tmp/perf-<pid>.map (default off)."""
    return _get("KT_JIT_PERF_MAP", "0").strip().lower() in ("1", "true", "yes", "on")


def cache_disabled() -> bool:
    return os.environ.get("KT_JIT_DISABLE_CACHE", "") not in ("", "0")


def raw(name: str) -> str | None:
    """The raw value of one of the variables above (for memo keys in hot paths)."""
    return _get(name)


TUNING_HINT = "unset KT_JIT_TUNING for the defaults; python -m kt_jit.info shows the values in effect"


def parse_tuning(raw_value: str | None) -> dict[str, int]:
    """A KT_JIT_TUNING value as {name: integer value} ({} for None or empty); the names and values
    are checked by the caller (kernels/gemm.host_tuning)."""
    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in (raw_value or "").split(","))):
        name, sep, value = (s.strip() for s in part.partition("="))
        try:
            if not sep or not name:
                raise ValueError
            number = int(value)
        except ValueError:
            raise ValueError(f"KT_JIT_TUNING must be comma-separated name=integer pairs, got {part!r} in "
                             f"{raw_value!r} ({TUNING_HINT})") from None
        if name in out:
            raise ValueError(f"KT_JIT_TUNING sets {name} twice in {raw_value!r} ({TUNING_HINT})")
        out[name] = number
    return out


def num_threads_override() -> int | None:
    """KT_JIT_NUM_THREADS as a positive int, or None when unset."""
    raw = os.environ.get("KT_JIT_NUM_THREADS")
    if raw is None or raw == "":
        return None
    try:
        n = int(raw)
    except ValueError:
        n = raw  # (refused below, with the same message)
    return check_thread_count(n, "KT_JIT_NUM_THREADS")


MAX_THREADS = 4096  # (far above any CPU's cores; libgomp kills the process when it cannot create them)


def check_thread_count(n: object, what: str = "num_threads") -> int:
    """``n`` as an int if it is an integer in 1..MAX_THREADS, else ValueError naming ``what``."""
    return check_int(n, what, MAX_THREADS, hint="threads per kernel launch; the default is the cores this process "
                     "may use")


def isa_request() -> str:
    raw = os.environ.get("KT_JIT_ISA", "auto").strip().lower() or "auto"
    if raw not in ISA_CHOICES:
        raise ValueError(f"KT_JIT_ISA must be one of {ISA_CHOICES}, got {raw!r}")
    return raw


def malloc_tune() -> bool:
    return os.environ.get("KT_JIT_MALLOC_TUNE", "1") not in ("0", "")


def reuse_lora_grads() -> bool:
    """KT_JIT_REUSE_LORA_GRADS: reuse dropped LoRA gradient buffers (default on)."""
    return _switched_on("KT_JIT_REUSE_LORA_GRADS")


def defer_launches() -> bool:
    """KT_JIT_DEFER_LAUNCHES: batch an MoE pass's launches (default on)."""
    return _switched_on("KT_JIT_DEFER_LAUNCHES")


def parse_size(text: str, default_unit: str = "B") -> int | None:
    """Bytes of a size such as "32K", "2 m" or "4096" (B/K/M/G suffix, any case; ``default_unit``
    without one), or None if unreadable."""
    m = re.fullmatch(r"\s*(\d+)\s*([bBkKmMgG]?)\s*", text)
    if m is None:
        return None
    return int(m.group(1)) << {"B": 0, "K": 10, "M": 20, "G": 30}[m.group(2).upper() or default_unit]


def openmp_stack_bytes() -> int | None:
    """The thread stack size OMP_STACKSIZE (or GNU's GOMP_STACKSIZE) asks libgomp for, in bytes
    (kilobytes without a suffix), or None when neither is set or the value is unreadable (libgomp
    then keeps its default)."""
    for name in ("OMP_STACKSIZE", "GOMP_STACKSIZE"):
        raw = os.environ.get(name, "").strip()
        if raw:
            return parse_size(raw, "K")
    return None


def stored_tuning_enabled() -> bool:
    """KT_JIT_STORED_TUNING: start from the setting tools/tune.py stored for this CPU (default on)."""
    return _switched_on("KT_JIT_STORED_TUNING")


def launch_plans() -> bool:
    """KT_JIT_LAUNCH_PLANS: replay recorded launch plans of MoE passes (default on)."""
    return _switched_on("KT_JIT_LAUNCH_PLANS")

"""A tuned setting of the per-CPU schedule values, stored next to the kernel cache.

``tools/tune.py --save`` measures the values of kernels/gemm.HostTuning on this host and writes the
winners to ``<KT_JIT_CACHE_DIR>/tuning/<key>.json``, the key naming the CPU kind (LLVM's host CPU
name and the L1d and L2 sizes), so one cache directory shared by different machines keeps one
setting per kind. Every later process on a CPU of that kind starts from it: the precedence is
KT_JIT_TUNING over the stored setting over the built-in values chosen by the L1 size.
``KT_JIT_STORED_TUNING=0`` ignores the file.

The file is read once per process. An unreadable or malformed file is ignored with a warning
(never an error: a training run must not stop over a tuning file); rerun ``tools/tune.py --save``
or delete it.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import re
import uuid
import warnings
from pathlib import Path

from . import knobs
from .cpu import cpu_info, l1d_cache_bytes, l2_cache_bytes

FORMAT = 1


def host_key() -> str:
    """The CPU kind a stored setting belongs to, e.g. ``znver4-l1d32k-l2-1024k``."""
    name = re.sub(r"[^A-Za-z0-9_.]+", "_", cpu_info().llvm_host_name) or "unknown"
    return f"{name}-l1d{l1d_cache_bytes() >> 10}k-l2-{l2_cache_bytes() >> 10}k"


def tuning_path() -> Path:
    """Where this host's stored setting lives (it may not exist)."""
    return knobs.cache_dir() / "tuning" / f"{host_key()}.json"


def stored_values() -> tuple[tuple[str, int], ...]:
    """This host's stored setting as sorted (name, value) pairs; () when there is none, when
    KT_JIT_STORED_TUNING is 0, or when the file cannot be used (with a warning). Read once per
    process and cache directory: the names are checked by the caller (kernels/gemm.host_tuning)."""
    return _read(knobs.raw("KT_JIT_CACHE_DIR"), knobs.stored_tuning_enabled())


@functools.lru_cache(maxsize=8)
def _read(_cache_dir: str | None, enabled: bool) -> tuple[tuple[str, int], ...]:
    if not enabled:
        return ()
    path = tuning_path()
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return ()
    except OSError as e:
        warn_unusable(f"cannot read it ({e})", stacklevel=4)
        return ()
    try:  # (bad UTF-8 is a ValueError too; absurdly nested JSON a RecursionError)
        data = json.loads(raw.decode())
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"format {data.get('format') if isinstance(data, dict) else None!r}, "
                             f"this kt_jit reads format {FORMAT}")
        values = data.get("values")
        if not isinstance(values, dict) or not all(
                isinstance(k, str) and type(v) is int for k, v in values.items()):
            raise ValueError("'values' must map names to integers")
    except (ValueError, RecursionError) as e:
        warn_unusable(str(e), stacklevel=4)
        return ()
    return tuple(sorted(values.items()))


def warn_unusable(why: str, stacklevel: int = 2) -> None:
    """Warn that this host's stored setting is ignored (a training run never stops over it)."""
    warnings.warn(f"kt_jit: ignoring the stored tuning {tuning_path()}: {why}; rerun tools/tune.py --save or "
                  "delete the file", stacklevel=stacklevel + 1)


def save(values: dict[str, int], measured: dict | None = None) -> Path:
    """Store ``values`` ({HostTuning field: integer}; {} = the built-in values measured best) as
    this host's setting, atomically (readable by every user of a shared cache directory), with
    ``measured`` (how they were found) alongside. Returns the path. Processes started afterwards use
    it; this one keeps what it has read."""
    path = tuning_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"format": FORMAT, "key": host_key(), "cpu": cpu_info().model_name,
              "values": {k: int(v) for k, v in values.items()},
              "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "measured": measured or {}}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def forget() -> bool:
    """Delete this host's stored setting; True if there was one."""
    path = tuning_path()
    existed = path.exists()
    path.unlink(missing_ok=True)
    return existed


def reset_memo() -> None:
    """Forget what this process has read (tests; a process that has just saved a setting)."""
    _read.cache_clear()

"""Naming kt_jit's kernels for sampling profilers (``KT_JIT_PERF_MAP=1``).

Linux ``perf`` reads ``/tmp/perf-<pid>.map`` (lines ``<start hex> <size hex> <name>``) to name code
that no ELF file on disk describes, which is what JIT-loaded kernels are. With the knob on, every
kernel the loader links adds its symbols' address ranges there, so ``perf record`` (e.g. ``-e
cpu-clock``, which works in VMs without hardware counters) then ``perf report`` attributes samples
to kernel names; tools/profile_kernels.py also reads the map to annotate instructions.

The file is written with the process's first kernel and appended to after that. A file left by an
earlier process with the same pid (older than this process) is replaced; a newer one (e.g. from
CPython's own ``-X perf``) is appended to. A forked child writes its own file, with the kernels
loaded before the fork too. Writing never fails a kernel load: the first error is reported with a
warning and the map is then left alone.
"""

from __future__ import annotations

import os
import struct
import threading
import time
import warnings
from pathlib import Path

_ELF64_LE = b"\x7fELF\x02\x01"
_SHT_SYMTAB = 2
_lock = threading.Lock()
_lines: list[str] = []  # every line recorded in this process (a fork's child rewrites them all)
_written_by = 0  # the pid whose map holds _lines[:_written]
_written = 0
_failed = False


def _symbols(obj: bytes) -> list[tuple[str, int, int]]:
    """(name, st_info, size) of every sized symbol in a little-endian ELF64 object's symbol table
    (empty for anything else, a damaged object included)."""
    if not obj.startswith(_ELF64_LE) or len(obj) < 64:
        return []
    try:
        shoff, = struct.unpack_from("<Q", obj, 0x28)
        shentsize, shnum = struct.unpack_from("<HH", obj, 0x3A)
        sections = [struct.unpack_from("<IIQQQQIIQQ", obj, shoff + i * shentsize) for i in range(shnum)]
        out = []
        for _name, kind, _flags, _addr, offset, size, link, _info, _align, entsize in sections:
            if kind != _SHT_SYMTAB or not entsize:
                continue
            strtab = sections[link][4]
            for pos in range(offset, offset + size, entsize):
                name_at, info, _other, _shndx, _value, sym_size = struct.unpack_from("<IBBHQQ", obj, pos)
                if sym_size:
                    end = obj.index(b"\0", strtab + name_at)
                    out.append((obj[strtab + name_at:end].decode(), info, sym_size))
        return out
    except (struct.error, IndexError, ValueError, OverflowError, UnicodeDecodeError):
        return []


def symbol_sizes(obj: bytes) -> dict[str, int]:
    """Name -> size in bytes of every sized symbol in a little-endian ELF64 object's symbol table
    (empty for anything else, a damaged object included)."""
    return {name: size for name, _, size in _symbols(obj)}


_STB_GLOBAL, _STT_FUNC = 1, 2


def global_functions(obj: bytes) -> list[str]:
    """The global functions an ELF64 object defines (e.g. those of a module's further parts, which
    the loader then exports so that the map names them too)."""
    return [name for name, info, _ in _symbols(obj) if info >> 4 == _STB_GLOBAL and info & 0xF == _STT_FUNC]


def map_path(pid: int | None = None) -> Path:
    """The map file ``perf`` reads for process ``pid`` (default: this one)."""
    return Path(f"/tmp/perf-{pid or os.getpid()}.map")


def _started() -> float:
    """This process's start as a Unix time (from /proc: its start in ticks after boot)."""
    with open("/proc/self/stat") as f:
        ticks_after_boot = int(f.read().rsplit(")", 1)[1].split()[19])  # (field 22; the name may hold spaces)
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    return time.time() - uptime + ticks_after_boot / os.sysconf("SC_CLK_TCK")


def _stale(path: Path) -> bool:
    """Whether ``path`` is missing or older than this process (left by an earlier one with its pid)."""
    try:
        return path.stat().st_mtime < _started() - 1.0  # (the clock ticks are coarse)
    except (OSError, ValueError, IndexError):
        return True


def record(addresses: dict[str, int], obj: bytes) -> None:
    """Add ``start size name`` for each symbol of ``addresses`` (name -> address) whose size the
    object ``obj`` gives. Never raises."""
    global _written_by, _written, _failed
    if _failed:  # (for good: the first failure's warning said so)
        return
    sizes = symbol_sizes(obj)
    new = [f"{addr:x} {sizes[name]:x} {name}\n" for name, addr in addresses.items() if addr and sizes.get(name)]
    if not new:
        return
    with _lock:
        _lines.extend(new)
        path, pid = map_path(), os.getpid()
        try:
            if _written_by != pid:  # this process's first write (or a fork's): everything so far
                flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_TRUNC if _stale(path) else os.O_APPEND)
                _written_by, _written = pid, 0
            else:
                flags = os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW
            fd = os.open(path, flags, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write("".join(_lines[_written:]))
            _written = len(_lines)
        except OSError as e:
            _failed = True
            warnings.warn(f"kt_jit: could not write the perf map {path} ({e}); KT_JIT_PERF_MAP has no "
                          "further effect in this process", RuntimeWarning, stacklevel=2)


def read_map(pid: int | None = None) -> list[tuple[int, int, str]]:
    """(start, size, name) of every line of a perf map file, sorted by start (none: [])."""
    try:
        text = map_path(pid).read_text()
    except OSError:
        return []
    rows = []
    for line in text.splitlines():
        parts = line.split(" ", 2)
        try:
            rows.append((int(parts[0], 16), int(parts[1], 16), parts[2]))
        except (IndexError, ValueError):
            continue
    return sorted(rows)

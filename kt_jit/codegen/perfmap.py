"""Naming kt_jit's kernels for sampling profilers (``KT_JIT_PERF_MAP=1``).

Linux ``perf`` reads ``/tmp/perf-<pid>.map`` (lines ``<start hex> <size hex> <name>``) to name code
that no ELF file on disk describes, which is what JIT-loaded kernels are. With the knob on, every
kernel the loader links appends its symbols' address ranges there, so ``perf record`` (e.g. ``-e
cpu-clock``, which works in VMs without hardware counters) then ``perf report`` attributes samples
to kernel names; tools/profile_kernels.py also reads the map to annotate instructions.
"""

from __future__ import annotations

import os
import struct
import threading
from pathlib import Path

_ELF64_LE = b"\x7fELF\x02\x01"
_SHT_SYMTAB = 2
_lock = threading.Lock()


def symbol_sizes(obj: bytes) -> dict[str, int]:
    """Name -> size in bytes of every sized symbol in a little-endian ELF64 object's symbol table
    (empty for anything else)."""
    if not obj.startswith(_ELF64_LE) or len(obj) < 64:
        return {}
    shoff, = struct.unpack_from("<Q", obj, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", obj, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", obj, shoff + i * shentsize) for i in range(shnum)]
    sizes = {}
    for _name, kind, _flags, _addr, offset, size, link, _info, _align, entsize in sections:
        if kind != _SHT_SYMTAB or not entsize:
            continue
        strtab = sections[link][4]
        for pos in range(offset, offset + size, entsize):
            name_at, _bind_type, _other, _shndx, _value, sym_size = struct.unpack_from("<IBBHQQ", obj, pos)
            if sym_size:
                end = obj.index(b"\0", strtab + name_at)
                sizes[obj[strtab + name_at:end].decode()] = sym_size
    return sizes


def map_path(pid: int | None = None) -> Path:
    """The map file ``perf`` reads for process ``pid`` (default: this one)."""
    return Path(f"/tmp/perf-{pid or os.getpid()}.map")


def record(addresses: dict[str, int], sizes: dict[str, int]) -> None:
    """Append ``start size name`` for each symbol of ``addresses`` whose size is known."""
    lines = "".join(f"{addr:x} {sizes[name]:x} {name}\n" for name, addr in addresses.items()
                    if addr and sizes.get(name))
    if lines:
        with _lock, open(map_path(), "a") as f:
            f.write(lines)


def read_map(pid: int | None = None) -> list[tuple[int, int, str]]:
    """(start, size, name) of every line of a perf map file, sorted by start (none: [])."""
    try:
        text = map_path(pid).read_text()
    except FileNotFoundError:
        return []
    rows = []
    for line in text.splitlines():
        start, size, name = line.split(" ", 2)
        rows.append((int(start, 16), int(size, 16), name))
    return sorted(rows)

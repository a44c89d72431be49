"""safetensors files whose tensors start at 64-byte file offsets.

safetensors' own writer packs tensors back to back after a header padded to 8 bytes, so a
memory-mapped tensor is usually off 64-byte alignment (8 or 32 bytes off for kt_jit's packed
experts), and every 64-byte weight load of a kernel then touches two cache lines (AMX tile rows off
alignment load ~6.7x slower on Sapphire Rapids). The format requires the tensors' byte ranges to
tile the data section without holes, so the gaps are filled by ``uint8`` padding entries named
``__pad<i>__``, which readers skip (:func:`is_padding`). Any safetensors reader reads these files.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile

import torch

from ..runtime.buffers import ALIGN

_PAD = "__pad"
_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.float64: "F64",
           torch.int8: "I8", torch.uint8: "U8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64",
           torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}


def is_padding(name: str) -> bool:
    """Whether ``name`` is a padding entry of :func:`save_aligned` (not a tensor of the caller's)."""
    return name.startswith(_PAD) and name.endswith("__")


def save_aligned(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                 metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` (CPU, any shape; dtypes as in safetensors) as a safetensors file in which
    every tensor starts at a multiple of 64 bytes from the file's start, so that a memory map of the
    file (page aligned) gives 64-byte aligned tensors. Written to a temporary file in the same
    directory, flushed to disk, then renamed over ``path`` (a reader, or a memory map of the old
    file, never sees a partial one)."""
    if any(is_padding(k) or k == "__metadata__" for k in tensors):
        raise ValueError(f"tensor names __metadata__ and {_PAD}<i>__ are reserved (the header's metadata, padding)")
    entries: list[tuple[str, torch.Tensor]] = []
    header: dict[str, dict] = {}
    offset = 0
    for name, t in tensors.items():
        if t.dtype not in _DTYPES or t.device.type != "cpu":
            raise ValueError(f"{name}: cannot write a {t.dtype} tensor on {t.device}")
        if offset % ALIGN:
            pad = ALIGN - offset % ALIGN
            key = f"{_PAD}{len(entries)}__"
            header[key] = {"dtype": "U8", "shape": [pad], "data_offsets": [offset, offset + pad]}
            entries.append((key, torch.zeros(pad, dtype=torch.uint8)))
            offset += pad
        t = t.contiguous()
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        entries.append((name, t))
        offset += size
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % ALIGN)  # (the data section then starts 64-byte aligned)
    directory, name = os.path.split(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"cannot write {path}: {directory} is not a directory (create it first)")
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(text)))
            f.write(text)
            for _, t in entries:
                if t.numel():
                    f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise

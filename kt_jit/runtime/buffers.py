"""64-byte-aligned host buffers (AMX tile rows that are not 64-byte aligned load ~6.7x slower)."""

from __future__ import annotations

import torch

ALIGN = 64


def aligned_empty(shape: tuple[int, ...] | list[int], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised contiguous CPU tensor whose data pointer is a multiple of 64."""
    shape = tuple(int(s) for s in shape)
    numel = 1
    for s in shape:
        numel *= s
    t = torch.empty(shape, dtype=dtype)
    if t.data_ptr() % ALIGN == 0:
        return t
    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = torch.empty(numel + ALIGN // itemsize, dtype=dtype)
    off = (-raw.data_ptr() % ALIGN) // itemsize
    return raw[off : off + numel].view(shape)


def aligned_zeros(shape: tuple[int, ...] | list[int], dtype: torch.dtype) -> torch.Tensor:
    t = aligned_empty(shape, dtype)
    t.zero_()
    return t


def is_aligned(t: torch.Tensor) -> bool:
    return t.data_ptr() % ALIGN == 0

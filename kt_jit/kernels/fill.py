"""Zero chosen experts' slices of several tensors in one parallel launch, with streaming stores.

The LoRA weight gradients are dense Parameters' gradients: every expert that received no token
still needs its (zero) slice written, 34.6 MB per backward for a Qwen3-30B-A3B layer. One launch
over all of them replaces a ``Tensor.zero_`` per run of idle experts and per gradient (48 calls at
qlen 1), and streaming stores skip reading the lines first. The launch takes the experts' mask
as it is: building a table of byte ranges from it in NumPy cost ~200 us per backward (a dozen
calls, each 5-10x its warm time right after a weight stream; measured at qlen 16, where ~30
experts' slices are zeroed in ~150 us).
"""

from __future__ import annotations

import ctypes
import functools
import math
from collections.abc import Sequence

import numpy as np
import torch

from ..codegen import avx512 as vx
from ..codegen.ir import F32x16, Function
from ..codegen.worker import ArgBlock, compile_worker, immediate_launches
from ..runtime.buffers import array_address

ALIGN = 64
SPLIT = 8  # work items per tensor: each takes 1/SPLIT of the experts (claimed dynamically by the threads)
# mask: uint8 [experts]; table: int64 [tensors, 2] = (address, bytes per expert slice)
ARGS = ArgBlock(["mask", "experts", "split", "table"])


def _body(fn: Function, ctx: str, item: str, tiles) -> None:
    mask, table = ARGS.load_ptr(fn, ctx, "mask"), ARGS.load_ptr(fn, ctx, "table")
    experts, split = ARGS.load(fn, ctx, "experts"), ARGS.load(fn, ctx, "split")
    part = fn.val(f"urem i64 {item}, {split}")
    d = fn.gep(table, fn.mul(fn.val(f"udiv i64 {item}, {split}"), 16))
    base, size = fn.load("ptr", d, 8), fn.load("i64", fn.gep(d, 8), 8)
    first = fn.val(f"udiv i64 {fn.mul(part, experts)}, {split}")
    last = fn.val(f"udiv i64 {fn.mul(fn.add(part, 1), experts)}, {split}")
    with fn.loop(first, last, name="e") as e:
        with fn.if_then(fn.val(f"icmp ne i8 {fn.load('i8', fn.gep(mask, e), 1)}, 0"), name="masked"):
            start = fn.gep(base, fn.mul(e, size))
            with fn.loop(0, size, ALIGN, name="z") as off:
                vx.store_nontemporal(fn, F32x16, "zeroinitializer", fn.gep(start, off), ALIGN)
    vx.sfence(fn)


@functools.cache
def _kernel() -> int:
    return compile_worker("fill_zero_slices", "fill_zero_slices v1", ARGS, _body)


def zero_slices(mask: np.ndarray, tensors: Sequence[torch.Tensor]) -> None:
    """Write zeros to ``t[e]`` of every tensor ``t`` for every expert ``e`` with ``mask[e]`` set.

    ``mask``: bool or uint8 NumPy array [E], contiguous. ``tensors``: contiguous CPU tensors of
    shape [E, ...] (any dtype) whose data pointers and per-expert slices are multiples of 64 bytes.
    The launch runs at once, also inside a LaunchBatch."""
    if not isinstance(mask, np.ndarray) or mask.ndim != 1 or mask.dtype.itemsize != 1 \
            or not mask.flags.c_contiguous:
        raise ValueError("zero_slices needs a contiguous 1-D bool or uint8 NumPy mask")
    experts = mask.shape[0]
    fields = []
    for t in tensors:
        # (from the shape: is_contiguous() ignores the stride of a size-1 dimension)
        size = math.prod(t.shape[1:]) * t.element_size()
        if t.dim() == 0 or t.shape[0] != experts or not t.is_contiguous() or not t.is_cpu:
            raise ValueError(f"zero_slices needs contiguous CPU tensors of {experts} expert slices, "
                             f"got shape {tuple(t.shape)}")
        if (t.data_ptr() | size) % ALIGN:
            raise ValueError(f"zero_slices needs tensors whose address and per-expert bytes are multiples "
                             f"of {ALIGN}, got {t.data_ptr():#x} and {size}")
        fields += (t.data_ptr(), size)
    if not fields or not experts:
        return
    table = (ctypes.c_int64 * len(fields))(*fields)
    with immediate_launches():
        ARGS.run(_kernel(), len(tensors) * SPLIT, keep=(table, mask), mask=array_address(mask), experts=experts,
                 split=SPLIT, table=ctypes.addressof(table))

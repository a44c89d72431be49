"""LoRA gradient buffers reused from one backward to the next.

Every backward returns dense gradients for all experts' adapters, and most experts are idle at
small qlen: their slices must be zero. Writing those zeros is a fixed cost (qwen3-30b-a3b: 34.6 MB
of bf16 gradients, ~0.5 ms at qlen 1, where the whole backward takes ~3 ms). Once the training
loop has dropped last step's gradient (``optimizer.zero_grad()`` sets it to None), its buffer
still holds zeros everywhere except in the experts written last time, so only those need zeroing.

A buffer is reused only when nothing outside this object holds its storage (autograd's
``AccumulateGrad`` usually adopts the returned tensor as ``param.grad``; while that or any other
view lives, a fresh buffer is allocated) and its version counter has not moved since it was
handed out (any in-place change through the gradient or a view of it, e.g. clipping). Some
writes bump no version counter: through ``.data``, a NumPy view or a raw pointer, and
``torch.distributed`` collectives (``all_reduce`` of ``p.grad`` in place). Reuse is therefore off
while ``torch.distributed`` is initialised, and a loop that writes into gradients in one of the
other ways and then drops them must set ``KT_JIT_REUSE_LORA_GRADS=0``.

Buffers the caller owns (kt-kernel's wrapper takes six that every backward overwrites) are
:meth:`LoraGradBuffers.adopt`-ed: every backward writes into them, and zeroes only the experts it
wrote last time while their version counters have not moved since (any in-place change, e.g.
``zero_()`` or clipping, makes it zero every idle expert once). Copying into them instead cost
~1.9 ms per backward at qlen 1 (qwen3-30b-a3b).
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from ..kernels.idle import idle_experts
from ..runtime import knobs
from ..runtime.buffers import aligned_empty

_DIST_AVAILABLE = torch.distributed.is_available()


def _distributed() -> bool:
    return _DIST_AVAILABLE and torch.distributed.is_initialized()


class LoraGradBuffers:
    """Six bf16 gradient buffers, reused across backwards when nobody else can see them, or the
    caller's own (:meth:`adopt`), written by every backward."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bufs: tuple[torch.Tensor, ...] = ()
        self._shapes: tuple[tuple[int, ...], ...] = ()
        self._storages: list[int] = []  # the buffers' StorageImpl pointers, for their use counts
        self._own_refs: list[int] = []  # each use count while only this object holds the buffer
        self._versions: tuple[int, ...] = ()
        self._written = np.zeros(0, dtype=bool)  # experts whose slices may be non-zero
        self._after = np.zeros(0, dtype=bool)  # what _written becomes once the caller has zeroed
        self._adopted = False  # _bufs are the caller's (adopt): handed out always, never replaced

    def __getstate__(self) -> dict:  # copies and pickles of the adapters start with no buffers
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    def adopt(self, bufs: tuple[torch.Tensor, ...]) -> None:
        """Make every later backward write into ``bufs``: six contiguous bf16 CPU tensors in the
        gradients' shapes (those of the kernels' rank), each 64-byte aligned, overlapping nothing
        the backward reads or writes (the caller checks). Their current contents are taken as
        unknown: the first backward zeroes every idle expert."""
        with self._lock:
            self._bufs = tuple(b.detach() for b in bufs)
            self._shapes = tuple(tuple(b.shape) for b in bufs)
            self._storages, self._own_refs = [], []
            self._versions = tuple(b._version for b in bufs)
            e = self._shapes[0][0]
            self._written, self._after = np.ones(e, dtype=bool), np.zeros(e, dtype=bool)
            self._adopted = True

    def acquire(self, shapes: tuple[tuple[int, ...], ...], basis: np.ndarray, fold_max: int, folded: np.ndarray,
                ) -> tuple[tuple[torch.Tensor, ...], np.ndarray, int]:
        """Gradient tensors (bf16, ``shapes``, 64-byte aligned) for a backward whose active experts
        are those of ``basis`` (a routing's [A, 4] basis rows), the bool [E] mask of experts whose
        slices the caller must zero (every idle expert for fresh buffers, only those written last
        time for reused ones), and how many those are; when at most ``fold_max``, ``folded`` ([A +
        fold_max, 4] int64) holds the basis rows then a zero-row group per such expert (see
        kernels/idle.py). The caller writes every active expert's slices in full."""
        e = shapes[0][0]
        to_zero = np.empty(e, dtype=bool)
        if self._adopted:
            return self._acquire_adopted(shapes, basis, fold_max, folded, to_zero)
        if not knobs.reuse_lora_grads() or _distributed():
            n = idle_experts(basis, np.zeros(e, dtype=bool), False, fold_max, to_zero, folded, np.empty(e, dtype=bool))
            return tuple(aligned_empty(s, torch.bfloat16) for s in shapes), to_zero, n
        with self._lock:
            # in use elsewhere: a second reference to the storage (a view, a .grad, a saved copy)
            reuse = self._shapes == shapes and all(
                torch._C._storage_Use_Count(st) <= own and b._version == v
                for st, own, b, v in zip(self._storages, self._own_refs, self._bufs, self._versions, strict=True))
            if not reuse:
                self._bufs = tuple(aligned_empty(s, torch.bfloat16) for s in shapes)
                self._shapes = shapes
                self._storages = [b.untyped_storage()._cdata for b in self._bufs]
                # (torch keeps the Python storage object made above alive with the storage: +1)
                self._own_refs = [torch._C._storage_Use_Count(st) for st in self._storages]
                self._versions = tuple(b._version for b in self._bufs)
                self._written, self._after = np.zeros(e, dtype=bool), np.zeros(e, dtype=bool)
            # written becomes active | to_zero: until the caller reports the zeroing done (zeroed()),
            # those experts may hold old values; after becomes the active experts
            n = idle_experts(basis, self._written, reuse, fold_max, to_zero, folded, self._after)
            return tuple(b.detach() for b in self._bufs), to_zero, n  # new tensors, shared version counter

    def _acquire_adopted(self, shapes: tuple[tuple[int, ...], ...], basis: np.ndarray, fold_max: int,
                         folded: np.ndarray, to_zero: np.ndarray) -> tuple[tuple[torch.Tensor, ...], np.ndarray, int]:
        """:meth:`acquire` for adopted buffers: always those, with what the last backward wrote
        still known only while their version counters have not moved."""
        if shapes != self._shapes:
            raise RuntimeError(f"the adopted LoRA gradient buffers have shapes {self._shapes}, the backward needs "
                               f"{shapes}")
        with self._lock:
            known = (tuple(b._version for b in self._bufs) == self._versions and knobs.reuse_lora_grads()
                     and not _distributed())
            # the kernels write without bumping the version counters: bumped here, so that anything
            # else that knows these buffers (another wrapper given the same ones) sees the change
            torch.autograd.graph.increment_version(list(self._bufs))
            self._versions = tuple(b._version for b in self._bufs)
            n = idle_experts(basis, self._written, known, fold_max, to_zero, folded, self._after)
            return self._bufs, to_zero, n

    def zeroed(self, grads: tuple[torch.Tensor, ...]) -> None:
        """The caller has zeroed the experts :meth:`acquire` told it to zero in ``grads`` (what it
        returned); a no-op unless those are this object's buffers. Valid only for the latest
        acquire of these buffers, which holds: while the caller holds ``grads`` no other acquire
        reuses them (their use count; adopted buffers: the caller runs one backward at a time), and
        a later acquire of fresh ones fails the address check."""
        with self._lock:
            if self._bufs and grads[0].data_ptr() == self._bufs[0].data_ptr():
                # written = the active experts, as acquire's kernel wrote them (no NumPy call: at decode
                # sizes each costs ~10-30 us right after a weight stream)
                self._written, self._after = self._after, self._written

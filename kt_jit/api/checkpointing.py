"""Gradient checkpointing that does not run the MoE layers twice: :func:`moe_checkpoint_context`.

Under ``torch.utils.checkpoint.checkpoint(fn, ..., use_reentrant=False)`` every operation of ``fn``
drops what it saved for backward and runs again in the backward to recompute it. For a layer whose
routed experts are ``moe_sft`` calls that recompute is a whole second MoE forward, the most
expensive part of the layer on a CPU. With ``context_fn=moe_checkpoint_context`` the MoE calls
inside ``fn`` keep their activations through the checkpoint (on the autograd node, as without
checkpointing), and during the recompute each returns the output its first forward computed
(a copy kept for it) instead of running the kernels again. Everything else in ``fn`` is
checkpointed as before.
"""

from __future__ import annotations

import threading
import weakref
from contextlib import AbstractContextManager

import torch

_phase = threading.local()


class _Phase(AbstractContextManager):
    """Marks the calls inside it as a checkpoint's first forward or its recompute (per thread,
    nested phases restore the outer one)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.outer: str | None = None

    def __enter__(self) -> _Phase:
        self.outer = getattr(_phase, "name", None)
        _phase.name = self.name
        return self

    def __exit__(self, *exc) -> None:
        _phase.name = self.outer


def moe_checkpoint_context() -> tuple[AbstractContextManager, AbstractContextManager]:
    """A ``context_fn`` for ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`` that
    keeps ``moe_sft``'s activations through the checkpoint, so the backward's recompute does not
    run the MoE kernels again.

    Example: ``checkpoint(layer, h, use_reentrant=False, context_fn=kt_jit.moe_checkpoint_context)``,
    or for a transformers model ``model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=
    {"use_reentrant": False, "context_fn": kt_jit.moe_checkpoint_context})``.

    Memory: each MoE call keeps what it saves without checkpointing (per routed token-expert pair
    ``2I`` fp32 + ``I`` bf16 + ``3r`` bf16, and the input ``[T, H]``) plus a copy of its output
    ``[T, H]`` until the recompute has used it. Time: the recompute of a MoE call compares its
    inputs with the first forward's (one read of each) instead of running the layer; if they differ
    (a non-deterministic recompute) it runs the forward as plain checkpointing does, and the
    gradients still use the first forward's activations. Reentrant checkpointing
    (``use_reentrant=True``) takes no ``context_fn``; :class:`~kt_jit.MoESFTOp` is not affected."""
    return _Phase("forward"), _Phase("recompute")


def phase() -> str | None:
    """``"forward"`` or ``"recompute"`` inside :func:`moe_checkpoint_context`'s contexts on this
    thread, else None."""
    return getattr(_phase, "name", None)


class Retained:
    """A first forward's inputs and output, kept for its recompute. The autograd node of the
    forward holds it, so it goes when that graph is freed (also when no backward ever runs)."""

    __slots__ = ("__weakref__", "inputs", "out", "versions")

    def __init__(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                 out: torch.Tensor) -> None:
        # the caller's tensors by reference (the forward keeps x anyway), their versions to notice
        # changes in place, and a copy of the output (the caller may change it in place)
        self.inputs: tuple[torch.Tensor, ...] | None = (x, topk_ids, topk_weights)
        self.versions = tuple(t._version for t in self.inputs)
        self.out: torch.Tensor | None = out.detach().clone()

    def matches(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> bool:
        """Whether a recompute's inputs equal this forward's (dtypes, shapes and values)."""
        if self.inputs is None or tuple(t._version for t in self.inputs) != self.versions:
            return False
        return all(a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
                   for a, b in zip(self.inputs, (x, topk_ids, topk_weights), strict=True))


_lock = threading.Lock()
_kept: dict[int, list[weakref.ref[Retained]]] = {}  # id(experts) -> the newest last


def keep(experts: object, entry: Retained) -> None:
    """Register ``entry`` (a first forward of ``experts``) for its recompute."""
    with _lock:
        live = [r for r in _kept.get(id(experts), ()) if r() is not None]
        live.append(weakref.ref(entry))
        _kept[id(experts)] = live


def take(experts: object, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor | None:
    """The output of the newest first forward of ``experts`` whose inputs equal these (and forget
    it), or None. Recomputes run in the backward's order, the reverse of the forwards'."""
    with _lock:
        refs = _kept.get(id(experts), [])
        for i in range(len(refs) - 1, -1, -1):
            entry = refs[i]()
            if entry is None or entry.out is None or not entry.matches(x, topk_ids, topk_weights):
                continue
            del refs[i]
            out, entry.out = entry.out, None
            entry.inputs = None
            return out
        _kept[id(experts)] = [r for r in refs if r() is not None]
        if not _kept[id(experts)]:
            del _kept[id(experts)]
    return None

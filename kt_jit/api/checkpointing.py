"""Gradient checkpointing that does not run the MoE layers twice: :func:`moe_checkpoint_context`.

Under ``torch.utils.checkpoint.checkpoint(fn, ..., use_reentrant=False)`` every operation of ``fn``
drops what it saved for backward and runs again in the backward to recompute it. For a layer whose
routed experts are ``moe_sft`` calls that recompute is a whole second MoE forward, the most
expensive part of the layer on a CPU. With ``context_fn=moe_checkpoint_context`` the MoE calls
inside ``fn`` keep their activations through the checkpoint (saved past the checkpoint's hooks,
freed by the backward as without checkpointing), and a recompute that reaches a MoE call gets the
output the first forward computed instead of running the kernels again. Everything else in ``fn``
is checkpointed as before.
"""

from __future__ import annotations

import threading
from collections import deque
from contextlib import AbstractContextManager

import torch

_active = threading.local()  # .stack: the entered phases of this thread, innermost last


def _top_hooks() -> object:
    """The innermost saved-tensor hooks now in force (identity-compared), or None."""
    try:
        return torch._C._autograd._top_saved_tensors_default_hooks(False)
    except (AttributeError, TypeError):  # (a torch without it: nesting is not detected)
        return None


class Retained:
    """A first forward's call (experts, adapters, scaling, output dtype), inputs and output, kept
    for the recompute of its checkpoint."""

    __slots__ = ("call", "inputs", "out", "versions")

    def __init__(self, call: tuple, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        # the caller's tensors by reference (the forward keeps x anyway) and the output as returned
        # (not a copy), each with its version: a change in place makes the entry unusable
        self.call, self.inputs, self.out = call, inputs, out.detach()
        self.versions = tuple(t._version for t in (*inputs, self.out))

    def matches(self, call: tuple, inputs: tuple[torch.Tensor, ...]) -> bool:
        """Whether a recompute's call is this forward's: the same experts, adapter tensors, scaling and
        output dtype, unchanged tensors, and inputs of equal dtypes, shapes and values."""
        if len(call) != len(self.call) or not all(
                a is b or (not isinstance(a, torch.Tensor) and type(a) is type(b) and a == b)
                for a, b in zip(call, self.call, strict=True)):
            return False
        if tuple(t._version for t in (*self.inputs, self.out)) != self.versions:
            return False
        return all(a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
                   for a, b in zip(self.inputs, inputs, strict=True))


class Phase(AbstractContextManager):
    """A checkpoint call's first forward (``recompute`` False) or its recompute. Entered by
    ``torch.utils.checkpoint`` just inside its own saved-tensor hooks, which it remembers: a MoE
    call under other hooks (an inner checkpoint without this context, ``save_on_cpu``) is not its
    own and runs as without the context."""

    def __init__(self, kept: deque[Retained], recompute: bool) -> None:
        # kept: the checkpoint call's MoE forwards of its first forward, in order (shared by its two
        # phases; the recompute runs the calls in the same order)
        self.kept, self.recompute = kept, recompute
        self.hooks: object = None

    def __enter__(self) -> Phase:
        self.hooks = _top_hooks()
        stack = getattr(_active, "stack", None)
        if stack is None:
            stack = _active.stack = []
        stack.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _active.stack.remove(self)

    def owns_calls_now(self) -> bool:
        """Whether a MoE call now is directly inside this phase's checkpoint (no other hooks)."""
        return _top_hooks() == self.hooks  # (tuples of functions: compared by identity)

    def take(self, call: tuple, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor | None:
        """The output of the first forward's call in this call's place if it was this call, else
        None (the recompute's n-th MoE call is the first forward's n-th)."""
        if not self.kept:
            return None
        entry = self.kept.popleft()
        return entry.out if entry.matches(call, inputs) else None


def moe_checkpoint_context() -> tuple[Phase, Phase]:
    """A ``context_fn`` for ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`` under
    which ``moe_sft`` keeps its activations through the checkpoint, so the backward's recompute
    does not run the MoE kernels again.

    Example: ``checkpoint(layer, h, use_reentrant=False, context_fn=kt_jit.moe_checkpoint_context)``,
    or for a transformers model ``model.activation_checkpointing_enable(activation_checkpointing_kwargs=
    {"use_reentrant": False, "context_fn": kt_jit.moe_checkpoint_context})``.

    Memory: each MoE call keeps from its forward to its backward what it keeps without
    checkpointing (per routed token-expert pair ``2I`` bf16, with LoRA ``3r`` bf16 per row of the
    per-expert segments, whose rows start at multiples of 16; and its input ``[T, H]``), and its
    output ``[T, H]`` until the recompute reaches it or the graph is freed.
    Time: a recompute that reaches a MoE call compares the call's inputs with the first forward's
    (one read of each) and returns the first forward's output; if anything differs (other
    adapters or scaling, a non-deterministic region, a tensor changed in place) the call runs its
    forward as under plain checkpointing. Either way the gradients use the first forward's
    activations. Calls under an inner checkpoint without this context run as without it.
    Reentrant checkpointing (``use_reentrant=True``) takes no ``context_fn``; :class:`~kt_jit.MoESFTOp`
    is not affected."""
    kept: deque[Retained] = deque()
    return Phase(kept, False), Phase(kept, True)


def current() -> Phase | None:
    """The innermost :func:`moe_checkpoint_context` phase entered on this thread if a MoE call now
    belongs to it, else None."""
    stack = getattr(_active, "stack", None)
    if not stack:
        return None
    phase = stack[-1]
    return phase if phase.owns_calls_now() else None

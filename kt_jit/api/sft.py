"""The MoE fine-tuning operator: ``moe_sft`` (autograd) and :class:`MoESFTOp` (explicit forward /
backward with a stack of saved activations, the seeds' call model)."""

from __future__ import annotations

import threading

import torch

from ..moe import sft as core
from ..moe.weights import MoEExperts, MoELoRA
from ..runtime.checks import check_int
from . import checkpointing
from .validate import check_grad_output, check_lora_arg, check_moe_inputs, check_saveable


class _MoESFTFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, topk_ids, topk_weights, experts, scaling, out_dtype, grad_buffers, *lora):
        lora_t = tuple(lora) if lora else None
        out, saved = _forward(x, topk_ids, topk_weights, experts, lora_t, scaling, True, out_dtype)
        # every saved tensor goes through save_for_backward: autograd checks the inputs' versions
        # (in-place changes before backward raise), and non-reentrant checkpointing can drop them
        # after the forward and recompute them for the backward
        ctx.save_for_backward(saved.x, saved.topk_weights, saved.block, *lora)
        # the routing (small NumPy arrays, T*K entries) stays on ctx; topk_ids' version guards it: under
        # non-reentrant checkpointing the saved tensors are recomputed from the ids as they are then
        ctx.routing, ctx.ids, ctx.ids_version = saved.routing, topk_ids, topk_ids._version
        ctx.meta = (saved.kept, saved.rank, saved.scaling)
        ctx.experts, ctx.scaling, ctx.grad_buffers = experts, scaling, grad_buffers
        ctx.x_dtype, ctx.w_dtype = x.dtype, topk_weights.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_grad_enabled():  # create_graph=True: a second differentiation must raise
            return _backward_no_second_order(ctx, grad_out)
        return _backward(ctx, grad_out)  # (grad mode is off: nothing to record)


def _call_key(experts: MoEExperts, lora: tuple[torch.Tensor, ...], scaling: float, out_dtype: torch.dtype) -> tuple:
    """What besides the inputs makes two MoE calls the same (objects by identity, numbers by value)."""
    return (experts, *lora, float(scaling), out_dtype)


class _Recomputed(torch.autograd.Function):
    """Hands a checkpoint's recompute the output its first forward computed, as a non-leaf output
    (later ops may change it in place; the recompute's graph is never differentiated)."""

    @staticmethod
    def forward(ctx, box, *anchors):
        return box[0]

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("kt_jit: a checkpoint's recomputed graph was differentiated")


def _pack_versioned(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    return t, t._version


def _unpack_versioned(packed: tuple[torch.Tensor, int]) -> torch.Tensor:
    """A tensor saved past a checkpoint's hooks, with the version check autograd makes for its own."""
    t, version = packed
    if t._version != version:
        raise RuntimeError("hidden_states, topk_weights or a LoRA tensor was modified in place between the forward "
                           "and the backward of kt_jit.moe_sft (under moe_checkpoint_context); clone them before "
                           "changing, or step the optimizer after the backward")
    return t


def _backward(ctx, grad_out):
    """The backward of :class:`_MoESFTFunction`, which runs it without recording (kernels only)."""
    if ctx.ids._version != ctx.ids_version:
        raise RuntimeError("topk_ids was modified in place between the forward and the backward of "
                           "kt_jit.moe_sft; pass a copy (topk_ids.clone()) if you reuse its buffer")
    x, w, block, *lora = ctx.saved_tensors
    saved = core.Saved(x, w, ctx.routing, block, *ctx.meta)
    lora_t = tuple(lora) if lora else None
    need = ctx.needs_input_grad  # (x, topk_ids, topk_weights, 4 non-tensors, *lora)
    need_lora = any(need[7:])
    dx_dtype = ctx.x_dtype if ctx.x_dtype in (torch.float32, torch.bfloat16) else torch.float32
    dx, dw, dlora = core.backward(saved, grad_out, ctx.experts, lora_t, ctx.scaling, ctx.grad_buffers,
                                  need_dx=need[0], need_lora_grads=need_lora, dx_dtype=dx_dtype)
    lora_grads = (None,) * len(lora) if dlora is None else dlora  # bf16, as the adapters (checked)
    return (None if dx is None else contiguous_as(dx, ctx.x_dtype), None, contiguous_as(dw, ctx.w_dtype),
            None, None, None, None, *lora_grads)


SECOND_ORDER_MESSAGE = ("kt_jit.moe_sft has no second-order gradients: a gradient taken through it with "
                        "create_graph=True cannot be differentiated again (leave the MoE layer out of the penalty "
                        "term, or compute its gradient without create_graph)")


def _backward_no_second_order(ctx, grad_out):
    """The backward under ``create_graph=True``: first-order gradients whose own gradient raises.

    ``once_differentiable`` marks its outputs only when an input of the backward (here ``grad_out``)
    requires grad; with a loss linear in the output it does not, and the gradients came back as
    constants, so a penalty on them silently differentiated to zero. They depend on x through the
    saved activations, so here they are always marked."""
    with torch.no_grad():
        grads = _backward(ctx, grad_out)
    if _delayed_error is None:  # (a torch without the node: refuse the graph outright)
        raise RuntimeError(SECOND_ORDER_MESSAGE)
    marked = [g.detach().requires_grad_() if g is not None else None for g in grads]
    return tuple(_delayed_error(SECOND_ORDER_MESSAGE.encode(), len(marked))(*marked))


_delayed_error = getattr(getattr(torch._C, "_functions", None), "DelayedError", None)

# _MoESFTFunction.apply is a Python layer over the C apply: it binds default arguments when a
# setup_context is defined (none is), refuses functorch transforms (they need a setup_context), and
# unwraps dead functorch wrappers. After a pass's weight stream that layer cost ~45 us of a ~100 us
# Function.apply (measured); _apply does the same without it. A torch without these internals
# takes the public apply.
try:
    _c_apply = super(torch.autograd.Function, _MoESFTFunction).apply
    _unwrap_if_dead = torch._C._functorch.unwrap_if_dead
    _transforms_active = torch._C._are_functorch_transforms_active
    _direct_apply = True
except AttributeError:
    _direct_apply = False


def _apply(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, *rest) -> torch.Tensor:
    """``_MoESFTFunction.apply(x, topk_ids, topk_weights, *rest)`` (of ``rest`` only the LoRA
    Parameters are tensors; they are passed as they are)."""
    if not _direct_apply or _transforms_active():
        return _MoESFTFunction.apply(x, topk_ids, topk_weights, *rest)
    return _c_apply(_unwrap_if_dead(x), _unwrap_if_dead(topk_ids), _unwrap_if_dead(topk_weights), *rest)


def _forward(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, experts: MoEExperts,
             lora: tuple[torch.Tensor, ...] | None, scaling: float, save: bool, out_dtype: torch.dtype):
    """core.forward on validated inputs, converted to what it takes (bf16 x, fp32 weights)."""
    return core.forward(contiguous_as(x, torch.bfloat16), topk_ids, contiguous_as(topk_weights, torch.float32),
                        experts, lora, scaling, save=save, out_dtype=out_dtype)


def _lora_state(lora: tuple[torch.Tensor, ...] | None) -> tuple:
    """Where each adapter tensor's data is and its version (a change in place or a replaced tensor
    changes it)."""
    return () if lora is None else tuple((t.data_ptr(), t._version) for t in lora)


def _without_grad(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` with autograd recording off, as under ``torch.no_grad()`` but without
    its Python context-manager layers (at decode sizes every Python frame a pass runs costs several
    microseconds: the previous pass's weight stream has emptied the caches; measured ~10 us per
    forward at qlen 1)."""
    if not torch.is_grad_enabled():
        return fn(*args, **kwargs)
    try:
        torch._C._set_grad_enabled(False)
        return fn(*args, **kwargs)
    finally:
        torch._C._set_grad_enabled(True)


def contiguous_as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``, contiguous (itself when it already is: no torch call on the hot path)."""
    if t.dtype != dtype:
        t = t.to(dtype)
    return t if t.is_contiguous() else t.contiguous()


def moe_sft(hidden_states: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
            experts: MoEExperts, lora: MoELoRA | None = None,
            out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Routed-expert MoE layer with per-expert LoRA, differentiable.

    hidden_states ``[T, H]`` (bf16; fp16/fp32 are converted), topk_ids ``[T, K]`` int64,
    topk_weights ``[T, K]`` float. Returns ``[T, H]`` in ``out_dtype`` (fp32 by default, or bf16).
    Gradients flow to hidden_states, topk_weights (the router gradient ``<dOut[t], Y_k[t]>``) and
    the six LoRA Parameters, which are read from their current storage on every call.
    """
    check_moe_inputs(hidden_states, topk_ids, topk_weights, experts)
    if out_dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"out_dtype must be torch.float32 or torch.bfloat16, got {out_dtype}")
    check_lora_arg(lora)
    tensors = lora.check_matches(experts) if lora is not None else ()
    scaling = lora.scaling if lora is not None else 0.0
    if not (torch.is_grad_enabled() and (hidden_states.requires_grad or topk_weights.requires_grad
                                         or any(p.requires_grad for p in tensors))):
        # nothing to differentiate (inference, torch.no_grad): no autograd node, nothing saved
        return _forward(hidden_states, topk_ids, topk_weights, experts, tensors or None, scaling, False, out_dtype)[0]
    check_saveable(hidden_states, topk_weights)
    phase = checkpointing.current()
    grad_buffers = getattr(lora, "grad_buffers", None)
    if phase is None:
        return _apply(hidden_states, topk_ids, topk_weights, experts, scaling, out_dtype, grad_buffers, *tensors)
    call = _call_key(experts, tensors, scaling, out_dtype)
    if phase.recompute:
        out = phase.take(call, (hidden_states, topk_ids, topk_weights))
        if out is not None:
            return _Recomputed.apply([out], hidden_states, topk_weights, *tensors)
    # saved past the checkpoint's hooks: kept to the backward and freed by it, counted by neither
    # the first forward nor the recompute
    with torch.autograd.graph.saved_tensors_hooks(_pack_versioned, _unpack_versioned):
        out = _apply(hidden_states, topk_ids, topk_weights, experts, scaling, out_dtype, grad_buffers, *tensors)
    if not phase.recompute:
        phase.kept.append(checkpointing.Retained(call, (hidden_states, topk_ids, topk_weights), out))
    return out


class MoESFTOp:
    """Explicit forward/backward with the seeds' cache semantics.

    ``forward(..., save_for_backward=True)`` pushes what backward needs onto a stack of depth
    ``max_cache_depth``; ``backward(grad_output)`` pops the newest entry (so several forwards, e.g.
    of gradient-checkpointed layers, can precede their backwards in reverse order). A full stack
    raises ``RuntimeError("Forward cache full ...")``, an empty one ``RuntimeError("No forward
    cache ...")``. The stack is shared by all threads and strictly last-in first-out: calls from
    several Python threads never corrupt it, but a thread's backward pops the newest forward of any
    thread; give each independent stream of work its own op.
    """

    def __init__(self, experts: MoEExperts, lora: MoELoRA | None = None, max_cache_depth: int = 1) -> None:
        if not isinstance(experts, MoEExperts):
            raise ValueError(f"experts must be a kt_jit.MoEExperts, got {type(experts).__name__}")
        check_lora_arg(lora)
        max_cache_depth = check_int(max_cache_depth, "max_cache_depth")
        if lora is not None:
            lora.check_matches(experts)
        self.experts, self.lora, self.max_cache_depth = experts, lora, max_cache_depth
        self._stack: list[core.Saved] = []
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        del state["_lock"]  # (copy.deepcopy, torch.save of a model holding an op)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @property
    def cache_depth(self) -> int:
        """Forwards saved and not yet consumed by a backward."""
        return len(self._stack)

    def _lora(self):
        if self.lora is None:
            return None, 0.0
        return self.lora.check_matches(self.experts), self.lora.scaling  # (a Parameter may have been replaced)

    def forward(self, hidden_states: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                save_for_backward: bool = True, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Output ``[T, H]``; with ``save_for_backward`` the activations go onto the cache stack."""
        check_moe_inputs(hidden_states, topk_ids, topk_weights, self.experts)
        if out_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"out_dtype must be torch.float32 or torch.bfloat16, got {out_dtype}")
        if save_for_backward:
            check_saveable(hidden_states, topk_weights)
            with self._lock:
                if len(self._stack) >= self.max_cache_depth:
                    raise RuntimeError(f"Forward cache full: {len(self._stack)} forwards saved, max_cache_depth="
                                       f"{self.max_cache_depth}. Call backward() first, or raise max_cache_depth.")
        lora, scaling = self._lora()
        out, saved = _without_grad(_forward, hidden_states, topk_ids, topk_weights, self.experts, lora, scaling,
                                   save_for_backward, out_dtype)
        if save_for_backward:
            with self._lock:
                if len(self._stack) >= self.max_cache_depth:
                    raise RuntimeError(f"Forward cache full: {len(self._stack)} forwards saved, max_cache_depth="
                                       f"{self.max_cache_depth}. Call backward() first, or raise max_cache_depth.")
                saved.lora_state = _lora_state(lora)
                self._stack.append(saved)
        return out

    def backward(self, grad_output: torch.Tensor, dx_dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
        """Gradients of the newest saved forward: ``grad_input`` [T, H] (``dx_dtype``: bf16 or fp32,
        rounded once from the fp32 sums), ``grad_weights`` [T, K] (fp32) and, with LoRA, one bf16
        entry per LoRA tensor name (e.g. ``gate_lora_a``)."""
        if dx_dtype not in (torch.bfloat16, torch.float32):
            raise ValueError(f"dx_dtype must be torch.bfloat16 or torch.float32, got {dx_dtype}")
        with self._lock:
            if not self._stack:
                raise RuntimeError("No forward cache to run backward on: call forward(..., "
                                   "save_for_backward=True) first (each backward consumes one forward).")
            saved = self._stack.pop()
        t, h = saved.x.shape
        try:
            check_grad_output(grad_output, t, h)
        except ValueError:
            with self._lock:
                self._stack.append(saved)  # (the forward stays usable with a correct grad_output)
            raise
        if core.experts_config(self.experts) != saved.experts_config:
            raise RuntimeError("the op's experts changed shape, count or quantization between forward and "
                               "backward; run the forward again with the experts the backward should use")
        lora, scaling = self._lora()
        if saved.x._version != saved.x_version or saved.topk_weights._version != saved.w_version:
            raise RuntimeError("hidden_states or topk_weights were modified in place between forward and "
                               "backward; the saved forward is no longer valid (clone them before changing).")
        if (lora is None) != (saved.rank == 0) or (lora is not None and (
                lora[0].shape[1] != saved.rank or scaling != saved.scaling)):
            raise RuntimeError("the LoRA adapters changed rank or scaling (or were attached/removed) between "
                               "forward and backward; run the forward again")
        if lora is not None and saved.lora_state is not None and _lora_state(lora) != saved.lora_state:
            raise RuntimeError("the LoRA adapters were changed (in place, e.g. an optimizer step or "
                               "update_lora_weights, or replaced) between this forward and its backward: the "
                               "backward would mix old and new values. Step the optimizer after the backward, or "
                               "run the forward again")
        dx, dw, dlora = _without_grad(core.backward, saved, grad_output, self.experts, lora, scaling,
                                      getattr(self.lora, "grad_buffers", None), dx_dtype=dx_dtype)
        result = {"grad_input": dx, "grad_weights": dw}
        if dlora is not None:
            from ..moe.weights import LORA_NAMES

            result.update({n: g.to(torch.bfloat16) for n, g in zip(LORA_NAMES, dlora, strict=True)})
        return result

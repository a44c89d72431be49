"""``KTMoEWrapper``: KTransformers' kt-kernel wrapper interface (``mode="sft"`` / ``"inference"``),
on kt_jit's operator, so a program written against that interface runs with its import changed.

One MoE layer's routed experts: ``load_weights`` (from ``weight_path``: a Hugging Face safetensors
checkpoint, bf16/fp16/fp32 or FP8 with block scales, or a model kt_jit's ``save_pretrained``
packed) or ``load_weights_from_tensors``; in SFT mode ``init_lora_weights`` (the caller's tensors,
read in place), ``forward_sft`` / ``backward`` / ``update_lora_weights``; in inference mode
``forward`` and ``submit_forward`` / ``sync_forward``. The methods map to kt_jit's modes:

====================================================  ============================
method                                                kt_jit quantization
====================================================  ============================
``AMXBF16_SFT``, ``BF16``                             ``bf16``
``AMXINT8_SFT``, ``AMXINT8``, ``MOE_INT8``            ``int8``
``AMXINT4_SFT``, ``AMXINT4``, ``MOE_INT4``            ``int4``
``AMXINT4_1_SFT``                                     ``int4_1``
``AMXINT4_KGroup_SFT``                                ``int4_1kgroup`` (``zero_point``), else ``int4_kgroup``
``AMXINT4_1KGroup_SFT``                               ``int4_1kgroup``
====================================================  ============================

kt_jit picks the instruction set itself (AMX where the CPU has it, AVX-512 otherwise), so the AMX
and the generic methods of one precision are the same here. What kt-kernel has and this does not:
GPU-resident experts (``num_gpu_experts`` must be 0), expert deferral
(``max_deferred_experts_per_token``), the native-precision and GGUF methods (RAWINT4, FP8, LLAMAFILE,
...: an FP8 checkpoint loads with any method above, dequantized or quantized as it is packed), NUMA
sub-pools (``threadpool_count`` is accepted and has no effect; ``cpuinfer_threads`` neither:
``KT_JIT_NUM_THREADS`` sets the threads), and CUDA-stream callbacks (tensors on another device are
copied to the CPU and the results back).
"""

from __future__ import annotations

import os
import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from ..moe.checkpoint import NoExpertsError, packed_experts_files
from ..moe.sft import kernel_rank
from ..moe.weights import LORA_NAMES, MoEExperts, MoELoRA, lora_shapes
from ..runtime.buffers import resident_empty
from ..runtime.checks import check_int, check_real
from .sft import MoESFTOp, contiguous_as, moe_sft
from .validate import FLOAT_DTYPES

SFT_METHODS = {"AMXBF16_SFT": "bf16", "AMXINT8_SFT": "int8", "AMXINT4_SFT": "int4", "AMXINT4_1_SFT": "int4_1",
               "AMXINT4_KGroup_SFT": "int4_kgroup", "AMXINT4_1KGroup_SFT": "int4_1kgroup"}
INFERENCE_METHODS = {"AMXINT4": "int4", "AMXINT8": "int8", "MOE_INT4": "int4", "MOE_INT8": "int8", "BF16": "bf16"}
_NOT_HERE = ("RAWINT4", "FP8", "FP8_PERCHANNEL", "GPTQ_INT4", "LLAMAFILE", "MXFP4", "NVFP4", "MXFP8")


def _quant(method: str, mode: str, zero_point: bool) -> str:
    """kt_jit's quantization mode for a kt-kernel ``method`` in ``mode`` (ValueError if it has none)."""
    methods = SFT_METHODS if mode == "sft" else INFERENCE_METHODS
    if method not in methods:
        other = INFERENCE_METHODS if mode == "sft" else SFT_METHODS
        hint = (f"; it is {'an inference' if mode == 'sft' else 'an SFT'} method" if method in other else
                "; kt_jit has no native-precision or GGUF kernels: an FP8 checkpoint loads with any method "
                "listed (packed or quantized as it loads)" if method in _NOT_HERE else "")
        raise ValueError(f"Method '{method}' is not supported in {mode} mode{hint}. Supported methods: "
                         f"{sorted(methods)}")
    quant = methods[method]
    if method == "AMXINT4_KGroup_SFT" and zero_point:
        quant = "int4_1kgroup"
    return quant


def _own(t: torch.Tensor, caller: torch.Tensor) -> torch.Tensor:
    """``t`` (the checked form of the caller's tensor ``caller``) in memory the caller does not hold."""
    return t.clone() if t.data_ptr() == caller.data_ptr() else t


def _overlapping(tensors: dict[str, torch.Tensor]) -> tuple[str, str] | None:
    """Two names of ``tensors`` (CPU, contiguous) whose memory overlaps, or None."""
    spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size(), name)
                   for name, t in tensors.items() if t.numel())
    for (_, end, a), (start, _, b) in zip(spans, spans[1:], strict=False):
        if start < end:
            return a, b
    return None


def _unavailable(name: str):
    """A method of the other mode: it raises that mode's RuntimeError."""

    def method(self, *args, **kwargs):
        self._other_mode(name)

    method.__name__ = name
    return method


class KTMoEWrapper:
    """Factory: ``KTMoEWrapper(..., mode="sft")`` gives an :class:`SFTMoEWrapper`,
    ``mode="inference"`` (the default) an :class:`InferenceMoEWrapper`; the arguments are
    kt-kernel's (see the module docstring for what kt_jit does with each). Raises
    ``ValueError("Unknown mode: ...")`` for another mode and ``ValueError("Method ... not supported
    in ... mode")`` for a method the mode does not have."""

    def __new__(cls, layer_idx: int, num_experts: int, num_experts_per_tok: int, hidden_size: int,
                moe_intermediate_size: int, num_gpu_experts: int | torch.Tensor | None = 0,
                cpuinfer_threads: int | None = None, threadpool_count: int = 1, weight_path: str | None = None,
                chunked_prefill_size: int = 25600, cpu_save: bool = False,
                max_deferred_experts_per_token: int | None = None, method: str = "AMXINT4",
                mode: str = "inference", lora_rank: int = 16, lora_alpha: float = 32.0, max_cache_depth: int = 1,
                group_size: int = 128, zero_point: bool = True, gpu_experts_mask: torch.Tensor | None = None,
                numa_nodes=None, lora_dropout: float = 0.0, full_weight_grad: bool = False,
                swiglu_limit: float = 0.0, swiglu_alpha: float = 0.0):
        if mode not in ("inference", "sft"):
            raise ValueError(f"Unknown mode: '{mode}'. Supported modes: 'inference', 'sft'")
        quant = _quant(method, mode, zero_point)
        for name, value in (("lora_dropout", lora_dropout), ("full_weight_grad", full_weight_grad),
                            ("swiglu_limit", swiglu_limit), ("swiglu_alpha", swiglu_alpha)):
            if value:
                raise ValueError(f"{name}={value!r} is not supported by kt_jit's wrapper (leave it at its default)")
        for gpu in (num_gpu_experts, gpu_experts_mask):
            if gpu is not None and (int(torch.as_tensor(gpu).sum()) if isinstance(gpu, torch.Tensor) else gpu) != 0:
                raise ValueError("kt_jit runs every expert on the CPU: num_gpu_experts must be 0 (and "
                                 "gpu_experts_mask all False)")
        base = dict(layer_idx=layer_idx, num_experts=num_experts, num_experts_per_tok=num_experts_per_tok,
                    hidden_size=hidden_size, moe_intermediate_size=moe_intermediate_size, weight_path=weight_path,
                    chunked_prefill_size=chunked_prefill_size, method=method, quant=quant, group_size=group_size)
        if mode == "sft":
            return SFTMoEWrapper(lora_rank=lora_rank, lora_alpha=lora_alpha, max_cache_depth=max_cache_depth, **base)
        if max_deferred_experts_per_token:
            raise ValueError("max_deferred_experts_per_token: kt_jit does not defer experts; leave it None")
        return InferenceMoEWrapper(**base)


class _MoEWrapperBase:
    """What both modes share: the configuration, the checks and the base weights' loading."""

    mode = ""

    def __init__(self, layer_idx: int, num_experts: int, num_experts_per_tok: int, hidden_size: int,
                 moe_intermediate_size: int, weight_path: str | None, chunked_prefill_size: int,
                 method: str, quant: str, group_size: int) -> None:
        sizes = dict(num_experts=num_experts, hidden_size=hidden_size, moe_intermediate_size=moe_intermediate_size,
                     num_experts_per_tok=num_experts_per_tok, chunked_prefill_size=chunked_prefill_size)
        num_experts, hidden_size, moe_intermediate_size, num_experts_per_tok, chunked_prefill_size = (
            check_int(value, name) for name, value in sizes.items())
        if num_experts_per_tok > num_experts:
            raise ValueError(f"num_experts_per_tok ({num_experts_per_tok}) cannot exceed num_experts ({num_experts})")
        self.layer_idx, self.num_experts, self.num_experts_per_tok = layer_idx, num_experts, num_experts_per_tok
        self.hidden_size, self.moe_intermediate_size = hidden_size, moe_intermediate_size
        self.weight_path, self.chunked_prefill_size = weight_path, chunked_prefill_size
        self.method, self.quant, self.group_size = method, quant, group_size
        self.experts: MoEExperts | None = None  # what the kernels run: slot p is logical expert map[p]
        self._logical: MoEExperts | None = None  # the experts as loaded (logical order)
        self._map: torch.Tensor | None = None  # the physical_to_logical_map applied (None: the identity)

    # ---- base weights

    def load_weights_from_tensors(self, gate_proj: torch.Tensor, up_proj: torch.Tensor, down_proj: torch.Tensor,
                                  physical_to_logical_map_cpu: torch.Tensor | None = None) -> None:
        """Pack (and quantize, by the method) the experts from Hugging Face-layout tensors: gate/up
        ``[E_logical, I, H]``, down ``[E_logical, H, I]`` (bf16/fp16/fp32); expert slot ``p`` of
        this layer computes logical expert ``physical_to_logical_map_cpu[p]`` (int ``[num_experts]``;
        None: the identity; :meth:`load_weights` may apply another one later)."""
        self._check_reload()
        logical = MoEExperts.from_tensors(gate_proj, up_proj, down_proj, quant=self.quant, group_size=self.group_size)
        self._set_experts(logical, physical_to_logical_map_cpu)

    def load_weights(self, physical_to_logical_map_cpu: torch.Tensor | None = None) -> None:
        """Load this layer's experts from ``weight_path`` unless :meth:`load_weights_from_tensors`
        loaded them (then only ``physical_to_logical_map_cpu`` is applied, see there): a Hugging
        Face safetensors checkpoint (a directory or a file; experts under
        ``model.layers.<layer_idx>.mlp`` or Mixtral's ``block_sparse_moe``, per expert or fused,
        bf16, fp16, fp32 or FP8 with block scales), packed and quantized a few experts at a time;
        or a model directory kt_jit's ``save_pretrained`` wrote, whose packed experts of this layer
        are memory-mapped (their quantization must be the method's). A map other than the identity
        keeps the experts as loaded next to the slots' copy (the memory of both). Raises
        RuntimeError without a ``weight_path``, or with forwards saved; ValueError when the layer's
        experts are not there or do not fit."""
        self._check_reload()
        if self._logical is not None:
            self._set_experts(self._logical, physical_to_logical_map_cpu)
            return
        if not self.weight_path:
            raise RuntimeError("weight_path is not set: give it to KTMoEWrapper, or call load_weights_from_tensors()")
        path = os.fspath(self.weight_path)
        packed = _packed_file(path, self.layer_idx)
        if packed is not None:
            logical = MoEExperts.load(packed)
            if logical.quant != self.quant:
                raise ValueError(f"{packed} holds experts packed as {logical.quant!r}; method {self.method} needs "
                                 f"{self.quant!r}: use that method, or load the original checkpoint")
        else:
            logical = self._from_checkpoint(path)
        self._set_experts(logical, physical_to_logical_map_cpu)

    def _from_checkpoint(self, path: str) -> MoEExperts:
        errors = []
        for module in ("mlp", "block_sparse_moe"):
            try:
                return MoEExperts.from_checkpoint(path, f"model.layers.{self.layer_idx}.{module}", quant=self.quant,
                                                  group_size=self.group_size)
            except NoExpertsError as exc:
                errors.append(str(exc))
        raise ValueError(f"layer {self.layer_idx}'s experts are not in {path}: {errors[0]} (kt-kernel's own "
                         "pre-quantized files are not read: give the original Hugging Face checkpoint)")

    def _expert_map(self, mapping: torch.Tensor | None, logical: int) -> torch.Tensor | None:
        """The expert index a ``physical_to_logical_map`` selects (None for the identity), checked
        against this layer's ``num_experts`` slots and the ``logical`` experts loaded."""
        if mapping is None:
            return None
        if (not isinstance(mapping, torch.Tensor) or mapping.dim() != 1 or mapping.dtype.is_floating_point
                or mapping.dtype == torch.bool):
            raise ValueError("physical_to_logical_map_cpu must be a 1-D integer tensor [num_experts]")
        if mapping.shape[0] != self.num_experts:
            raise ValueError(f"physical_to_logical_map_cpu has {mapping.shape[0]} entries; this layer has "
                             f"num_experts={self.num_experts} expert slots")
        mapping = mapping.to("cpu", torch.int64)
        if mapping.numel() and (int(mapping.min()) < 0 or int(mapping.max()) >= logical):
            raise ValueError(f"physical_to_logical_map_cpu holds expert ids outside [0, {logical}) (the experts "
                             "loaded)")
        if logical == self.num_experts and torch.equal(mapping, torch.arange(self.num_experts)):
            return None
        return mapping

    def _set_experts(self, logical: MoEExperts, mapping: torch.Tensor | None) -> None:
        """Make ``logical`` (the experts as loaded) the source and ``mapping`` applied to it what
        the kernels run; nothing changes when it raises."""
        got = (logical.hidden_size, logical.intermediate_size)
        if got != (self.hidden_size, self.moe_intermediate_size):
            raise ValueError(f"the loaded experts have (hidden_size, intermediate_size) = {got}; this wrapper was "
                             f"made for {(self.hidden_size, self.moe_intermediate_size)}")
        idx = self._expert_map(mapping, logical.num_experts)
        if idx is None and logical.num_experts != self.num_experts:
            raise ValueError(f"{logical.num_experts} experts were loaded for num_experts={self.num_experts} slots: "
                             "give a physical_to_logical_map_cpu that says which goes where")
        if idx is None:
            experts = logical
        elif self._map is not None and self._logical is logical and torch.equal(idx, self._map):
            experts = self.experts
        else:
            experts = MoEExperts({k: torch.index_select(v, 0, idx, out=resident_empty(
                                      (len(idx), *v.shape[1:]), v.dtype)) for k, v in logical.tensors.items()},
                                 logical.hidden_size, logical.intermediate_size, logical.quant, logical.group_size)
        self._logical, self._map, self.experts = logical, idx, experts
        self._weights_set()

    def _check_reload(self) -> None:
        """Raise before anything changes if the experts may not be replaced now."""

    def _weights_set(self) -> None:
        """Called once the experts are (re)loaded."""

    # ---- calls

    def _inputs(self, hidden_states: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor):
        """(hidden_states, expert_ids int64, weights) on the CPU and contiguous, checked against the
        configuration (their dtypes are the op's to check)."""
        if self.experts is None:
            raise RuntimeError("Weights not loaded. Call load_weights() or load_weights_from_tensors() first.")
        for name, t in (("hidden_states", hidden_states), ("expert_ids", expert_ids), ("weights", weights)):
            if not isinstance(t, torch.Tensor) or t.dim() != 2:
                raise ValueError(f"{name} must be a 2-D tensor, got "
                                 f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        qlen = hidden_states.shape[0]
        if qlen > self.chunked_prefill_size:
            raise RuntimeError(f"qlen ({qlen}) exceeds chunked_prefill_size ({self.chunked_prefill_size})")
        if expert_ids.shape[1] != self.num_experts_per_tok:
            raise ValueError(f"expert_ids has {expert_ids.shape[1]} experts per token; this wrapper was made with "
                             f"num_experts_per_tok={self.num_experts_per_tok}")
        if expert_ids.dtype.is_floating_point or expert_ids.dtype == torch.bool:
            raise ValueError(f"expert_ids must be an integer tensor, got {expert_ids.dtype}")
        return (hidden_states.to("cpu").contiguous(), expert_ids.to("cpu", torch.int64).contiguous(),
                weights.to("cpu").contiguous())

    def select_deferred_experts(self, *args, **kwargs):
        """kt-kernel's expert deferral: not in kt_jit (RuntimeError)."""
        raise RuntimeError(f"select_deferred_experts() is not available in {self.mode} mode: kt_jit computes every "
                           "routed expert in its layer (no deferral)")

    def _other_mode(self, name: str):
        """Raise the RuntimeError of a method of the other mode."""
        if self.mode == "inference":
            hint = "Use forward() instead, or create the wrapper with mode='sft'."
        else:
            hint = "Use forward_sft() instead." if name == "forward" else "Use forward_sft() and backward()."
        raise RuntimeError(f"{name}() is not available in {self.mode} mode. {hint}")


def _packed_file(path: str, layer: int) -> str | None:
    """The packed experts file of layer ``layer`` in a model directory kt_jit's save_pretrained
    wrote (None for any other path)."""
    files = packed_experts_files(path)
    if not files:
        return None
    found = [rel for name, rel in files.items() if re.search(rf"(^|\.)layers\.{layer}\.", name)]
    if len(found) != 1:
        raise ValueError(f"{path}: kt_jit's packed experts hold {len(found)} modules of layer {layer} "
                         f"({sorted(files)})")
    return os.path.join(path, found[0])


class SFTMoEWrapper(_MoEWrapperBase):
    """kt-kernel's SFT wrapper (``KTMoEWrapper(..., mode="sft")``) on :class:`~kt_jit.MoESFTOp`.

    ``init_lora_weights`` takes the six adapter tensors (bf16 CPU contiguous ones are read in place:
    an optimizer step on them is seen by the next forward; others are copied, and
    ``update_lora_weights`` copies them again) and optionally six gradient buffers of the same
    shapes, which every backward overwrites. ``forward_sft`` saves up to ``max_cache_depth``
    forwards for ``backward``, last in first out."""

    mode = "SFT"

    def __init__(self, lora_rank: int = 16, lora_alpha: float = 32.0, max_cache_depth: int = 1, **base) -> None:
        super().__init__(**base)
        lora_rank = check_int(lora_rank, "lora_rank")
        lora_alpha = check_real(lora_alpha, "lora_alpha", positive=True)
        max_cache_depth = check_int(max_cache_depth, "max_cache_depth")
        self.lora_rank, self.lora_alpha = lora_rank, lora_alpha
        self.lora_scaling = self.lora_alpha / lora_rank
        self.max_cache_depth = max_cache_depth
        self._sources: tuple[torch.Tensor, ...] | None = None  # the caller's adapter tensors
        self._grad_buffers: tuple[torch.Tensor, ...] | None = None
        self._lora: MoELoRA | None = None
        self._op: MoESFTOp | None = None
        self.grad_weights: torch.Tensor | None = None  # the router gradient of the last backward [qlen, k] fp32

    def _check_reload(self) -> None:
        if self.cache_depth:
            raise RuntimeError("the experts cannot be (re)loaded with forwards saved: run their backward() first")

    def _weights_set(self) -> None:
        self._op = MoESFTOp(self.experts, self._lora, max_cache_depth=self.max_cache_depth)

    def init_lora_weights(self, gate_lora_a: torch.Tensor, gate_lora_b: torch.Tensor, up_lora_a: torch.Tensor,
                          up_lora_b: torch.Tensor, down_lora_a: torch.Tensor, down_lora_b: torch.Tensor,
                          *grad_buffers: torch.Tensor) -> None:
        """The six adapters: A ``[E, r, in]``, B ``[E, out, r]`` (gate/up in = H, out = I; down
        in = I, out = H), any float dtype, on any device; then optionally six gradient buffers of the
        same shapes (bf16 CPU contiguous, each apart from the others and the adapters) that each
        backward overwrites: written by the kernels themselves when the rank is one they run at (16
        or a multiple of 32) and the buffers are 64-byte aligned (as torch allocates), else copied
        into. Between backwards, change them only through torch (a version-counted in-place op, as
        ``zero_()``) or not at all: a backward zeroes only the idle experts it wrote last time while
        their version counters have not moved. Raises ValueError for a shape that does not fit the
        wrapper, or buffers sharing memory."""
        if len(grad_buffers) not in (0, 6):
            raise ValueError(f"init_lora_weights takes 6 adapter tensors and optionally 6 gradient buffers, got "
                             f"{6 + len(grad_buffers)} tensors")
        shapes = lora_shapes(self.num_experts, self.hidden_size, self.moe_intermediate_size, self.lora_rank)
        sources = (gate_lora_a, gate_lora_b, up_lora_a, up_lora_b, down_lora_a, down_lora_b)
        for name, t in zip(LORA_NAMES, sources, strict=True):
            _check_tensor(name, t, shapes[name])
            if not t.dtype.is_floating_point:
                raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
        for name, t in zip(LORA_NAMES, grad_buffers, strict=False):
            _check_tensor(f"grad_{name}", t, shapes[name])
            if t.dtype != torch.bfloat16 or not t.is_cpu or not t.is_contiguous():
                raise ValueError(f"grad_{name} must be a contiguous bfloat16 CPU tensor, got {t.dtype} on {t.device}")
            if t.is_inference():  # (its version counter tells what the last backward wrote is still there)
                raise ValueError(f"grad_{name} was created under torch.inference_mode(): create the gradient "
                                 "buffers outside it")
        if self.cache_depth:
            raise RuntimeError("init_lora_weights() with forwards saved: run their backward() first")
        # (a bf16 CPU contiguous tensor is itself here: the kernels read the caller's storage)
        storage = tuple(src.detach().to("cpu", torch.bfloat16).contiguous() for src in sources)
        if grad_buffers:  # (the backward writes them while it reads the adapters)
            clash = _overlapping({**{f"grad_{n}": t for n, t in zip(LORA_NAMES, grad_buffers, strict=True)},
                                  **dict(zip(LORA_NAMES, storage, strict=True))})
            if clash:
                raise ValueError(f"{clash[0]} and {clash[1]} share memory: each gradient buffer must be a tensor of "
                                 "its own, apart from the adapters and the other buffers")
        lora = MoELoRA(self.num_experts, self.hidden_size, self.moe_intermediate_size, self.lora_rank,
                       self.lora_alpha, storage=storage).requires_grad_(False)
        if grad_buffers and kernel_rank(self.lora_rank) == self.lora_rank and all(
                t.data_ptr() % 64 == 0 for t in grad_buffers):
            lora.grad_buffers.adopt(grad_buffers)  # each backward writes them (else: copied into them)
        self._sources, self._grad_buffers, self._lora = sources, grad_buffers or None, lora
        if self._op is not None:
            self._op.lora = lora

    def update_lora_weights(self) -> None:
        """Make the next forward use the adapters' current values: a no-op for the tensors read in
        place, a copy for the others."""
        if self._lora is None:
            raise RuntimeError("LoRA weights not initialized. Call init_lora_weights() first.")
        with torch.no_grad():
            for name, src in zip(LORA_NAMES, self._sources, strict=True):
                param = getattr(self._lora, name)
                if param.data_ptr() != src.data_ptr():
                    param.copy_(src.detach())

    def forward_sft(self, hidden_states: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
                    save_for_backward: bool = True) -> torch.Tensor:
        """Output ``[qlen, H]`` in hidden_states' dtype and device (bf16 input: rounded once from the
        fp32 sums) of ``hidden_states [qlen, H]``, ``expert_ids [qlen, k]`` (any integer dtype) and
        ``weights [qlen, k]``; with ``save_for_backward`` what the backward needs is kept (RuntimeError
        when ``max_cache_depth`` forwards are kept already, or without adapters)."""
        x, ids, w = self._inputs(hidden_states, expert_ids, weights)
        if save_for_backward and self._lora is None:
            raise RuntimeError("LoRA weights not initialized. Call init_lora_weights() first, or set "
                               "save_for_backward=False.")
        out_dtype = torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32
        if save_for_backward:
            # the saved forward keeps x and w, which the caller may refill (as with kt-kernel): converted
            # here to what the kernels read (the dtypes the op takes; it names the others), copied only
            # when that is still the caller's tensor
            x = _own(contiguous_as(x, torch.bfloat16) if x.dtype in FLOAT_DTYPES else x, hidden_states)
            w = _own(contiguous_as(w, torch.float32) if w.dtype in FLOAT_DTYPES else w, weights)
        out = self._op.forward(x, ids, w, save_for_backward=save_for_backward, out_dtype=out_dtype)
        return out.to(hidden_states.device, hidden_states.dtype)

    def backward(self, grad_output: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Gradients of the newest saved forward: ``(grad_input [qlen, H]`` in grad_output's dtype and
        device, ``{"grad_gate_lora_a": ..., ..., "grad_down_lora_b": ...}`` bf16 in the adapters'
        shapes``)``; the router gradient ``[qlen, k]`` fp32 is left in :attr:`grad_weights`. With
        gradient buffers given to :meth:`init_lora_weights` the same values are written into them
        (and those are returned)."""
        if self._op is None or self._op.cache_depth == 0:
            raise RuntimeError("No forward cache available. Call forward_sft() with save_for_backward=True first.")
        if self._lora is None:
            raise RuntimeError("LoRA weights not initialized. Call init_lora_weights() first.")
        if not isinstance(grad_output, torch.Tensor):
            raise ValueError(f"grad_output must be a tensor, got {type(grad_output).__name__}")
        dx_dtype = grad_output.dtype if grad_output.dtype in (torch.float32, torch.bfloat16) else torch.bfloat16
        grads = self._op.backward(grad_output.to("cpu"), dx_dtype=dx_dtype)
        self.grad_weights = grads["grad_weights"]
        loras = {f"grad_{n}": grads[n] for n in LORA_NAMES}
        if self._grad_buffers is not None:
            for buf, name in zip(self._grad_buffers, LORA_NAMES, strict=True):
                if grads[name].data_ptr() != buf.data_ptr():  # (not adopted: a rank the kernels pad, unaligned)
                    buf.copy_(grads[name])
                loras[f"grad_{name}"] = buf
        return grads["grad_input"].to(grad_output.device, grad_output.dtype), loras

    @property
    def cache_depth(self) -> int:
        """Forwards saved and not yet consumed by a backward."""
        return self._op.cache_depth if self._op is not None else 0

    forward, submit_forward, sync_forward = map(_unavailable, ("forward", "submit_forward", "sync_forward"))


def _check_tensor(name: str, t: object, shape: tuple[int, ...]) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} shape mismatch: expected {tuple(shape)}, got {tuple(t.shape)}")


class InferenceMoEWrapper(_MoEWrapperBase):
    """kt-kernel's inference wrapper (``KTMoEWrapper(..., mode="inference")``): ``forward`` and
    ``submit_forward`` / ``sync_forward`` (one call in flight, run on a worker thread so the caller
    can do other work meanwhile; kt_jit's kernels release the GIL)."""

    mode = "inference"

    def __init__(self, **base) -> None:
        super().__init__(**base)
        self._pool: ThreadPoolExecutor | None = None
        self._pending: Future | None = None
        self._lock = threading.Lock()

    def forward(self, hidden_states: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                cuda_stream: int | None = None) -> torch.Tensor:
        """Output ``[qlen, H]`` in hidden_states' dtype and device for ``hidden_states [qlen, H]``,
        ``topk_ids [qlen, k]`` and ``topk_weights [qlen, k]`` (``cuda_stream`` is not used)."""
        return self._forward(*self._inputs(hidden_states, topk_ids, topk_weights), hidden_states.device,
                             hidden_states.dtype)

    def _forward(self, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, device: torch.device,
                 dtype: torch.dtype) -> torch.Tensor:
        with torch.no_grad():
            out = moe_sft(x, ids, w, self.experts,
                          out_dtype=torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32)
        return out.to(device, dtype)

    def submit_forward(self, hidden_states: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                       cuda_stream: int | None = None) -> None:
        """Start :meth:`forward` on a worker thread; :meth:`sync_forward` returns its output. The
        inputs are checked now (the errors are raised here); one call may be in flight."""
        x, ids, w = self._inputs(hidden_states, topk_ids, topk_weights)
        x, ids, w = _own(x, hidden_states), _own(ids, topk_ids), _own(w, topk_weights)
        with self._lock:  # (copies: the caller may refill its buffers before sync_forward, as with kt-kernel)
            if self._pending is not None:
                raise RuntimeError("a submitted forward is in flight: call sync_forward() first")
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="kt_jit_wrapper")
            self._pending = self._pool.submit(self._forward, x, ids, w, hidden_states.device, hidden_states.dtype)

    def sync_forward(self, hidden_states: torch.Tensor | None = None, cuda_stream: int | None = None) -> torch.Tensor:
        """The output of the forward :meth:`submit_forward` started (waits for it)."""
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is None:
            raise RuntimeError("no forward was submitted: call submit_forward() first")
        return pending.result()

    forward_sft, backward, init_lora_weights, update_lora_weights = map(
        _unavailable, ("forward_sft", "backward", "init_lora_weights", "update_lora_weights"))

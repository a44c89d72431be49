"""Hugging Face transformers integration: a model's routed experts run on kt_jit, with LoRA.

transformers 5 stores the routed experts of its MoE models (Qwen2/3-MoE, Mixtral, DeepSeek-V2/V3,
GLM-4-MoE, OLMoE, ...) in one module per layer holding ``gate_up_proj [E, 2I, H]`` (gate rows
first) and ``down_proj [E, H, I]``, called as ``experts(hidden_states [T, H], top_k_index [T, K],
top_k_weights [T, K])`` after the model's own router. :func:`patch_experts` swaps each such module
for a :class:`KTJitExperts` with the same call: the weights are packed once (or quantized), the
originals are dropped, and a :class:`~kt_jit.MoELoRA` adapter per layer is the only trainable part.
The router, attention and shared experts stay ordinary PyTorch modules (PEFT can adapt them), and
gradients reach the router through ``top_k_weights``.

Nothing here imports transformers: modules are recognised by their structure.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..api import moe_sft
from ..moe.weights import QUANT_MODES, MoEExperts, MoELoRA

_SILU = ("SiLU", "SiLUActivation", "silu")  # nn.SiLU, transformers' ACT2FN["silu"], F.silu
_FLOATS = (torch.bfloat16, torch.float16, torch.float32)


def is_experts_module(module: nn.Module) -> bool:
    """Whether ``module`` looks like a transformers routed-experts module: 3-D ``gate_up_proj`` and
    ``down_proj`` Parameters (supported or not, see :func:`unsupported_reason`)."""
    if isinstance(module, KTJitExperts):
        return False
    gu, dn = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return isinstance(gu, torch.Tensor) and isinstance(dn, torch.Tensor) and gu.dim() == 3 and dn.dim() == 3


def _dims(module: nn.Module) -> tuple[int, int, int]:
    """(E, H, I) of an experts module, from ``down_proj`` ([E, H, I], or [E, I, H] when transposed)."""
    e, a, b = module.down_proj.shape
    return (e, b, a) if getattr(module, "is_transposed", False) else (e, a, b)


def unsupported_reason(module: nn.Module) -> str | None:
    """Why an experts module cannot run on kt_jit (None if it can): kt_jit computes
    ``down(SiLU(gate(x)) * up(x))`` without biases, H and I multiples of 32."""
    if module.gate_up_proj.dtype not in _FLOATS or module.down_proj.dtype not in _FLOATS:
        return f"its weights are {module.gate_up_proj.dtype} (dequantize them to bf16/fp16/fp32 first)"
    if getattr(module, "has_bias", False) or any(getattr(module, b, None) is not None
                                                for b in ("gate_up_proj_bias", "down_proj_bias")):
        return "its experts have biases"
    if not getattr(module, "has_gate", True):
        return "it has no gate projection"
    if not getattr(module, "is_concatenated", True):
        return "its gate and up rows are interleaved"
    if getattr(module, "has_post_expert_norm", False):
        return "it normalises each expert's output"
    gate = getattr(type(module), "_apply_gate", None)
    if gate is not None and getattr(gate, "__name__", "") != "_default_apply_gate":
        return f"it gates with its own {type(module).__name__}._apply_gate"
    act = getattr(module, "act_fn", None)
    act_name = act.__name__ if act is torch.nn.functional.silu else type(act).__name__
    if act_name not in _SILU:
        return f"its activation is {act_name}, kt_jit computes SiLU(gate) * up"
    e, h, i = _dims(module)
    gu_shape = (e, h, 2 * i) if getattr(module, "is_transposed", False) else (e, 2 * i, h)
    if tuple(module.gate_up_proj.shape) != gu_shape:
        return f"gate_up_proj has shape {tuple(module.gate_up_proj.shape)}, expected {gu_shape}"
    if h % 32 or i % 32:
        return f"hidden size {h} and expert intermediate size {i} must be multiples of 32"
    return None


def skeleton_of(module: nn.Module) -> nn.Module:
    """A meta-device copy of a transformers experts module: its class, attributes, flags, training
    mode and its parameters' dtypes and ``requires_grad``, without their storage (what
    :meth:`KTJitExperts.to_hf` rebuilds the module from)."""
    skeleton = copy.copy(module)
    skeleton._parameters = {k: None if p is None else nn.Parameter(torch.empty_like(p, device="meta"),
                                                                   requires_grad=p.requires_grad)
                            for k, p in module._parameters.items()}
    skeleton._buffers = {k: None if b is None else torch.empty_like(b, device="meta")
                         for k, b in module._buffers.items()}
    return skeleton


class KTJitExperts(nn.Module):
    """Routed experts on kt_jit with the transformers call: ``forward(hidden_states [..., H],
    top_k_index [T, K], top_k_weights [T, K]) -> [..., H]`` in hidden_states' dtype.

    ``experts`` holds the packed (frozen) weights; ``lora`` (a submodule, or None) the trainable
    adapters, read on every call (assigning another adapter, or None, takes effect at once). With
    gradients enabled the call is :func:`kt_jit.moe_sft` (gradients for the input, the routing
    weights and the adapters); without (``torch.no_grad()``, inference, or nothing requiring a
    gradient) it saves no activations. The experts compute in bf16 whatever the model's dtype;
    the adapters must stay bf16 (do not cast the patched model with ``.float()``/``.half()``).
    """

    def __init__(self, experts: MoEExperts, lora: MoELoRA | None = None, hf_origin: nn.Module | None = None) -> None:
        super().__init__()
        if lora is not None:
            lora.check_matches(experts)
        self.experts = experts
        self.lora = lora
        # the :func:`skeleton_of` the transformers module this replaced (None: made without one); set
        # past nn.Module.__setattr__ so that it is not a submodule (no parameters, no state_dict keys)
        object.__setattr__(self, "hf_origin", hf_origin)

    @classmethod
    def from_hf(cls, module: nn.Module, rank: int = 16, alpha: float = 32.0, quant: str = "bf16",
                group_size: int = 128, lora: bool = True) -> KTJitExperts:
        """Pack (or quantize, ``quant`` as in :meth:`kt_jit.MoEExperts.from_tensors`) the weights of a
        transformers experts module and attach a fresh LoRA adapter (``lora=False``: none). The
        module is left unchanged; drop it to free its weights."""
        why = unsupported_reason(module) if is_experts_module(module) else "it is not a routed-experts module"
        if why:
            raise ValueError(f"{type(module).__name__} cannot run on kt_jit: {why}")
        e, h, i = _dims(module)
        with torch.no_grad():
            gu, down = module.gate_up_proj.detach(), module.down_proj.detach()
            if getattr(module, "is_transposed", False):
                gu, down = gu.transpose(1, 2), down.transpose(1, 2)
            experts = MoEExperts.from_tensors(gu[:, :i].contiguous(), gu[:, i:].contiguous(), down.contiguous(),
                                              quant=quant, group_size=group_size)
        new = cls(experts, MoELoRA(e, h, i, rank, alpha) if lora else None, skeleton_of(module))
        return new.train(module.training)

    def _merged_chunks(self, merge_lora: bool, step: int = 8):
        """``(experts slice, gate, up, down)`` in fp32 a few experts at a time: the weights the kernels
        compute with (dequantized), plus ``scaling * B @ A`` of the adapter when ``merge_lora``."""
        ex, lora = self.experts, (self.lora if merge_lora else None)
        for e0 in range(0, ex.num_experts, step):
            sl = slice(e0, min(ex.num_experts, e0 + step))
            part = MoEExperts({k: v[sl] for k, v in ex.tensors.items()}, ex.hidden_size, ex.intermediate_size,
                              ex.quant, ex.group_size)
            ws = [w.float() for w in part.dequantize()]
            if lora is not None:
                t = [x[sl].float() for x in lora.tensors()]
                with torch.no_grad():
                    for w, (a, b) in zip(ws, ((0, 1), (2, 3), (4, 5)), strict=True):
                        w += lora.scaling * torch.bmm(t[b], t[a])
            yield sl, ws[0], ws[1], ws[2]

    def merged_weights(self, merge_lora: bool = True,
                       dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(gate [E, I, H], up [E, I, H], down [E, H, I])`` in ``dtype``: the weights the kernels
        compute with (quantized experts dequantized; bf16 experts are the model's weights rounded to
        bf16 when it was patched), plus the adapter's ``scaling * B @ A`` unless ``merge_lora=False``
        (summed in fp32, a few experts at a time, rounded once)."""
        e, h, i = self.experts.num_experts, self.experts.hidden_size, self.experts.intermediate_size
        gate, up, down = torch.empty(e, i, h, dtype=dtype), torch.empty(e, i, h, dtype=dtype), \
            torch.empty(e, h, i, dtype=dtype)
        for sl, g, u, d in self._merged_chunks(merge_lora):
            gate[sl], up[sl], down[sl] = g, u, d
        return gate, up, down

    def to_hf(self, merge_lora: bool = True) -> nn.Module:
        """The transformers experts module this replaced, rebuilt with :meth:`merged_weights` (LoRA
        merged unless ``merge_lora=False``) in its original dtypes, layout, ``requires_grad`` and
        training mode: e.g. to save a fine-tuned model with ``save_pretrained``. The weights are
        written a few experts at a time into the new parameters (peak: the layer in its original
        dtype plus a chunk in fp32)."""
        if self.hf_origin is None:
            raise ValueError("this KTJitExperts was not made from a transformers module (no hf_origin)")
        skeleton = self.hf_origin
        transposed = getattr(skeleton, "is_transposed", False)
        e, h, i = self.experts.num_experts, self.experts.hidden_size, self.experts.intermediate_size
        gu = torch.empty((e, h, 2 * i) if transposed else (e, 2 * i, h), dtype=skeleton.gate_up_proj.dtype)
        down = torch.empty((e, i, h) if transposed else (e, h, i), dtype=skeleton.down_proj.dtype)
        for sl, g, u, d in self._merged_chunks(merge_lora):
            if transposed:
                gu[sl, :, :i], gu[sl, :, i:], down[sl] = g.transpose(1, 2), u.transpose(1, 2), d.transpose(1, 2)
            else:
                gu[sl, :i], gu[sl, i:], down[sl] = g, u, d
        module = copy.copy(skeleton)  # (its other attributes and submodules are shared, as they were)
        module._parameters = dict(skeleton._parameters)
        module.gate_up_proj = nn.Parameter(gu, requires_grad=skeleton.gate_up_proj.requires_grad)
        module.down_proj = nn.Parameter(down, requires_grad=skeleton.down_proj.requires_grad)
        return module

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1]).contiguous()
        ids = top_k_index.reshape(-1, top_k_index.shape[-1]).long().contiguous()
        w = top_k_weights.reshape(ids.shape).contiguous()
        out_dtype = torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32
        # (with nothing to differentiate moe_sft saves no activations)
        out = moe_sft(x, ids, w, self.experts, self.lora, out_dtype)
        return out.to(hidden_states.dtype).reshape(shape)

    def extra_repr(self) -> str:
        return repr(self.experts)


def patch_experts(model: nn.Module, rank: int = 16, alpha: float = 32.0, quant: str = "bf16",
                  group_size: int = 128, lora: bool = True) -> dict[str, KTJitExperts]:
    """Replace every routed-experts module of a transformers model in place by a
    :class:`KTJitExperts` (packed weights, a fresh rank-``rank`` LoRA adapter each unless
    ``lora=False``) and return them by module name. The original expert weights are released
    (unless referenced elsewhere, e.g. by an optimizer built before the call).

    ``model.save_pretrained`` then writes kt_jit's packed checkpoint
    (:func:`kt_jit.integrations.hf_saving.save_pretrained`; :func:`unpatch_experts` restores
    transformers' own). Raises ValueError, before changing anything, when the model has no experts
    module or when one cannot run on kt_jit (biases, another activation or gating, sizes not
    multiples of 32).
    """
    names = [name for name, m in model.named_modules() if is_experts_module(m)]
    if not names:
        raise ValueError(f"{type(model).__name__} has no routed-experts module (transformers >= 5 experts "
                         "with 3-D gate_up_proj [E, 2I, H] and down_proj [E, H, I] Parameters)")
    problems = [f"{name} ({type(m).__name__}): {why}" for name in names
                if (why := _patch_problem(m := model.get_submodule(name), rank, quant, group_size, lora))]
    if problems:
        raise ValueError("these experts modules cannot run on kt_jit: " + "; ".join(problems))
    replaced = {}
    for name in names:  # one layer at a time: its original weights are freed before the next is packed
        parent, _, attr = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        new = KTJitExperts.from_hf(getattr(owner, attr), rank, alpha, quant, group_size, lora)
        setattr(owner, attr, new)
        replaced[name] = new
    from .hf_saving import install_save  # (it imports this module)

    install_save(model)
    return replaced


def _patch_problem(module: nn.Module, rank: int, quant: str, group_size: int, lora: bool) -> str | None:
    """:func:`unsupported_reason`, plus the arguments' checks that packing and MoELoRA would make
    (so that patch_experts fails before it changes anything)."""
    why = unsupported_reason(module)
    if why:
        return why
    if quant not in QUANT_MODES:
        return f"quant={quant!r} is not one of {tuple(QUANT_MODES)}"
    _, h, i = _dims(module)
    if "kgroup" in quant and (group_size <= 0 or group_size % 32 or h % group_size or i % group_size):
        return f"group_size={group_size} must be a multiple of 32 dividing H={h} and I={i}"
    if lora and rank < 1:
        return f"LoRA rank must be >= 1, got {rank}"
    return None


def unpatch_experts(model: nn.Module, merge_lora: bool = True) -> dict[str, nn.Module]:
    """Replace every :class:`KTJitExperts` of ``model`` in place by the transformers module it
    replaced (:meth:`KTJitExperts.to_hf`: adapters merged into the weights unless
    ``merge_lora=False``), one layer at a time, and return the new modules by name. The model is
    then a plain transformers model again (``save_pretrained`` works, also for a model loaded
    through :func:`kt_jit.integrations.hf_loading.from_pretrained`). Its experts are back in full
    precision: the memory of the plain model. Nothing changes unless every module can be rebuilt."""
    names = [name for name, m in model.named_modules() if isinstance(m, KTJitExperts)]
    if not names:
        raise ValueError(f"{type(model).__name__} has no KTJitExperts module to unpatch")
    orphans = [name for name in names if model.get_submodule(name).hf_origin is None]
    if orphans:
        raise ValueError(f"these KTJitExperts were not made from transformers modules, nothing to restore: {orphans}")
    restored = {}
    for name in names:
        parent, _, attr = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        restored[name] = getattr(owner, attr).to_hf(merge_lora)
        setattr(owner, attr, restored[name])
    from .hf_saving import uninstall_save

    for m in model.modules():  # (loaded by hf_loading: a plain model again; also inside wrappers)
        uninstall_save(m)
        quantizer = m.__dict__.get("hf_quantizer")
        if quantizer is not None and getattr(quantizer.quantization_config, "quant_method", None) == "kt_jit":
            quantizer.remove_quantization_config(m)
    return restored


def moe_lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The LoRA Parameters of every :class:`KTJitExperts` in ``model`` (for an optimizer)."""
    return [p for m in model.modules() if isinstance(m, KTJitExperts) and m.lora is not None
            for p in m.lora.parameters()]

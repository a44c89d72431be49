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

import torch
from torch import nn

from ..api import MoESFTOp, moe_sft
from ..moe.weights import MoEExperts, MoELoRA

_SILU = ("SiLU", "SiLUActivation")  # torch.nn.SiLU and transformers' ACT2FN["silu"]


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
    if getattr(module, "has_bias", False) or getattr(module, "gate_up_proj_bias", None) is not None:
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
    if type(act).__name__ not in _SILU:
        return f"its activation is {type(act).__name__}, kt_jit computes SiLU(gate) * up"
    e, h, i = _dims(module)
    gu_shape = (e, h, 2 * i) if getattr(module, "is_transposed", False) else (e, 2 * i, h)
    if tuple(module.gate_up_proj.shape) != gu_shape:
        return f"gate_up_proj has shape {tuple(module.gate_up_proj.shape)}, expected {gu_shape}"
    if h % 32 or i % 32:
        return f"hidden size {h} and expert intermediate size {i} must be multiples of 32"
    return None


class KTJitExperts(nn.Module):
    """Routed experts on kt_jit with the transformers call: ``forward(hidden_states [..., H],
    top_k_index [T, K], top_k_weights [T, K]) -> [..., H]`` in hidden_states' dtype.

    ``experts`` holds the packed (frozen) weights; ``lora`` (a submodule, or None) the trainable
    adapters. With gradients enabled the call is :func:`kt_jit.moe_sft` (gradients for the input,
    the routing weights and the adapters); without (``torch.no_grad()``, inference, or nothing
    requiring a gradient) it saves no activations.
    """

    def __init__(self, experts: MoEExperts, lora: MoELoRA | None = None) -> None:
        super().__init__()
        if lora is not None:
            lora.check_matches(experts)
        self.experts = experts
        self.lora = lora
        self._op = MoESFTOp(experts, lora)

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
        return cls(experts, MoELoRA(e, h, i, rank, alpha) if lora else None)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1]).contiguous()
        ids = top_k_index.reshape(x.shape[0], -1).long().contiguous()
        w = top_k_weights.reshape(ids.shape).contiguous()
        out_dtype = torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32
        trainable = self.lora is not None and any(p.requires_grad for p in self.lora.parameters())
        if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or trainable):
            out = moe_sft(x, ids, w, self.experts, self.lora, out_dtype)
        else:
            out = self._op.forward(x, ids, w, save_for_backward=False, out_dtype=out_dtype)
        return out.to(hidden_states.dtype).reshape(shape)

    def extra_repr(self) -> str:
        return repr(self.experts)


def patch_experts(model: nn.Module, rank: int = 16, alpha: float = 32.0, quant: str = "bf16",
                  group_size: int = 128, lora: bool = True) -> dict[str, KTJitExperts]:
    """Replace every routed-experts module of a transformers model in place by a
    :class:`KTJitExperts` (packed weights, a fresh rank-``rank`` LoRA adapter each unless
    ``lora=False``) and return them by module name. The original expert weights are released
    (unless referenced elsewhere, e.g. by an optimizer built before the call).

    Raises ValueError, before changing anything, when the model has no experts module or when one
    cannot run on kt_jit (biases, another activation or gating, sizes not multiples of 32).
    """
    found = [(name, m) for name, m in model.named_modules() if is_experts_module(m)]
    if not found:
        raise ValueError(f"{type(model).__name__} has no routed-experts module (transformers >= 5 experts "
                         "with 3-D gate_up_proj [E, 2I, H] and down_proj [E, H, I] Parameters)")
    problems = [f"{name} ({type(m).__name__}): {why}" for name, m in found if (why := unsupported_reason(m))]
    if problems:
        raise ValueError("these experts modules cannot run on kt_jit: " + "; ".join(problems))
    replaced = {}
    for name, m in found:
        new = KTJitExperts.from_hf(m, rank, alpha, quant, group_size, lora)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new)
        replaced[name] = new
    return replaced


def moe_lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The LoRA Parameters of every :class:`KTJitExperts` in ``model`` (for an optimizer)."""
    return [p for m in model.modules() if isinstance(m, KTJitExperts) and m.lora is not None
            for p in m.lora.parameters()]

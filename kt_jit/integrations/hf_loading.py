"""Loading a transformers model with its routed experts packed while the checkpoint is read.

``from_pretrained(path, quant=...)`` runs transformers' own ``from_pretrained`` with a kt_jit
quantization config: transformers builds the model on the meta device and converts each layer's
checkpoint tensors (per-expert keys merged into ``gate_up_proj [E, 2I, H]`` / ``down_proj``) one
parameter at a time; kt_jit packs (or quantizes) each such parameter as it arrives and keeps only
the packed form, and once loading is done swaps every experts module for a
:class:`~kt_jit.integrations.hf.KTJitExperts` with a fresh LoRA adapter. The bf16 experts of the
whole model are never in memory at once (with ``patch_experts`` after a plain ``from_pretrained``
they are: 57 GB for Qwen3-30B-A3B).

This goes through transformers' quantizer hooks (``HfQuantizer``, registered under the name
"kt_jit"), so it needs transformers >= 5 and imports it on first use.
"""

from __future__ import annotations

import os

import torch

from ..moe.weights import QUANT_MODES, MoEExperts, MoELoRA, pack_expert_matrix
from .hf import KTJitExperts, _dims, _patch_problem, is_experts_module, skeleton_of


def _classes() -> tuple[type, type]:
    """(KTJitConfig, KTJitQuantizer), defined and registered with transformers once per process
    (a reloaded module finds them in transformers' registry)."""
    from transformers.core_model_loading import ConversionOps
    from transformers.quantizers.auto import (
        AUTO_QUANTIZATION_CONFIG_MAPPING,
        AUTO_QUANTIZER_MAPPING,
        register_quantization_config,
        register_quantizer,
    )

    if "kt_jit" in AUTO_QUANTIZATION_CONFIG_MAPPING and "kt_jit" in AUTO_QUANTIZER_MAPPING:
        return AUTO_QUANTIZATION_CONFIG_MAPPING["kt_jit"], AUTO_QUANTIZER_MAPPING["kt_jit"]
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    class KTJitConfig(QuantizationConfigMixin):
        """transformers quantization config: routed experts packed by kt_jit (``quant`` as in
        :meth:`kt_jit.MoEExperts.from_tensors`), each with a LoRA adapter unless ``lora=False``."""

        def __init__(self, quant: str = "bf16", group_size: int = 128, rank: int = 16, alpha: float = 32.0,
                     lora: bool = True, **kwargs) -> None:
            self.quant_method = "kt_jit"
            self.quant, self.group_size, self.rank, self.alpha, self.lora = quant, group_size, rank, alpha, lora

    class _PackOnLoad(ConversionOps):
        """Packs an experts parameter as transformers hands it over (after merging the per-expert
        checkpoint tensors); the module keeps the packed tensors, the parameter an empty stub."""

        def __init__(self, quantizer) -> None:
            self.quantizer = quantizer

        def convert(self, input_dict, source_patterns=None, target_patterns=None, model=None, **kwargs):
            cfg = self.quantizer.quantization_config
            out = {}
            for name, value in input_dict.items():
                w = value[0] if isinstance(value, list) else value
                module_name, _, param = name.rpartition(".")
                module = model.get_submodule(module_name)
                expected = tuple(getattr(module, param).shape)  # the meta parameter's
                if tuple(w.shape) != expected:
                    # reported after loading: an exception here would make transformers allocate and
                    # initialise a full-size replacement first
                    self.quantizer.errors.append(f"{name}: the checkpoint gives {tuple(w.shape)}, the model "
                                                 f"expects {expected}")
                else:
                    part = "gate_up" if param == "gate_up_proj" else "down"
                    packed = pack_expert_matrix(w, part, cfg.quant, cfg.group_size,
                                                transposed=getattr(module, "is_transposed", False))
                    self.quantizer.packed.setdefault(module_name, {}).update(packed)
                out[name] = torch.empty(0, dtype=w.dtype)  # the full-precision copy is dropped here
            return out

    class KTJitQuantizer(HfQuantizer):
        requires_calibration = False

        def __init__(self, quantization_config, **kwargs) -> None:
            super().__init__(quantization_config, **kwargs)
            self.experts: dict[str, tuple[int, int, int]] = {}  # module name -> (E, H, I)
            self.packed: dict[str, dict[str, torch.Tensor]] = {}
            self.errors: list[str] = []

        def validate_environment(self, *args, **kwargs) -> None:
            dm = kwargs.get("device_map")
            places = set(dm.values()) if isinstance(dm, dict) else {dm}
            if not places <= {None, "cpu", torch.device("cpu")}:
                raise ValueError(f"kt_jit runs the experts on the CPU: device_map={dm!r} is not supported "
                                 "(load on the CPU, then move the other modules yourself)")

        def _process_model_before_weight_loading(self, model, **kwargs) -> None:
            cfg = self.quantization_config
            found = {name: m for name, m in model.named_modules() if is_experts_module(m)}
            if not found:
                raise ValueError(f"{type(model).__name__} has no routed-experts module for kt_jit to pack")
            problems = [f"{name} ({type(m).__name__}): {why}" for name, m in found.items()
                        if (why := _patch_problem(m, cfg.rank, cfg.quant, cfg.group_size, cfg.lora))]
            if problems:
                raise ValueError("these experts modules cannot run on kt_jit: " + "; ".join(problems))
            self.experts = {name: _dims(m) for name, m in found.items()}

        def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
            module_name, _, param = param_name.rpartition(".")
            return param in ("gate_up_proj", "down_proj") and module_name in self.experts

        def get_quantize_ops(self):
            return _PackOnLoad(self)

        def _process_model_after_weight_loading(self, model, **kwargs):
            cfg = self.quantization_config
            if self.errors:
                raise ValueError("the checkpoint does not match the model's experts: " + "; ".join(self.errors))
            grouped = QUANT_MODES[cfg.quant][1]
            for name, (e, h, i) in self.experts.items():
                tensors = self.packed.pop(name, {})
                if "gate_up" not in tensors or "down" not in tensors:
                    raise ValueError(f"{name}: the checkpoint did not provide its expert weights")
                experts = MoEExperts(tensors, h, i, cfg.quant, cfg.group_size if grouped else 0)
                parent, _, attr = name.rpartition(".")
                lora = MoELoRA(e, h, i, cfg.rank, cfg.alpha) if cfg.lora else None
                owner = model.get_submodule(parent) if parent else model
                # (its parameters are the stubs _PackOnLoad left, in the dtype the weights loaded in)
                skeleton = skeleton_of(getattr(owner, attr))
                setattr(owner, attr, KTJitExperts(experts, lora, skeleton).train(owner.training))
            return model

        def is_serializable(self, safe_serialization=None) -> bool:
            return False

        @property
        def is_trainable(self) -> bool:
            return True

        @property
        def is_qat_trainable(self) -> bool:
            # the LoRA adapters train; transformers' Trainer otherwise refuses a "purely quantized" model
            return True

    if "kt_jit" not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config("kt_jit")(KTJitConfig)
    if "kt_jit" not in AUTO_QUANTIZER_MAPPING:
        register_quantizer("kt_jit")(KTJitQuantizer)
    return AUTO_QUANTIZATION_CONFIG_MAPPING["kt_jit"], AUTO_QUANTIZER_MAPPING["kt_jit"]


def kt_jit_config(quant: str = "bf16", group_size: int = 128, rank: int = 16, alpha: float = 32.0,
                  lora: bool = True):
    """A transformers ``quantization_config`` for ``AutoModel*.from_pretrained``: the routed experts
    are packed (or quantized) by kt_jit while the checkpoint loads (see the module docstring)."""
    if quant not in QUANT_MODES:
        raise ValueError(f"quant must be one of {tuple(QUANT_MODES)}, got {quant!r}")
    return _classes()[0](quant=quant, group_size=group_size, rank=rank, alpha=alpha, lora=lora)


def from_pretrained(path: str | os.PathLike, quant: str = "bf16", group_size: int = 128, rank: int = 16,
                    alpha: float = 32.0, lora: bool = True, model_class=None, **kwargs):
    """``model_class.from_pretrained(path, ...)`` (default ``AutoModelForCausalLM``, bf16) with every
    routed-experts module packed on load into a :class:`KTJitExperts` (a rank-``rank`` adapter each
    unless ``lora=False``). Other keyword arguments go to transformers. Raises ValueError when
    the model has no experts module or one cannot run on kt_jit."""
    if model_class is None:
        from transformers import AutoModelForCausalLM as model_class
    if "quantization_config" in kwargs:
        raise ValueError("from_pretrained sets quantization_config itself (kt_jit packs the experts)")
    if "dtype" not in kwargs and "torch_dtype" not in kwargs:
        kwargs["dtype"] = torch.bfloat16
    return model_class.from_pretrained(path, quantization_config=kt_jit_config(quant, group_size, rank, alpha, lora),
                                       **kwargs)

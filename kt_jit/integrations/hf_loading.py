"""Loading a transformers model with its routed experts packed while the checkpoint is read.

``from_pretrained(path, quant=...)`` runs transformers' own ``from_pretrained`` with a kt_jit
quantization config: transformers builds the model on the meta device and converts each layer's
checkpoint tensors (per-expert keys merged into ``gate_up_proj [E, 2I, H]`` / ``down_proj``) one
parameter at a time; kt_jit packs (or quantizes) each such parameter as it arrives and keeps only
the packed form, and once loading is done swaps every experts module for a
:class:`~kt_jit.integrations.hf.KTJitExperts` with a fresh LoRA adapter. The bf16 experts of the
whole model are never in memory at once (with ``patch_experts`` after a plain ``from_pretrained``
they are: 57 GB for Qwen3-30B-A3B).

FP8 checkpoints with block scales (DeepSeek-V3/R1, Qwen3-FP8: ``quant_method "fp8"`` in
``config.json``) load too, without accelerate or a GPU: kt_jit's quantizer then takes the place of
transformers' FP8 one (whose config class would clash with kt_jit's). Each layer's FP8 experts go
straight to the JIT packer with their scales (dequantized in registers; block widths that are not
a multiple of 32 through fp32 one expert at a time), every other FP8 matrix is dequantized to the
model's dtype as it is read.

A checkpoint written by :func:`kt_jit.integrations.hf_saving.save_pretrained` (``quant_method
"kt_jit"`` with ``packed_experts`` in ``config.json``) loads with no packing: the quantizer swaps
each experts module for a KTJitExperts over its memory-mapped ``MoEExperts`` file before
transformers reads the other weights.

This goes through transformers' quantizer hooks (``HfQuantizer``, registered under the name
"kt_jit"), so it needs transformers >= 5 and imports it on first use.
"""

from __future__ import annotations

import os

import torch

from ..moe.checkpoint import check_fp8_scales, dequantize_fp8_blocks, fp8_block_size, fp8_source
from ..moe.weights import QUANT_MODES, MoEExperts, MoELoRA, lora_shapes, pack_expert_matrix, pack_expert_parts
from .hf import KTJitExperts, _dims, _patch_problem, is_experts_module, skeleton_of
from .hf_saving import install_save

_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def _classes() -> tuple[type, type]:
    """(KTJitConfig, KTJitQuantizer), defined and registered with transformers once per process
    (a reloaded module finds them in transformers' registry)."""
    from transformers.core_model_loading import ConversionOps, WeightConverter
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
                     lora: bool = True, fp8_block: list[int] | None = None,
                     packed_experts: dict[str, str] | None = None, packed_files: dict[str, str] | None = None,
                     experts_ids: dict[str, str] | None = None, load_adapters: bool = False,
                     adapters: list[str] | None = None, adapter_kinds: dict[str, list] | None = None,
                     **kwargs) -> None:
            self.quant_method = "kt_jit"
            self.quant, self.group_size, self.rank, self.alpha, self.lora = quant, group_size, rank, alpha, lora
            # the checkpoint's FP8 scale block [rows, columns] when it is an FP8 one (set by from_pretrained)
            self.fp8_block = fp8_block
            # a checkpoint written by hf_saving.save_pretrained: experts module -> its MoEExperts file
            # (relative to the checkpoint), those files as from_pretrained found them (local paths),
            # and each file's id (also in its metadata)
            self.packed_experts, self.packed_files, self.experts_ids = packed_experts, packed_files, experts_ids
            # whether the checkpoint's adapters load (rank and alpha as saved; those of the modules
            # ``adapters`` names, all if None), else fresh ones; ``adapter_kinds``: [rank, alpha] of
            # the saved adapters that differ from ``rank`` and ``alpha``, by module
            self.load_adapters, self.adapters, self.adapter_kinds = load_adapters, adapters, adapter_kinds

    class _PackOnLoad(ConversionOps):
        """Packs an experts parameter the checkpoint stores whole (``experts.gate_up_proj``) as
        transformers hands it over; the module keeps the packed tensors, the parameter an empty
        stub. (Per-expert keys are packed before, by :class:`_PackExperts`, whose stubs pass.)"""

        def __init__(self, quantizer) -> None:
            self.quantizer = quantizer

        def convert(self, input_dict, source_patterns=None, target_patterns=None, model=None, **kwargs):
            cfg = self.quantizer.quantization_config
            out = {}
            for name, value in input_dict.items():
                w = value[0] if isinstance(value, list) else value
                if name in self.quantizer.packed_names:
                    out[name] = w
                    continue
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

    class _PackExperts(ConversionOps):
        """Packs one layer's per-expert matrices (FP8 ones with their block scales) as transformers
        collects them, in place of its merge ops: no merged ``[E, 2I, H]`` copy of the layer is
        made. The module keeps the packed tensors, the parameter an empty stub."""

        def __init__(self, quantizer) -> None:
            self.hf_quantizer = quantizer  # (this name tells transformers to hand FP8 tensors over uncast)

        def __deepcopy__(self, memo):  # (transformers deep-copies a converter per layer: share the quantizer)
            return type(self)(self.hf_quantizer)

        def convert(self, input_dict, source_patterns=None, target_patterns=None, full_layer_name=None, model=None,
                    **kwargs):
            q = self.hf_quantizer
            cfg = q.quantization_config
            module_name, _, param = full_layer_name.rpartition(".")
            e, h, i = q.experts[module_name]
            shape = [h, i] if param == "down_proj" else [i, h]
            block = tuple(cfg.fp8_block or ())
            parts = []
            try:
                for pattern in (p for p in source_patterns if not p.endswith("_scale_inv")):
                    ws, scales = input_dict.get(pattern, []), input_dict.get(pattern + "_scale_inv")
                    if len(ws) != e or (scales is not None and len(scales) != e):
                        raise ValueError(f"{pattern}: the checkpoint gives {len(ws)} matrices and "
                                         f"{len(scales or [])} scales for {e} experts")
                    if scales is None and any(w.dtype in _FP8 for w in ws):
                        raise ValueError(f"{pattern}: FP8 experts without a weight_scale_inv each")
                    if any(list(w.shape) != shape for w in ws):
                        bad = next(list(w.shape) for w in ws if list(w.shape) != shape)
                        raise ValueError(f"{pattern}: the checkpoint gives {bad}, the model expects {shape}")
                    parts.append(ws if scales is None else
                                 [fp8_source(pattern.replace("*", str(j)), w, s, block)
                                  for j, (w, s) in enumerate(zip(ws, scales, strict=True))])
                packed = pack_expert_parts([list(ex) for ex in zip(*parts, strict=True)],
                                           "gate_up" if param == "gate_up_proj" else "down", cfg.quant,
                                           cfg.group_size)
            except Exception as err:  # (reported after loading, as in _PackOnLoad)
                q.errors.append(f"{module_name}: {err}")
            else:
                q.packed.setdefault(module_name, {}).update(packed)
            q.packed_names.add(full_layer_name)
            stub = getattr(model.get_submodule(module_name), param)
            return {full_layer_name: torch.empty(0, dtype=stub.dtype)}

    class _DequantizeFp8(ConversionOps):
        """FP8 checkpoints: every other ``weight`` (with its ``weight_scale_inv`` if it has one) in
        the dtype of the model's parameter, dequantized by its block scales."""

        def __init__(self, quantizer) -> None:
            self.hf_quantizer = quantizer

        __deepcopy__ = _PackExperts.__deepcopy__

        def convert(self, input_dict, full_layer_name=None, model=None, **kwargs):
            module_name, _, param = full_layer_name.rpartition(".")
            dtype = getattr(model.get_submodule(module_name), param).dtype
            block = tuple(self.hf_quantizer.quantization_config.fp8_block)

            def one(key: str, w: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
                if scale is not None:
                    check_fp8_scales(key, w, scale, block)
                    return dequantize_fp8_blocks(w, scale, block).to(dtype)
                if w.dtype in _FP8:
                    raise ValueError(f"{key} is {w.dtype} without a weight_scale_inv")
                return w.to(dtype)

            try:
                if "weight" in input_dict:  # (the catch-all converter: one weight)
                    scale = input_dict.get("weight_scale_inv")
                    return {full_layer_name: one(full_layer_name, input_dict["weight"][0],
                                                 None if scale is None else scale[0])}
                # first op of a model's own converter: every collected weight, before its other ops
                return {key: [one(key, w, s) for w, s in zip(ws, input_dict.get(key + "_scale_inv", [None] * len(ws)),
                                                             strict=True)]
                        for key, ws in input_dict.items() if not key.endswith(("_scale_inv", "activation_scale"))}
            except ValueError as err:
                self.hf_quantizer.errors.append(str(err))
                return {}

    def _merges_experts(conv) -> bool:
        """Whether ``conv`` is a model's converter that stacks per-expert ``weight`` matrices into an
        experts parameter (and nothing else: e.g. no transpose)."""
        if not isinstance(conv, WeightConverter) or len(conv._original_target_patterns) != 1:
            return False
        ops = {type(op).__name__ for op in conv.operations}
        return (conv._original_target_patterns[0].endswith(("experts.gate_up_proj", "experts.down_proj"))
                and all(s.endswith(".weight") and "*" in s for s in conv._original_source_patterns)
                and "MergeModulelist" in ops and ops <= {"MergeModulelist", "Concatenate"})

    class KTJitQuantizer(HfQuantizer):
        requires_calibration = False

        def __init__(self, quantization_config, **kwargs) -> None:
            super().__init__(quantization_config, **kwargs)
            self.experts: dict[str, tuple[int, int, int]] = {}  # module name -> (E, H, I)
            self.packed: dict[str, dict[str, torch.Tensor]] = {}
            self.packed_names: set[str] = set()  # experts parameters packed by _PackExperts
            self.errors: list[str] = []
            self.saving = False  # (set by hf_saving.save_pretrained, the one way to save such a model)
            self.replaced: list[tuple] = []  # (converter made here, the model's own it replaced or None)

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
            if cfg.packed_experts is not None:
                self._load_packed(model, found)

        def _load_packed(self, model, found: dict) -> None:
            """A kt_jit-packed checkpoint: every experts module becomes a KTJitExperts over its
            memory-mapped file now, so that transformers neither expects nor allocates its weights."""
            from .hf_saving import file_id, remember_file

            cfg = self.quantization_config
            if cfg.packed_files is None:
                raise ValueError("this checkpoint holds kt_jit-packed experts: load it with "
                                 "kt_jit.integrations.hf_loading.from_pretrained (which finds their files)")
            ids, with_adapter, kinds = cfg.experts_ids or {}, cfg.adapters, cfg.adapter_kinds or {}
            files = {k: (v, ids.get(k), with_adapter is None or k in with_adapter, kinds.get(k, (cfg.rank, cfg.alpha)))
                     for k, v in cfg.packed_files.items()}
            prefix = f"{getattr(model, 'base_model_prefix', '')}."
            for names in ({k.removeprefix(prefix): v for k, v in files.items()},  # (saved with a head, loaded
                          {prefix + k: v for k, v in files.items()}):           # without, or the other way)
                if set(found) != set(files) and set(found) == set(names):
                    files = names
            if set(found) != set(files):
                raise ValueError(f"the packed experts files are for modules {sorted(cfg.packed_files)}, the model "
                                 f"has {sorted(found)}")
            for name, module in found.items():
                path, want, has_adapter, (rank, alpha) = files[name]
                got_id = file_id(path)
                if want is not None and got_id != want:
                    raise ValueError(f"{path} comes from another save than the checkpoint's config.json (an "
                                     "interrupted save, or files mixed between checkpoints): save the model again")
                with torch.device("cpu"):  # (transformers builds the model under the meta device)
                    experts = MoEExperts.load(path)
                remember_file(experts, path, got_id)
                got = (experts.num_experts, experts.hidden_size, experts.intermediate_size)
                if got != self.experts[name]:
                    raise ValueError(f"{path} holds experts of (E, H, I) = {got}, the model's "
                                     f"{name} has {self.experts[name]}")
                lora = None
                if cfg.load_adapters and has_adapter:  # (placeholders: transformers loads the saved values)
                    with torch.device("cpu"):
                        lora = MoELoRA.from_tensors(*(torch.zeros(s, dtype=torch.bfloat16) for s in lora_shapes(
                            *self.experts[name], rank).values()), alpha=alpha)
                parent, _, attr = name.rpartition(".")
                owner = model.get_submodule(parent) if parent else model
                setattr(owner, attr, KTJitExperts(experts, lora, skeleton_of(module)))
            if not cfg.load_adapters:  # (a checkpoint's adapters, if it has any, are not wanted)
                model._keys_to_ignore_on_load_unexpected = set(model._keys_to_ignore_on_load_unexpected or ()) | {
                    r"experts\.lora\.(gate|up|down)_lora_[ab]$"}

        def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
            module_name, _, param = param_name.rpartition(".")
            return param in ("gate_up_proj", "down_proj") and module_name in self.experts

        def get_quantize_ops(self):
            return _PackOnLoad(self)

        def update_weight_conversions(self, weight_conversions, model):
            # the experts' merge converters pack the per-expert matrices instead (collecting their
            # scales too from an FP8 checkpoint, which loads as "pre-quantized"); there a last converter
            # dequantizes every other weight
            fp8 = self.quantization_config.fp8_block is not None
            transposed = any(getattr(m, "is_transposed", False) for m in model.modules() if is_experts_module(m))
            updated = []
            for conv in weight_conversions:
                if isinstance(conv, WeightConverter) and all(s.endswith(".weight") for s in
                                                             conv._original_source_patterns):
                    sources, targets = conv._original_source_patterns, conv._original_target_patterns
                    scales = [s + "_scale_inv" for s in sources] if fp8 else []
                    original = conv
                    if _merges_experts(conv) and not transposed:
                        conv = conv.copy(sources + scales, targets, operations=[_PackExperts(self)])
                    elif fp8:  # (any other converter of weights: dequantize them first)
                        conv = conv.copy(sources + scales, targets,
                                         operations=[_DequantizeFp8(self), *conv.operations])
                    self.replaced.append((conv, original))
                updated.append(conv)
            updated = super().update_weight_conversions(updated, model)
            if fp8:
                catch_all = WeightConverter(["weight", "weight_scale_inv", "activation_scale"], "weight",
                                            [_DequantizeFp8(self)])
                self.replaced.append((catch_all, None))
                updated.append(catch_all)
            return updated

        def _process_model_after_weight_loading(self, model, **kwargs):
            cfg = self.quantization_config
            if self.errors:
                raise ValueError("the checkpoint does not match the model: " + "; ".join(self.errors))
            grouped = QUANT_MODES[cfg.quant][1]
            for name, (e, h, i) in self.experts.items():
                if cfg.packed_experts is not None:  # (loaded before the weights: adapters only)
                    module = model.get_submodule(name)
                    if cfg.load_adapters:
                        if module.lora is not None:
                            self._check_loaded_adapter(name, module)
                    else:
                        module.lora = MoELoRA(e, h, i, cfg.rank, cfg.alpha) if cfg.lora else None
                    module.train(model.training)
                    continue
                tensors = self.packed.pop(name, {})
                if "gate_up" not in tensors or "down" not in tensors:
                    raise ValueError(f"{name}: the checkpoint did not provide its expert weights" + (
                        " (FP8 experts are read from per-expert keys, experts.<e>.gate_proj.weight with its "
                        "weight_scale_inv)" if cfg.fp8_block is not None else ""))
                experts = MoEExperts(tensors, h, i, cfg.quant, cfg.group_size if grouped else 0)
                parent, _, attr = name.rpartition(".")
                lora = MoELoRA(e, h, i, cfg.rank, cfg.alpha) if cfg.lora else None
                owner = model.get_submodule(parent) if parent else model
                # (its parameters are the stubs _PackOnLoad left, in the dtype the weights loaded in)
                skeleton = skeleton_of(getattr(owner, attr))
                setattr(owner, attr, KTJitExperts(experts, lora, skeleton).train(owner.training))
            install_save(model)  # (model.save_pretrained, the Trainer's checkpoints: the packed checkpoint)
            return model

        def _check_loaded_adapter(self, name: str, module) -> None:
            """After loading: the checkpoint gave every parameter of the module's adapter (transformers
            marks what it loaded; a missing one would be uninitialised memory); the adapter is bf16
            and trainable whatever dtype the model loaded in."""
            lora = module.lora
            missing = [n for n, p in lora.named_parameters() if not getattr(p, "_is_hf_initialized", False)]
            if missing:
                raise ValueError(f"{name}: the checkpoint has no {missing[0]} (its config says it holds the "
                                 "adapters): load it with lora=False, or with rank= for fresh adapters")
            with torch.no_grad():
                for n, p in list(lora.named_parameters()):
                    if p.dtype != torch.bfloat16:
                        setattr(lora, n, torch.nn.Parameter(p.detach().bfloat16()))
            lora.requires_grad_(True)

        def saving_conversions(self, conversions: list) -> list:
            """The loaded model's weight conversions (``model._weight_conversions``) as transformers
            should revert them when it saves the model's other weights: the model's own converters
            in place of those made here (packing and FP8 dequantization have no reverse), without
            the FP8 catch-all one (the weights it dequantized are saved in the model's dtype)."""
            originals = {id(new): old for new, old in self.replaced}
            return [c for c in (originals.get(id(c), c) for c in conversions) if c is not None]

        def is_serializable(self, safe_serialization=None) -> bool:
            if not self.saving:
                from transformers.utils import logging

                logging.get_logger(__name__).warning(
                    "save a model loaded by kt_jit with kt_jit.integrations.hf_saving.save_pretrained(model, path) "
                    "(it writes the packed experts next to the model's other weights)")
            return self.saving

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
    are packed (or quantized) by kt_jit while the checkpoint loads (see the module docstring). For
    FP8 checkpoints use :func:`from_pretrained`: transformers refuses a second quantization config."""
    if quant not in QUANT_MODES:
        raise ValueError(f"quant must be one of {tuple(QUANT_MODES)}, got {quant!r}")
    return _classes()[0](quant=quant, group_size=group_size, rank=rank, alpha=alpha, lora=lora)


# from_pretrained's keyword arguments that say where config.json comes from
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "proxies", "revision", "subfolder", "token",
               "trust_remote_code")


# ... and those that are about loading (some are config attributes too)
_LOADING_KWARGS = (*_HUB_KWARGS, "config", "dtype", "torch_dtype", "device_map", "attn_implementation",
                   "experts_implementation", "key_mapping", "use_safetensors", "weights_only")


def _checkpoint_config(path, kwargs: dict, kt_config, given: dict):
    """The model config to load a quantized checkpoint with: the checkpoint's own (or
    ``kwargs["config"]``, copied) with its ``quantization_config`` replaced by ``kt_config`` —
    carrying the scale block of an FP8 checkpoint, or the packed experts' files of one written by
    :func:`~kt_jit.integrations.hf_saving.save_pretrained`. None when the checkpoint is not
    quantized. ``given``: from_pretrained's kt_jit arguments (None where not given). Raises
    ValueError for other quantizations."""
    import copy

    from transformers import AutoConfig, PretrainedConfig

    config = kwargs.get("config")
    if isinstance(config, PretrainedConfig):
        config = copy.deepcopy(config)
    else:
        try:
            config = AutoConfig.from_pretrained(config or path, **{k: kwargs[k] for k in _HUB_KWARGS if k in kwargs})
        except (OSError, ValueError):  # (e.g. an adapter repository: transformers resolves it itself)
            return None
    for c in (config, config.get_text_config(decoder=True)):
        q = getattr(c, "quantization_config", None)
        if q is None:
            continue
        q = q if isinstance(q, dict) else q.to_dict()
        if q.get("quant_method") == "kt_jit" and q.get("packed_experts"):
            _use_packed_experts(path, q, kwargs, kt_config, given)
        elif q.get("quant_method") != "fp8":
            raise ValueError(f"{path} is quantized with {q.get('quant_method')!r}; kt_jit loads bf16/fp16/fp32 "
                             "checkpoints, FP8 ones with block scales (quant_method 'fp8', e.g. DeepSeek-V3) and "
                             "those kt_jit's save_pretrained wrote")
        elif "weight_block_size" in q and q["weight_block_size"] is None:
            raise ValueError(f"{path} has per-tensor FP8 scales (weight_block_size null); kt_jit reads FP8 "
                             "checkpoints with block scales")
        else:
            kt_config.fp8_block = list(fp8_block_size(q))
        c.quantization_config = kt_config.to_dict()
        # keyword arguments naming config fields (e.g. output_router_logits) go to the config, as
        # transformers does when it loads the config itself
        for key in [k for k in kwargs if k not in _LOADING_KWARGS and hasattr(config, k)]:
            setattr(config, key, kwargs.pop(key))
        return config
    return None


def _use_packed_experts(path, saved: dict, kwargs: dict, kt_config, given: dict) -> None:
    """Point ``kt_config`` at the packed experts of a checkpoint written by kt_jit's save_pretrained
    (``saved``: its quantization_config), found locally or through the Hub cache; the adapters'
    rank, alpha and presence are the saved ones unless ``given``."""
    from transformers.utils import cached_file

    quant, group_size = given["quant"], given["group_size"]
    grouped = QUANT_MODES.get(saved.get("quant"), (None, False))[1]
    if quant is not None and quant != saved.get("quant"):
        raise ValueError(f"{path} holds experts kt_jit packed as {saved.get('quant')!r}, not {quant!r}: load it "
                         "with quant=None, or pack them again from the original checkpoint")
    if grouped and group_size is not None and group_size != saved.get("group_size"):
        raise ValueError(f"{path} holds experts quantized in groups of {saved.get('group_size')}, not {group_size}: "
                         "load it with group_size=None, or pack them again from the original checkpoint")
    kt_config.quant, kt_config.group_size = saved["quant"], saved.get("group_size", 128)
    kt_config.packed_experts, kt_config.experts_ids = dict(saved["packed_experts"]), saved.get("experts_ids")
    for key in ("rank", "alpha", "lora"):
        if given[key] is None and key in saved:
            setattr(kt_config, key, saved[key])
    # the saved adapters load unless other ones (or none) are asked for
    kt_config.load_adapters = bool(saved.get("lora")) and kt_config.lora and (
        kt_config.rank, kt_config.alpha) == (saved.get("rank"), saved.get("alpha"))
    kt_config.adapters = saved.get("adapters")
    kt_config.adapter_kinds = saved.get("adapter_kinds")
    hub = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs and k != "trust_remote_code"}
    kt_config.packed_files = {name: cached_file(path, rel, **hub) for name, rel in saved["packed_experts"].items()}


def from_pretrained(path: str | os.PathLike, quant: str | None = None, group_size: int | None = None,
                    rank: int | None = None, alpha: float | None = None, lora: bool | None = None, model_class=None,
                    **kwargs):
    """``model_class.from_pretrained(path, ...)`` (default ``AutoModelForCausalLM``, bf16) with every
    routed-experts module packed on load into a :class:`KTJitExperts` (``quant`` default "bf16",
    ``group_size`` default 128, as in :meth:`kt_jit.MoEExperts.from_tensors`; a fresh adapter each,
    ``rank`` default 16, ``alpha`` 32, unless ``lora=False``). Other keyword arguments go to
    transformers. FP8 checkpoints with block scales (``quant_method "fp8"``, DeepSeek-V3/Qwen3-FP8)
    are read as they are: experts packed from FP8, the rest dequantized to the model's dtype. A
    checkpoint written by :func:`kt_jit.integrations.hf_saving.save_pretrained` loads its packed
    experts memory-mapped, as they were saved (``quant``/``group_size`` None, or the saved ones),
    and its saved adapters (fresh ones for another ``rank``/``alpha``, none with ``lora=False``).
    Raises ValueError when the model has no experts module, one cannot run on kt_jit, or the
    checkpoint is quantized another way."""
    if model_class is None:
        from transformers import AutoModelForCausalLM as model_class
    if "quantization_config" in kwargs:
        raise ValueError("from_pretrained sets quantization_config itself (kt_jit packs the experts)")
    if "dtype" not in kwargs and "torch_dtype" not in kwargs:
        kwargs["dtype"] = torch.bfloat16
    given = {"quant": quant, "group_size": group_size, "rank": rank, "alpha": alpha, "lora": lora}
    defaults = {"quant": "bf16", "group_size": 128, "rank": 16, "alpha": 32.0, "lora": True}
    kt_config = kt_jit_config(**{k: defaults[k] if v is None else v for k, v in given.items()})
    model_kwargs = dict(kwargs)
    config = _checkpoint_config(path, model_kwargs, kt_config, given)
    if config is not None:  # (transformers then builds kt_jit's quantizer from the config, "pre-quantized")
        return model_class.from_pretrained(path, **(model_kwargs | {"config": config}))
    return model_class.from_pretrained(path, quantization_config=kt_config, **kwargs)

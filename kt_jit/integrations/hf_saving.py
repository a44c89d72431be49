"""Saving a transformers model whose experts kt_jit runs, packed as they are.

``save_pretrained(model, path)`` writes an ordinary transformers checkpoint of everything but the
routed experts (transformers' own ``save_pretrained``, so other weights keep their checkpoint
names and shards), plus one :meth:`kt_jit.MoEExperts.save` file per experts module under
``path/kt_jit_experts/``, and records both in ``config.json``'s ``quantization_config``
(``quant_method "kt_jit"``). :func:`kt_jit.integrations.hf_loading.from_pretrained` reads it back
with no packing or quantization: each experts file is memory-mapped (page cache shared between
processes, not the process's own memory), so a second start of a job, or a second process serving
the same model, costs the other weights' load only.

The experts' LoRA adapters are not part of it (a loaded model gets fresh ones): save them with
:func:`kt_jit.integrations.peft_adapter.save_peft_adapter`.
"""

from __future__ import annotations

import os

from torch import nn

from .hf import KTJitExperts

PACKED_DIR = "kt_jit_experts"


def state_dict_without_experts(model: nn.Module) -> dict:
    """``model.state_dict()`` without the keys of its :class:`KTJitExperts` modules (their adapters)."""
    prefixes = tuple(f"{name}." for name, m in model.named_modules() if isinstance(m, KTJitExperts))
    return {k: v for k, v in model.state_dict().items() if not k.startswith(prefixes)}


def save_pretrained(model: nn.Module, path: str | os.PathLike, **kwargs) -> None:
    """Write ``model`` (a transformers model with :class:`KTJitExperts` modules, from
    :func:`~kt_jit.integrations.hf_loading.from_pretrained` or
    :func:`~kt_jit.integrations.hf.patch_experts`) to the directory ``path`` with its experts packed
    as they are (see the module docstring); ``kwargs`` go to transformers' ``save_pretrained``
    (e.g. ``max_shard_size``). The adapters are not saved. Raises ValueError for a model without
    KTJitExperts modules or wrapped by PEFT (save the base model's packed form from
    ``model.get_base_model()``, the adapters with ``save_peft_adapter``)."""
    if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
        raise ValueError("this model is wrapped by PEFT: save model.get_base_model() (after merge_and_unload() "
                         "if its other adapters should be part of it), and the adapters with save_peft_adapter")
    modules = {name: m for name, m in model.named_modules() if isinstance(m, KTJitExperts)}
    if not modules:
        raise ValueError(f"{type(model).__name__} has no KTJitExperts modules: use its own save_pretrained")
    if "state_dict" in kwargs:
        raise ValueError("save_pretrained takes the model's weights itself (the experts go to their own files)")
    first = next(iter(modules.values()))
    adapters = [m.lora for m in modules.values() if m.lora is not None]
    files = {name: f"{PACKED_DIR}/{name}.safetensors" for name in modules}
    packed_config = {"quant_method": "kt_jit", "quant": first.experts.quant,
                     "group_size": first.experts.group_size or 128,
                     "rank": adapters[0].rank if adapters else 16, "alpha": adapters[0].alpha if adapters else 32.0,
                     "lora": bool(adapters), "fp8_block": None, "packed_experts": files}
    state = state_dict_without_experts(model)

    os.makedirs(os.path.join(path, PACKED_DIR), exist_ok=True)
    for name, module in modules.items():
        module.experts.save(os.path.join(path, files[name]))
    for stale in set(os.listdir(os.path.join(path, PACKED_DIR))) - {os.path.basename(f) for f in files.values()}:
        if stale.endswith(".safetensors"):
            os.remove(os.path.join(path, PACKED_DIR, stale))

    config = model.config
    had_config = "quantization_config" in config.__dict__
    old_config = config.__dict__.get("quantization_config")
    quantizer = getattr(model, "hf_quantizer", None)
    conversions = getattr(model, "_weight_conversions", None)
    config.quantization_config = packed_config
    if quantizer is not None:
        quantizer.saving = True  # (kt_jit's quantizer: serializable only through this function)
    if conversions is not None and hasattr(quantizer, "saving_conversions"):
        model._weight_conversions = quantizer.saving_conversions(conversions)
    try:
        model.save_pretrained(path, state_dict=state, **kwargs)
    finally:
        if conversions is not None:
            model._weight_conversions = conversions
        if quantizer is not None:
            quantizer.saving = False
        if had_config:
            config.quantization_config = old_config
        else:
            del config.quantization_config

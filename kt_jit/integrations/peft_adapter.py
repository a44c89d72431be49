"""kt_jit's experts adapters as a PEFT LoRA adapter, and PEFT experts adapters into kt_jit.

PEFT (>= 0.21) adapts a transformers model's 3-D experts parameters through
``LoraConfig(target_parameters=[...])``: one LoRA on ``gate_up_proj`` (out 2I, in H) and one on
``down_proj`` (out H, in I) per experts module, each stored as ``lora_A [E·R, in]`` (expert-major
rows: expert e's ``A_e [R, in]`` is rows ``e·R ... e·R + R - 1``) and ``lora_B [out, R·E]``
(expert-minor columns: ``B_e [out, R]`` is columns ``e, E + e, 2E + e, ...``), with ``W_e +=
(lora_alpha / R) · B_e A_e`` (in the layout of the parameter, transposed or not). PEFT nests the two
wrappers on the one module; the inner one (its keys hold ``.base_layer.``) is the parameter the
transformers module registered first.

kt_jit's :class:`~kt_jit.MoELoRA` has separate gate and up adapters of rank r, so the export uses
rank R = 2r: gate_up's ``A_e = [A_gate; A_up]`` and ``B_e = diag(B_gate, B_up)`` (block diagonal),
down's A and B padded with zeros; that is exactly kt_jit's update. The import reads the experts part
of a PEFT adapter: gate and up share PEFT's ``A_e`` (the gate rows of ``B_e`` for gate, the up rows
for up), so kt_jit's rank is PEFT's R (the larger of the two parameters' ranks, the other padded
with zeros), and a scaling that differs between the two parameters is folded into one B (exact up
to bf16 rounding of the adapters' values); an adapter in the block-diagonal form the export
writes comes back as the rank-r adapter it was, exactly. Other parts of an adapter are left to PEFT.

Adapters PEFT wrote for transformers 4, whose experts were modules (``<experts>.<e>.gate_proj``,
``up_proj``, ``down_proj``; Mixtral's ``block_sparse_moe.experts.<e>.w1`` / ``w3`` / ``w2``), are read
too: each expert's LoRA is kt_jit's per-expert adapter as it is (ranks padded to the largest,
scalings other than the most common folded into their B, missing ones zero). PEFT is given the
rest under its transformers 5 names (the modules its tensors name; the router's LoRA on its
``weight``; Mixtral's ``block_sparse_moe`` as ``mlp``). PEFT's own conversion by the model type,
which turns every ``gate_proj`` target into the fused experts parameter, is kept out of every wrap:
DeepSeek's shared experts and dense layers keep their LoRA.

:func:`track_experts_adapters` makes a PEFT-wrapped kt_jit model's own ``save_pretrained`` and
``load_adapter`` (transformers' ``Trainer`` checkpoints and resumes through them) carry the
experts' adapters too.

:func:`peft_model_from_adapter` applies such a combined adapter to a kt_jit model in one call
(the experts' part into kt_jit's adapters, the rest through PEFT).

A model wrapped by PEFT (PEFT's LoRA on attention, say, kt_jit's on the experts) is saved as one
adapter: PEFT's own adapter tensors and config, with the experts' parameters added to its
``target_parameters`` and their rank and alpha to its ``rank_pattern`` / ``alpha_pattern`` (first,
where they differ from its ``r`` / ``lora_alpha`` or one of its own patterns would match them);
that is the one file a server (or ``PeftModel.from_pretrained`` on the original model) needs. Only
then is PEFT imported (it is installed: it wrapped the model), and by
:func:`peft_model_from_adapter`; otherwise these functions read and write its files
(``adapter_config.json``, ``adapter_model.safetensors``) without it.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable
from contextlib import contextmanager

import torch
from torch import nn

from ..moe.checkpoint import PER_EXPERT_NAMES
from ..moe.weights import MoELoRA
from .hf import KTJitExperts

_PREFIX = "base_model.model."  # (PEFT's key prefix for the wrapped model's modules)


def _experts_modules(model: nn.Module) -> dict[str, KTJitExperts]:
    """The KTJitExperts of ``model`` by module name; a PEFT model (PEFT on the rest of the model) is
    looked into, with the names of the transformers model inside it."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    found = {name: m for name, m in model.named_modules() if isinstance(m, KTJitExperts)}
    if not found:
        raise ValueError(f"{type(model).__name__} has no KTJitExperts module (patch_experts or "
                         "hf_loading.from_pretrained makes them)")
    return found


def _peft_pair(a: list[torch.Tensor], b: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's ``(lora_A [E·R, in], lora_B [out, R·E])`` from per-expert ``A_e [R, in]``, ``B_e [out, R]``."""
    a_all, b_all = torch.stack(a), torch.stack(b)  # [E, R, in], [E, out, R]
    e, r, k = a_all.shape
    return a_all.reshape(e * r, k).contiguous(), b_all.permute(1, 2, 0).reshape(b_all.shape[1], r * e).contiguous()


def save_peft_adapter(model: nn.Module, path: str | os.PathLike, base_model_name_or_path: str | None = None,
                      task_type: str | None = "CAUSAL_LM") -> None:
    """Write the adapters of every :class:`KTJitExperts` in ``model`` as a PEFT LoRA adapter in the
    directory ``path`` (``adapter_config.json``, ``adapter_model.safetensors``, tensors in the
    adapters' dtype) for the transformers model they were patched into: ``PeftModel.from_pretrained(
    base, path)`` then computes what the patched model computes, where ``base`` holds the expert
    weights kt_jit computed with (the originals for a bf16 model; for quantized experts their
    dequantized values, see :meth:`KTJitExperts.merged_weights`). Modules whose adapters differ in
    rank or scaling from the adapter's ``r`` / ``lora_alpha`` get entries of their own in its
    ``rank_pattern`` / ``alpha_pattern``. For a model wrapped by PEFT the file also holds PEFT's
    active LoRA adapter (see the module docstring; ``base_model_name_or_path`` and ``task_type`` are
    then PEFT's). Raises ValueError when ``model`` has no experts adapters, or PEFT's adapter is not
    a LoRA one without DoRA."""
    from safetensors.torch import save_file

    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    found = {name: m for name, m in _experts_modules(model).items() if m.lora is not None}
    if not found:
        raise ValueError("no KTJitExperts module of this model has a LoRA adapter")
    tensors, kinds = {}, {}
    for name, module in found.items():
        r = module.lora.rank
        ga, gb, ua, ub, da, db = (t.detach() for t in module.lora.tensors())
        e, i = gb.shape[0], gb.shape[1]
        zeros_gb, zeros_ub = gb.new_zeros(e, i, r), ub.new_zeros(e, i, r)
        gu_a = torch.cat([ga, ua], dim=1)                                                   # [E, 2r, H]
        gu_b = torch.cat([torch.cat([gb, zeros_gb], 2), torch.cat([zeros_ub, ub], 2)], 1)  # [E, 2I, 2r]
        dn_a = torch.cat([da, torch.zeros_like(da)], dim=1)                                 # [E, 2r, I]
        dn_b = torch.cat([db, torch.zeros_like(db)], dim=2)                                 # [E, H, 2r]
        pairs = {"gate_up_proj": (gu_a, gu_b), "down_proj": (dn_a, dn_b)}
        for depth, param in enumerate(_nesting(module)):
            key = f"{_PREFIX}{name}{'.base_layer' * (1 - depth)}"
            tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = _peft_pair(*map(list, pairs[param]))
        kinds.update(dict.fromkeys((f"{name}.gate_up_proj", f"{name}.down_proj"), (2 * r, module.lora.scaling)))
    targets = list(kinds)
    if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
        config, peft_tensors = _with_peft_adapter(model, path)
        tensors = peft_tensors | tensors
    else:
        rank, scaling = max(set(kinds.values()), key=list(kinds.values()).count)
        config = {
            "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_model_name_or_path,
            "r": rank, "lora_alpha": scaling * rank, "lora_dropout": 0.0, "bias": "none", "use_rslora": False,
            "use_dora": False, "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
            "target_modules": [], "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None,
            "target_parameters": [],
        }
    config["target_parameters"] = list(config.get("target_parameters") or []) + targets
    given = {p: dict(config.get(p) or {}) for p in ("rank_pattern", "alpha_pattern")}
    entries: dict[str, dict] = {p: {} for p in given}
    for target, (rank, scaling) in kinds.items():
        alpha = scaling * (math.sqrt(rank) if config.get("use_rslora") else rank)
        # an entry where the defaults differ or one of PEFT's own patterns would match; both values
        # (neither falls back to the default), and first (PEFT takes the first matching pattern)
        if rank != config["r"] or alpha != config["lora_alpha"] or any(
                _pattern_matches(k, [target]) for p in given for k in given[p]):
            entries["rank_pattern"][target], entries["alpha_pattern"][target] = rank, alpha
    for p in given:
        config[p] = entries[p] | {k: v for k, v in given[p].items() if k not in entries[p]}
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)


def _with_peft_adapter(model: nn.Module, path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter config, tensors) of a PEFT-wrapped model's active LoRA adapter, without what it
    holds of kt_jit's experts modules."""
    import tempfile

    from peft import get_peft_model_state_dict

    names = list(getattr(model, "active_adapters", None) or [model.active_adapter])
    if len(names) != 1:
        raise ValueError(f"PEFT has {len(names)} active adapters ({names}); activate the one to save with the experts")
    with tempfile.TemporaryDirectory() as tmp:  # (PEFT's own serialisation of its config)
        model.peft_config[names[0]].save_pretrained(tmp)
        with open(os.path.join(tmp, "adapter_config.json")) as f:
            config = json.load(f)
    if config.get("peft_type") != "LORA" or config.get("use_dora"):
        raise ValueError(f"{path}: PEFT's adapter {names[0]!r} is {config.get('peft_type')} (use_dora "
                         f"{config.get('use_dora')}); kt_jit's experts adapters join a LoRA adapter without DoRA")
    experts = tuple(f"{_PREFIX}{name}." for name in _experts_modules(model))
    tensors = {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(model, adapter_name=names[0]).items()
               if not k.startswith(experts)}
    return config, tensors


def _pattern_value(patterns: dict, key: str, default):
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` entry for the parameter ``key`` (the first
    pattern that matches it, as PEFT takes it), else ``default``."""
    return next((value for pattern, value in patterns.items() if _pattern_matches(pattern, [key])), default)


def _nesting(module: KTJitExperts) -> list[str]:
    """The experts parameters in the order PEFT wraps them, innermost first: the order the
    transformers module registered them in (gate_up_proj first in every transformers 5 model)."""
    origin = module.hf_origin
    order = [k for k in (origin._parameters if origin is not None else ()) if k in ("gate_up_proj", "down_proj")]
    return order if len(order) == 2 else ["gate_up_proj", "down_proj"]


def _pad(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """``t`` with zeros appended along ``dim`` up to ``size``."""
    extra = list(t.shape)
    extra[dim] = size - t.shape[dim]
    return torch.cat([t, t.new_zeros(extra)], dim)


def _adapter_dir(path: str | os.PathLike, hub: dict) -> str:
    """The local directory holding the adapter ``path`` (in its folder ``hub["subfolder"]`` if
    given): ``path`` itself, or for a Hub repository id its snapshot of ``adapter_config.json`` and
    ``adapter_model.safetensors``, downloaded or from the Hub cache (the rest of ``hub``:
    ``revision``, ``cache_dir``, ``token``, ``local_files_only``, ..., as
    ``huggingface_hub.snapshot_download`` takes them)."""
    hub = dict(hub)
    subfolder = os.fspath(hub.pop("subfolder", None) or "")
    if os.path.isdir(path):
        folder = os.path.join(os.fspath(path), subfolder)
        if not os.path.isfile(os.path.join(folder, "adapter_config.json")):
            raise ValueError(f"{folder}: holds no adapter_config.json (a PEFT adapter's directory is needed)")
        return folder
    from huggingface_hub import snapshot_download

    files = [f"{subfolder}/{name}" if subfolder else name for name in ("adapter_config.json",
                                                                      "adapter_model.safetensors")]
    try:
        folder = snapshot_download(os.fspath(path), allow_patterns=files, **hub)
    except Exception as exc:  # (huggingface_hub's errors: not found, offline, invalid id, ...)
        raise ValueError(f"{path}: neither a local directory nor a Hub adapter that could be fetched "
                         f"({type(exc).__name__}: {exc})") from exc
    if not os.path.isfile(os.path.join(folder, files[0])):
        raise ValueError(f"{path}: the Hub repository holds no {files[0]}"
                         + ("" if subfolder else " at its top (give subfolder= for one in a folder)"))
    return os.path.join(folder, subfolder)


def load_peft_adapter(model: nn.Module, path: str | os.PathLike, in_place: bool = False,
                      **hub_kwargs) -> dict[str, MoELoRA]:
    """Read the experts part of a PEFT LoRA adapter (``target_parameters`` naming an experts
    module's ``gate_up_proj`` and ``down_proj``, written by :func:`save_peft_adapter` or trained with
    PEFT elsewhere; or per-expert modules, as PEFT wrote them for transformers 4) from the
    directory ``path`` (or a Hub repository id: ``hub_kwargs`` as
    ``huggingface_hub.snapshot_download`` takes them, and ``subfolder`` for an adapter in a folder
    of either) into fresh bf16 :class:`~kt_jit.MoELoRA`
    adapters of the :class:`KTJitExperts` modules of ``model`` it names (assigned once all are
    read, and returned by module name; modules it does not name keep theirs). Each computes the
    adapter's update, up to bf16 rounding of its values. Other parts of the adapter (LoRA of other
    modules, ``modules_to_save``) are not loaded: a warning names them (load them with PEFT).
    Raises ValueError for an adapter that is not LoRA or uses DoRA, names nothing here, names one
    of a module's two parameters only, misses tensors, has tensors of the wrong shape, or names an
    expert the module does not have. With ``in_place`` the values are copied into a module's
    current adapter where it has the file's rank (its Parameters stay the ones an optimizer holds:
    resuming a fine-tune), else assigned."""
    import warnings

    path = _adapter_dir(path, hub_kwargs)
    loaded, _, ignored = _read_adapter(model, path)
    _assign(model, loaded, in_place)
    if ignored:
        warnings.warn(f"{path}: only the experts' adapters were loaded; {len(ignored)} other tensors were not "
                      f"(e.g. {ignored[:3]}): load those with PEFT (peft_model_from_adapter does both)", stacklevel=2)
    return loaded


def _read_adapter(model: nn.Module, path: str) -> tuple[dict[str, MoELoRA], dict[str, torch.Tensor], list[str]]:
    """(the experts adapters of the adapter directory ``path`` by module name, all its tensors by
    key, the names of its tensors that are not theirs); see :func:`load_peft_adapter`."""
    from safetensors.torch import load_file

    with open(os.path.join(path, "adapter_config.json")) as f:
        cfg = json.load(f)
    if cfg.get("peft_type") != "LORA" or cfg.get("use_dora"):
        raise ValueError(f"{path}: a PEFT LoRA adapter without DoRA is needed, got peft_type "
                         f"{cfg.get('peft_type')!r}, use_dora {cfg.get('use_dora')}")
    targets = list(cfg.get("target_parameters") or [])
    tensors = load_file(os.path.join(path, "adapter_model.safetensors"))
    used: set[str] = set()
    loaded = {}
    for name, module in _experts_modules(model).items():
        named = [param for param in ("gate_up_proj", "down_proj") if _names_any(targets, f"{name}.{param}")]
        per_expert = _per_expert_keys(tensors, name)
        if named and per_expert:
            raise ValueError(f"{path}: holds {name}'s experts both as target_parameters {named} and as per-expert "
                             f"modules (e.g. {next(iter(per_expert.values()))}); an adapter has one or the other")
        if per_expert:
            loaded[name] = _read_per_expert(module, name, cfg, tensors, per_expert, used, path)
            continue
        if not named:
            continue
        if len(named) != 2:
            raise ValueError(f"{path}: target_parameters {targets} name {name}.{named[0]} but not the module's other "
                             "experts parameter; kt_jit adapts both")
        loaded[name] = _read_module(module, name, cfg, tensors, used, path)
    if not loaded:
        raise ValueError(f"{path}: neither target_parameters {targets} naming both gate_up_proj and down_proj of a "
                         "KTJitExperts module of this model, nor per-expert modules under one (transformers 4's "
                         "<module>.<e>.gate_proj/up_proj/down_proj or w1/w3/w2, e.g. "
                         f"{_PREFIX}{next(iter(_experts_modules(model)))}.0.gate_proj.lora_A.weight)")
    experts = tuple(f"{_PREFIX}{n}." for name in _experts_modules(model) for n in _v4_names(name))
    left = sorted(k for k in tensors if k.startswith(experts) and k not in used)
    if left:  # (e.g. lora_bias: kt_jit's experts adapters have no bias)
        raise ValueError(f"{path}: holds tensors of the experts that kt_jit's adapters have no place for: {left[:4]}"
                         f"{' ...' if len(left) > 4 else ''} (LoRA A and B are read; a LoRA bias is not)")
    return loaded, tensors, sorted(set(tensors) - used)


def _v4_names(name: str) -> tuple[str, ...]:
    """The names transformers 4 gave the experts module ``name`` of a transformers 5 model: the same,
    and Mixtral's ``block_sparse_moe`` for ``mlp``."""
    mixtral = re.sub(r"\.mlp\.experts$", ".block_sparse_moe.experts", name)
    return (name,) if mixtral == name else (name, mixtral)


def _per_expert_keys(keys: Iterable[str], name: str) -> dict[tuple[int, str], str]:
    """The per-expert LoRA modules an adapter written for transformers 4 holds under the experts
    module ``name`` (``<name>.<e>.gate_proj``, ``up_proj``, ``down_proj`` or Mixtral's ``w1``, ``w3``,
    ``w2``): their key prefixes by (expert, "gate" / "up" / "down")."""
    names = "|".join(re.escape(n) for n in _v4_names(name))
    pattern = re.compile(rf"^{re.escape(_PREFIX)}(?P<m>{names})\.(?P<e>\d+)\.(?P<p>{'|'.join(PER_EXPERT_NAMES)})"
                         r"\.lora_[AB]\.weight$")
    found = {}
    for key in keys:
        m = pattern.match(key)
        if m:
            found[int(m["e"]), PER_EXPERT_NAMES[m["p"]]] = key.rsplit(".lora_", 1)[0]
    return found


def _read_per_expert(module: KTJitExperts, name: str, cfg: dict, tensors: dict[str, torch.Tensor],
                     keys: dict[tuple[int, str], str], used: set[str], path) -> MoELoRA:
    """One experts module's :class:`MoELoRA` from an adapter's per-expert modules (``keys``, see
    :func:`_per_expert_keys`): each expert's gate, up and down LoRA as it is (kt_jit's rank the
    largest of theirs, the others padded with zeros; a scaling that differs from the most common
    one folded into that B; an expert or projection without a LoRA gets zeros)."""
    ex = module.experts
    e, h, i = ex.num_experts, ex.hidden_size, ex.intermediate_size
    shapes = {"gate": (i, h), "up": (i, h), "down": (h, i)}
    parts = {}
    for (expert, part), key in sorted(keys.items()):
        if expert >= e:
            raise ValueError(f"{path}: {key} is expert {expert}; {name} has {e} experts")
        parts[expert, part] = _read_pair(cfg, tensors, key, key.removeprefix(_PREFIX), shapes[part], 1, used, path,
                                         missing="missing (one of the two is there)",
                                         what=f"expert {expert}'s {part} projection of {name}")
    r = max(a.shape[0] for a, _, _ in parts.values())
    scalings = [s for _, _, s in parts.values()]
    s = max(set(scalings), key=scalings.count) or 1.0  # (MoELoRA has one scaling: other ratios go into B)
    stacks = {part: (torch.zeros(e, r, k), torch.zeros(e, out, r)) for part, (out, k) in shapes.items()}
    for (expert, part), (a, b, scaling) in parts.items():
        stacks[part][0][expert, :a.shape[0]] = a
        stacks[part][1][expert, :, :a.shape[0]] = b * (scaling / s)
    return MoELoRA.from_tensors(*stacks["gate"], *stacks["up"], *stacks["down"], alpha=s * r)


def _read_pair(cfg: dict, tensors: dict[str, torch.Tensor], key: str, target: str, shape: tuple[int, int],
               experts: int, used: set[str], path: str, missing: str,
               what: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(``lora_A``, ``lora_B`` as float, scaling) of the LoRA at the key prefix ``key`` of an adapter
    with config ``cfg``, for a weight of ``shape`` (out, in) held by ``experts`` experts at once (PEFT's
    ``lora_A [experts·R, in]``, ``lora_B [out, R·experts]``; 1 for a per-expert module), its rank R and
    alpha those of ``rank_pattern`` / ``alpha_pattern`` for ``target``. Its two keys are added to
    ``used``. Raises ValueError naming ``key`` when one is missing (``missing`` ends the message) or
    the shapes are not those (``what`` ends the message)."""
    a, b = tensors.get(key + ".lora_A.weight"), tensors.get(key + ".lora_B.weight")
    if a is None or b is None:
        raise ValueError(f"{path}: {key}.lora_A/lora_B.weight {missing}")
    out, k = shape
    rank = _pattern_value(cfg.get("rank_pattern") or {}, target, cfg["r"])
    if a.shape != (experts * rank, k) or b.shape != (out, rank * experts):
        raise ValueError(f"{path}: {key} holds lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, expected "
                         f"{(experts * rank, k)} and {(out, rank * experts)} for {what}")
    used.update((key + ".lora_A.weight", key + ".lora_B.weight"))
    alpha = _pattern_value(cfg.get("alpha_pattern") or {}, target, cfg["lora_alpha"])
    return a.float(), b.float(), alpha / (math.sqrt(rank) if cfg.get("use_rslora") else rank)


def _assign(model: nn.Module, loaded: dict[str, MoELoRA], in_place: bool) -> None:
    """Give the experts modules of ``model`` the adapters ``loaded`` (by module name), into their
    current ones where ``in_place`` and the ranks agree (``loaded`` then names those)."""
    modules = _experts_modules(model)
    for name, lora in loaded.items():
        current = modules[name].lora
        if in_place and current is not None and current.rank == lora.rank:
            with torch.no_grad():
                for dst, src in zip(current.tensors(), lora.tensors(), strict=True):
                    dst.copy_(src)
            current.alpha = lora.alpha
            loaded[name] = current
        else:
            modules[name].lora = lora.train(modules[name].training)


def _read_module(module: KTJitExperts, name: str, cfg: dict, tensors: dict[str, torch.Tensor], used: set[str],
                 path) -> MoELoRA:
    """One experts module's :class:`MoELoRA` from a PEFT adapter's tensors (see load_peft_adapter)."""
    ex = module.experts
    e, h, i = ex.num_experts, ex.hidden_size, ex.intermediate_size
    parts = {}
    for depth, param in enumerate(_nesting(module)):
        key = f"{_PREFIX}{name}{'.base_layer' * (1 - depth)}"
        out, k = (2 * i, h) if param == "gate_up_proj" else (h, i)
        a, b, scale = _read_pair(cfg, tensors, key, f"{name}.{param}", (out, k), e, used, path,
                                 missing=f"({name}.{param}) missing", what=f"{name}.{param}")
        parts[param] = (a.reshape(e, -1, k), b.reshape(out, -1, e).permute(2, 0, 1), scale)
    (gu_a, gu_b, gu_s), (dn_a, dn_b, dn_s) = parts["gate_up_proj"], parts["down_proj"]
    r = max(gu_a.shape[1], dn_a.shape[1])
    s = gu_s or dn_s or 1.0  # (MoELoRA has one scaling: the other parameter's ratio goes into its B)
    gu_b, dn_b = _pad(gu_b, 2, r) * (gu_s / s), _pad(dn_b, 2, r) * (dn_s / s)
    gu_a, dn_a = _pad(gu_a, 1, r), _pad(dn_a, 1, r)
    q = r // 2
    padding = (gu_b[:, :i, q:], gu_b[:, i:, :q], dn_a[:, q:], dn_b[..., q:])
    if r % 2 == 0 and not any(t.any() for t in padding):
        # the block-diagonal form save_peft_adapter writes: kt_jit's rank-r/2 adapter exactly
        return MoELoRA.from_tensors(gu_a[:, :q], gu_b[:, :i, :q], gu_a[:, q:], gu_b[:, i:, q:], dn_a[:, :q],
                                    dn_b[..., :q], alpha=s * q)
    return MoELoRA.from_tensors(gu_a, gu_b[:, :i], gu_a, gu_b[:, i:], dn_a, dn_b, alpha=s * r)


def _names_any(targets: list[str], *names: str) -> bool:
    """Whether an entry of PEFT's ``target_parameters`` (or a list of ``target_modules``) ``targets``
    names one of the parameters (modules) ``names``: the whole name or its end after a dot, as PEFT
    matches them."""
    return any(n == t or n.endswith("." + t) for t in targets for n in names)


def _pattern_matches(pattern: str, names: list[str]) -> bool:
    """Whether PEFT's ``rank_pattern`` / ``alpha_pattern`` key ``pattern`` (a regular expression)
    matches one of ``names``: the whole name or its end after a dot, as PEFT matches them."""
    return any(re.fullmatch(rf"(.*\.)?({pattern})", n) for n in names)


def peft_model_from_adapter(model: nn.Module, path: str | os.PathLike, is_trainable: bool = False,
                            adapter_name: str = "default", **hub_kwargs) -> nn.Module:
    """Apply the PEFT LoRA adapter in the directory ``path`` (or a Hub repository id: ``hub_kwargs``
    as ``huggingface_hub.snapshot_download`` takes them, and ``subfolder``) to a kt_jit model (one with
    :class:`KTJitExperts` modules, from ``hf_loading.from_pretrained`` or ``patch_experts``) in one
    call: what the adapter holds for the experts goes into kt_jit's adapters
    (:func:`load_peft_adapter`), the rest (LoRA on attention, say, ``modules_to_save``, trainable
    tokens) to PEFT, which wraps the model with the adapter's config minus the experts'
    ``target_parameters`` and the rank and alpha patterns that name nothing else. That is how a
    combined adapter (:func:`save_peft_adapter`, a Trainer checkpoint of a model
    :func:`track_experts_adapters` followed, or one trained with PEFT on the original model) is
    served or fine-tuned further; an adapter written for transformers 4 (per-expert modules) too.
    Returns the PEFT model, its save and load tracked
    (:func:`track_experts_adapters`); ``model`` itself when the adapter holds experts adapters only
    (left as PEFT would leave it: its own parameters frozen, in eval mode unless ``is_trainable``).
    With ``is_trainable`` every adapter (PEFT's and the experts') requires grad, else none does.
    The experts' part is checked before anything changes. Raises ValueError as
    :func:`load_peft_adapter` does, and when ``path`` cannot be found."""
    if hasattr(model, "peft_config"):
        raise ValueError(f"{type(model).__name__} is a PEFT model already: give the model it wraps, or add the "
                         "adapter with its load_adapter after track_experts_adapters")
    modules = _experts_modules(model)
    path = _adapter_dir(path, hub_kwargs)
    loaded, tensors, ignored = _read_adapter(model, path)  # (checks the experts' part before anything changes)
    wrapped = _peft_wrap(model, path, tensors, ignored, modules, is_trainable, adapter_name) if ignored else None
    if wrapped is None:  # (left as PEFT leaves a model: its own weights frozen, eval mode unless trainable)
        model.requires_grad_(False)
        if not is_trainable:
            model.eval()
    _assign(model, loaded, in_place=False)
    for lora in loaded.values():
        lora.requires_grad_(is_trainable)
    return model if wrapped is None else track_experts_adapters(wrapped)


def _peft_wrap(model: nn.Module, path: str, file_tensors: dict[str, torch.Tensor], keep: list[str],
               modules: dict[str, KTJitExperts], is_trainable: bool, adapter_name: str) -> nn.Module:
    """PEFT's model of ``model`` with the tensors ``keep`` of the adapter in ``path`` (those that are
    not the experts'; ``file_tensors`` are all of its tensors, as :func:`_read_adapter` read them),
    its config without what names the experts ``modules`` only (see
    :func:`peft_model_from_adapter`). PEFT's conversion of adapters by the model type is kept out
    (:func:`_hidden_model_type`): the experts, which it is for, never reach PEFT here; an adapter
    written for transformers 4 is given to PEFT under the names it has on transformers 5
    (:func:`_v5_targets`)."""
    import tempfile

    import peft
    from peft.utils.constants import DUMMY_TARGET_MODULES
    from safetensors.torch import save_file

    tensors = {k: file_tensors[k] for k in keep}
    dropped = {_module_of(k) for k in file_tensors if k not in tensors}
    per_expert = any(_per_expert_keys(file_tensors, name) for name in modules)
    experts = [f"{name}.{param}" for name in modules for param in ("gate_up_proj", "down_proj")] + sorted(dropped)
    config = peft.PeftConfig.from_pretrained(path)
    config.target_parameters = [t for t in config.target_parameters or [] if not _names_any([t], *experts)]
    # a pattern that names experts parameters (modules) and no other module goes: one that names
    # others too stays (PEFT's first matching pattern sets their rank and alpha)
    others = [n for n, _ in model.named_modules() if n and not any(n == m or n.startswith(m + ".") for m in modules)]
    for patterns in ("rank_pattern", "alpha_pattern"):
        setattr(config, patterns, {k: v for k, v in (getattr(config, patterns) or {}).items()
                                   if not _pattern_matches(k, experts) or _pattern_matches(k, others)})
    if per_expert:
        tensors = _v5_targets(model, config, tensors)
    elif isinstance(config.target_modules, (list, set)):
        kept = {_module_of(k) for k in tensors}
        config.target_modules = {t for t in config.target_modules if not _names_any([t], *dropped)
                                 or _names_any([t], *kept)}
    if not (config.target_modules or config.target_parameters):  # (modules_to_save, trainable tokens only)
        config.target_modules = DUMMY_TARGET_MODULES
    with tempfile.TemporaryDirectory() as tmp, _hidden_model_type(model):
        save_file(tensors, os.path.join(tmp, "adapter_model.safetensors"), metadata={"format": "pt"})
        return peft.PeftModel.from_pretrained(model, tmp, adapter_name=adapter_name, is_trainable=is_trainable,
                                              config=config)


def _module_of(key: str) -> str:
    """The module (or parameter) name an adapter key belongs to, without PEFT's prefix."""
    return key.rsplit(".lora_", 1)[0].removeprefix(_PREFIX)


_WRAPPED_TYPES = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _v5_targets(model: nn.Module, config, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An adapter written for transformers 4 (its experts' part taken out), as PEFT is to apply it
    to ``model`` (transformers 5): Mixtral's ``block_sparse_moe`` is ``mlp`` in its keys and
    patterns, and its targets are the modules its tensors name (full names); a module that is no
    longer an ``nn.Linear`` (the router, ``gate``) is targeted through its ``weight`` parameter, as
    PEFT's own conversion does. ``config`` is changed; returns the tensors under their new keys."""
    names = {n for n, _ in model.named_modules()}
    if not any(".block_sparse_moe" in n for n in names):
        tensors = {k.replace(".block_sparse_moe.", ".mlp."): v for k, v in tensors.items()}
        for patterns in ("rank_pattern", "alpha_pattern"):
            setattr(config, patterns, {k.replace("block_sparse_moe", "mlp"): v
                                       for k, v in (getattr(config, patterns) or {}).items()})
    modules, params = set(), set(config.target_parameters or [])
    for key in tensors:
        if ".lora_" not in key:
            continue  # (modules_to_save, trainable tokens: PEFT's own config fields)
        name = _module_of(key)
        module = model.get_submodule(name) if name in names else None
        if module is not None and not isinstance(module, _WRAPPED_TYPES) and "weight" in module._parameters:
            params.add(f"{name}.weight")
        else:
            modules.add(name)
    config.target_modules, config.target_parameters = modules, sorted(params)
    return tensors


@contextmanager
def _hidden_model_type(model: nn.Module):
    """While it runs, ``model``'s config has a model type of its own. On transformers 5, PEFT
    converts an adapter by the model type as if it were written for transformers 4 with the experts
    among its targets: ``gate_proj`` / ``up_proj`` / ``down_proj`` (``w1`` / ``w3`` / ``w2``) targets
    become the fused experts parameters, whatever else they name (DeepSeek's shared experts and
    dense layers), which would leave those without their LoRA."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "model_type"):
        yield
        return
    own = "model_type" in vars(config)
    before = config.model_type
    config.model_type = f"{before}_without_experts"
    try:
        yield
    finally:
        if own:
            config.model_type = before
        else:
            del config.model_type


class _PeftSave:
    """A PEFT model's ``save_pretrained`` that also writes the experts' adapters (see
    :func:`track_experts_adapters`)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, save_directory, **kwargs) -> None:
        model = self.model
        type(model).save_pretrained(model, save_directory, **kwargs)
        if kwargs.get("is_main_process", True):
            name = model.active_adapter
            # (PEFT writes the "default" adapter at the top, others in a folder of their name)
            save_peft_adapter(model, save_directory if name == "default" else os.path.join(save_directory, name))


class _PeftLoad:
    """A PEFT model's ``load_adapter`` that also reads the experts' adapters into the modules'
    current ones (see :func:`track_experts_adapters`)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, model_id, adapter_name, *args, **kwargs):
        import warnings

        model = self.model
        with warnings.catch_warnings():  # (PEFT sees the experts' tensors as keys it does not know)
            warnings.filterwarnings("ignore", message=".*unexpected.*", category=UserWarning)
            result = type(model).load_adapter(model, model_id, adapter_name, *args, **kwargs)
        if os.path.isdir(model_id) and adapter_name == model.active_adapter:
            with open(os.path.join(model_id, "adapter_config.json")) as f:
                targets = json.load(f).get("target_parameters") or []
            if any(t.endswith(("gate_up_proj", "down_proj")) for t in targets):
                # as load_peft_adapter(model, model_id, in_place=True), without its warning about the
                # other tensors: PEFT has loaded them
                loaded, _, _ = _read_adapter(model, _adapter_dir(model_id, {}))
                _assign(model, loaded, in_place=True)
        return result


def track_experts_adapters(model: nn.Module) -> nn.Module:
    """Make a PEFT-wrapped kt_jit model (``peft.get_peft_model`` of a model with KTJitExperts) save
    and load the experts' adapters with PEFT's own: its ``save_pretrained`` (which transformers'
    ``Trainer`` calls for checkpoints) writes one adapter holding both (:func:`save_peft_adapter`),
    and its ``load_adapter`` (the Trainer's resume) also copies the experts' adapters from such a
    file into the current ones (:func:`load_peft_adapter` with ``in_place``: the optimizer keeps
    its parameters). Without this PEFT saves its own adapters only. Returns ``model``."""
    if not (hasattr(model, "peft_config") and hasattr(model, "get_base_model")):
        raise ValueError(f"{type(model).__name__} is not a PEFT model (wrap it with peft.get_peft_model first)")
    _experts_modules(model)  # (raises without KTJitExperts)
    model.save_pretrained = _PeftSave(model)
    model.load_adapter = _PeftLoad(model)
    return model

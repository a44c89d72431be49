"""Reading one MoE layer's routed experts from a model checkpoint (safetensors), a few experts at a
time, so that packing or quantizing a layer never holds the whole layer in bf16.

Key layouts under a layer prefix ``P`` (e.g. ``model.layers.3.mlp``):

- per expert (Qwen2/3-MoE, DeepSeek, OLMoE, ... as saved by transformers):
  ``P.experts.{e}.gate_proj.weight [I, H]``, ``up_proj``, ``down_proj [H, I]``
- Mixtral: ``P.experts.{e}.w1.weight`` (gate), ``w3`` (up), ``w2`` (down)
- fused (transformers 5 in memory, some newer checkpoints): ``P.experts.gate_up_proj [E, 2I, H]``
  (gate rows first) and ``P.experts.down_proj [E, H, I]``
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass

import torch

_NAMES = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down", "w1": "gate", "w3": "up", "w2": "down"}
Chunk = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # gate [n, I, H], up [n, I, H], down [n, H, I]


@dataclass
class ExpertSource:
    """One layer's experts in a checkpoint: sizes, stored dtype, and ``chunk(experts slice)``."""

    num_experts: int
    hidden_size: int
    intermediate_size: int
    dtype: torch.dtype
    chunk: Callable[[slice], Chunk]


def _key_files(path: str) -> dict[str, str]:
    """Tensor name -> safetensors file, for a file or a directory (with or without an index)."""
    from safetensors import safe_open

    if os.path.isfile(path):
        files = [path]
    elif os.path.isdir(path):
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index) as f:
                return {k: os.path.join(path, v) for k, v in json.load(f)["weight_map"].items()}
        files = sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith(".safetensors"))
        if not files:
            raise ValueError(f"{path} holds no .safetensors files")
    else:
        raise ValueError(f"checkpoint {path} does not exist")
    out = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            out.update(dict.fromkeys(f.keys(), file))
    return out


_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def _configured_experts(path: str) -> int | None:
    """The routed-expert count in the ``config.json`` next to the checkpoint (also under
    ``text_config``), or None."""
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    try:
        with open(os.path.join(folder, "config.json")) as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return None
    for c in (cfg, cfg.get("text_config") or {}):
        for k in _COUNT_KEYS:
            if isinstance(c.get(k), int):
                return c[k]
    return None


def expert_source(path: str | os.PathLike, prefix: str, stack: ExitStack,
                  num_experts: int | None = None) -> ExpertSource:
    """Find the experts under ``prefix`` in the checkpoint at ``path`` (file or directory); the
    files stay open (memory-mapped) until ``stack`` closes. Everything is checked from the
    safetensors headers before any weight is read. ``num_experts`` defaults to the count in the
    checkpoint's ``config.json`` (else the highest expert index found + 1)."""
    from safetensors import safe_open

    path = os.fspath(path)
    prefix = prefix.rstrip(".")
    prefix = prefix[: -len(".experts")] if prefix.endswith(".experts") else prefix
    if os.path.isfile(path) and os.path.isfile(os.path.join(os.path.dirname(path), "model.safetensors.index.json")):
        raise ValueError(f"{path} is one shard of a sharded checkpoint: pass its directory "
                         f"({os.path.dirname(path) or '.'}) so every shard is read")
    keys = _key_files(path)
    handles: dict[str, object] = {}

    def header(key: str):
        file = keys[key]
        if file not in handles:
            handles[file] = stack.enter_context(safe_open(file, framework="pt"))
        return handles[file].get_slice(key)

    def dtype_of(key: str) -> torch.dtype:
        name = header(key).get_dtype()
        if name not in _DTYPES:
            raise ValueError(f"{key} is stored as {name}; kt_jit packs bf16/fp16/fp32 weights (dequantize the "
                             "checkpoint first)")
        return _DTYPES[name]

    biases = [k for k in keys if k.startswith(f"{prefix}.experts.") and k.endswith("bias")]
    if biases:
        raise ValueError(f"{prefix}: the experts have biases ({biases[0]}, ...); kt_jit's experts have none")
    configured = num_experts if num_experts is not None else _configured_experts(path)

    fused = (f"{prefix}.experts.gate_up_proj", f"{prefix}.experts.down_proj")
    if all(k in keys for k in fused):
        (e, a, b), (e2, c, d) = header(fused[0]).get_shape(), header(fused[1]).get_shape()
        if e2 == e and a == 2 * d and b == c:
            transposed, h, i = False, b, d      # gate_up [E, 2I, H], down [E, H, I]
        elif e2 == e and b == 2 * c and a == d:
            transposed, h, i = True, a, c       # gate_up [E, H, 2I], down [E, I, H]
        else:
            raise ValueError(f"{prefix}: experts.gate_up_proj {[e, a, b]} and experts.down_proj {[e2, c, d]} are "
                             "neither [E, 2I, H] / [E, H, I] nor their transposes")
        if configured is not None and configured != e:
            raise ValueError(f"{prefix}: the checkpoint holds {e} experts, {configured} expected")
        dtype = dtype_of(fused[0])
        dtype_of(fused[1])

        def fused_chunk(sl: slice) -> Chunk:
            gu = header(fused[0])[sl.start:sl.stop]
            down = header(fused[1])[sl.start:sl.stop]
            if transposed:
                gu, down = gu.transpose(1, 2), down.transpose(1, 2)
            return gu[:, :i], gu[:, i:], down

        return ExpertSource(e, h, i, dtype, fused_chunk)

    pattern = re.compile(rf"^{re.escape(prefix)}\.experts\.(\d+)\.({'|'.join(_NAMES)})\.weight$")
    found: dict[tuple[int, str], str] = {}
    for key in keys:
        if (m := pattern.match(key)) is not None:
            found[int(m.group(1)), _NAMES[m.group(2)]] = key
    if not found:
        near = sorted(k for k in keys if k.startswith(prefix))[:5]
        raise ValueError(f"no experts under {prefix!r} in {path} (expected {prefix}.experts.<e>.gate_proj.weight, "
                         f".w1.weight or {prefix}.experts.gate_up_proj); keys there: {near or 'none'}")
    e = configured if configured is not None else 1 + max(idx for idx, _ in found)
    missing = [f"{idx}.{part}" for idx in range(e) for part in ("gate", "up", "down") if (idx, part) not in found]
    extra = sorted({idx for idx, _ in found if idx >= e})
    if missing or extra:
        raise ValueError(f"{prefix}: experts 0..{e - 1} expected; missing {missing[:6]}, unexpected {extra[:6]} "
                         "(a shard of the checkpoint may be missing)")
    i, h = header(found[0, "gate"]).get_shape()
    dtype = dtype_of(found[0, "gate"])
    for (_, part), key in found.items():
        want = [h, i] if part == "down" else [i, h]
        if list(header(key).get_shape()) != want:
            raise ValueError(f"{key} has shape {header(key).get_shape()}, expected {want}")
        if dtype_of(key) != dtype:
            raise ValueError(f"{key} is {dtype_of(key)}, the other experts {dtype}")

    def per_expert_chunk(sl: slice) -> Chunk:
        parts = []
        for part in ("gate", "up", "down"):
            parts.append(torch.stack([header(found[idx, part])[:] for idx in range(sl.start, sl.stop)]))
        return parts[0], parts[1], parts[2]

    return ExpertSource(e, h, i, dtype, per_expert_chunk)

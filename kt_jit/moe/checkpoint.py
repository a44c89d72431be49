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


def expert_source(path: str | os.PathLike, prefix: str, stack: ExitStack) -> ExpertSource:
    """Find the experts under ``prefix`` in the checkpoint at ``path`` (file or directory); the
    files stay open (memory-mapped) until ``stack`` closes."""
    from safetensors import safe_open

    path, prefix = os.fspath(path), prefix.rstrip(".")
    keys = _key_files(path)
    handles: dict[str, object] = {}

    def reader(key: str):
        file = keys[key]
        if file not in handles:
            handles[file] = stack.enter_context(safe_open(file, framework="pt"))
        return handles[file]

    fused = (f"{prefix}.experts.gate_up_proj", f"{prefix}.experts.down_proj")
    if all(k in keys for k in fused):
        gu_shape = reader(fused[0]).get_slice(fused[0]).get_shape()
        e, two_i, h = gu_shape
        i = two_i // 2
        dtype = reader(fused[0]).get_slice(fused[0])[0:1].dtype

        def fused_chunk(sl: slice) -> Chunk:
            gu = reader(fused[0]).get_slice(fused[0])[sl.start:sl.stop]
            down = reader(fused[1]).get_slice(fused[1])[sl.start:sl.stop]
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
    e = 1 + max(idx for idx, _ in found)
    missing = [f"{idx}.{part}" for idx in range(e) for part in ("gate", "up", "down") if (idx, part) not in found]
    if missing:
        raise ValueError(f"{prefix}: experts 0..{e - 1} expected, missing {missing[:6]}")
    i, h = reader(found[0, "gate"]).get_slice(found[0, "gate"]).get_shape()
    for (idx, part), key in found.items():  # shapes from the headers, before any weight is read
        want = [h, i] if part == "down" else [i, h]
        if idx < e and list(reader(key).get_slice(key).get_shape()) != want:
            raise ValueError(f"{key} has shape {reader(key).get_slice(key).get_shape()}, expected {want}")
    first = reader(found[0, "gate"]).get_slice(found[0, "gate"])[0:1]

    def per_expert_chunk(sl: slice) -> Chunk:
        parts = []
        for part in ("gate", "up", "down"):
            rows = [reader(found[idx, part]).get_tensor(found[idx, part]) for idx in range(sl.start, sl.stop)]
            parts.append(torch.stack(rows))
        return parts[0], parts[1], parts[2]

    return ExpertSource(e, h, i, first.dtype, per_expert_chunk)

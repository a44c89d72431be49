"""Reading one MoE layer's routed experts from a model checkpoint (safetensors), a few experts at a
time, so that packing or quantizing a layer never holds the whole layer in bf16.

Key layouts under a layer prefix ``P`` (e.g. ``model.layers.3.mlp``):

- per expert (Qwen2/3-MoE, DeepSeek, OLMoE, ... as saved by transformers):
  ``P.experts.{e}.gate_proj.weight [I, H]``, ``up_proj``, ``down_proj [H, I]``
- Mixtral: ``P.experts.{e}.w1.weight`` (gate), ``w3`` (up), ``w2`` (down)
- fused (transformers 5 in memory, some newer checkpoints): ``P.experts.gate_up_proj [E, 2I, H]``
  (gate rows first) and ``P.experts.down_proj [E, H, I]``

Weights are bf16, fp16 or fp32, or (per-expert keys) FP8 with block scales as DeepSeek-V3/R1 and the
Qwen3 FP8 checkpoints store them: ``...weight`` float8_e4m3fn (or e5m2) ``[N, K]`` next to
``...weight_scale_inv`` fp32 ``[ceil(N/bn), ceil(K/bk)]``, weight = fp8 value x its block's scale,
with the block size from ``config.json`` (``quantization_config.weight_block_size``), else 128.
The JIT packer (kernels/packer.py) dequantizes those on the fly as it packs or quantizes them (block
widths that are not a multiple of 32 go through fp32 a few experts at a time), so an FP8 checkpoint
is packed without a bf16 copy of it ever being written (DeepSeek-V3 in bf16: ~1.3 TB).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass

import torch

from ..kernels import packer
from ..kernels.packer import Fp8Weight, Source

PER_EXPERT_NAMES = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down", "w1": "gate", "w3": "up", "w2": "down"}
# gate [n, I, H], up [n, I, H], down [n, H, I]: stacked, or lists of the n experts' matrices
Chunk = tuple[torch.Tensor | list, torch.Tensor | list, torch.Tensor | list]


@dataclass
class ExpertSource:
    """One layer's experts in a checkpoint: sizes, stored dtype, and ``chunk(experts slice)``."""

    num_experts: int
    hidden_size: int
    intermediate_size: int
    dtype: torch.dtype
    chunk: Callable[[slice], Chunk]


class NoExpertsError(ValueError):
    """A checkpoint holds no experts under the prefix asked for."""


def _read_json(file: str) -> dict:
    """The JSON object in ``file`` (ValueError naming the file when it is anything else)."""
    try:
        with open(file) as f:
            data = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{file} is not valid JSON ({exc}): restore it from the original checkpoint") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file} holds a JSON {type(data).__name__}, not an object: restore it from the original "
                         "checkpoint")
    return data


def _open_safetensors(file: str):
    """``safe_open(file)``; ValueError naming the file when it is missing or not safetensors."""
    from safetensors import SafetensorError, safe_open

    if not os.path.isfile(file):
        raise ValueError(f"{file} is not there or not a file (a shard of the checkpoint that was not downloaded, "
                         "or a broken link?)")
    try:
        return safe_open(file, framework="pt")
    except SafetensorError as exc:
        raise ValueError(f"{file} is not a readable safetensors file ({exc}): download or write it again") from None


def _key_files(path: str) -> dict[str, str]:
    """Tensor name -> safetensors file, for a file or a directory (with or without an index)."""
    if os.path.isfile(path):
        files = [path]
    elif os.path.isdir(path):
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(index):
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise ValueError(f"{index} has no weight_map (tensor name -> file): restore it from the original "
                                 "checkpoint")
            return {k: os.path.join(path, v) for k, v in weight_map.items()}
        files = sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith(".safetensors"))
        if not files:
            raise ValueError(f"{path} holds no .safetensors files")
    else:
        raise ValueError(f"checkpoint {path} does not exist")
    out = {}
    for file in files:
        with _open_safetensors(file) as f:
            out.update(dict.fromkeys(f.keys(), file))
    return out


_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
_FP8_DTYPES = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_FP8_BLOCK = 128  # DeepSeek-V3's and Qwen3's FP8 block size, when config.json does not give one
_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def read_config(folder: str) -> dict:
    """The ``config.json`` in the directory ``folder`` as a dict: {} when there is none, ValueError
    naming the file when it is not a JSON object."""
    file = os.path.join(folder, "config.json")
    return _read_json(file) if os.path.isfile(file) else {}


def _config(path: str) -> dict:
    """The ``config.json`` next to the checkpoint (a file or directory), or {}."""
    return read_config(path if os.path.isdir(path) else os.path.dirname(path) or ".")


def packed_experts_files(folder: str) -> dict[str, str] | None:
    """For a model directory kt_jit's ``save_pretrained`` wrote, its packed experts' files (module
    name -> path relative to ``folder``, from ``config.json``'s ``quantization_config``, also under
    ``text_config``); None for any other directory or file."""
    if not os.path.isdir(folder):
        return None
    cfg = read_config(folder)
    for where, c in (("", cfg), ("text_config.", cfg.get("text_config") or {})):
        q = c.get("quantization_config") if isinstance(c, dict) else None
        if isinstance(q, dict) and q.get("quant_method") == "kt_jit" and q.get("packed_experts"):
            files = q["packed_experts"]
            if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
                raise ValueError(f"{folder}/config.json: {where}quantization_config.packed_experts must map module "
                                 f"names to files, got {files!r:.80}")
            return files
    return None


def _configured_experts(cfg: dict) -> int | None:
    """The routed-expert count in a ``config.json`` (also under ``text_config``), or None."""
    for c in (cfg, cfg.get("text_config") or {}):
        for k in _COUNT_KEYS:
            if isinstance(c, dict) and isinstance(c.get(k), int):
                return c[k]
    return None


def _fp8_block(cfg: dict) -> tuple[int, int]:
    """The FP8 scale block ``(rows, columns)`` of a ``config.json`` (``quantization_config.
    weight_block_size``, also under ``text_config``), else 128 x 128."""
    for c in (cfg, cfg.get("text_config") or {}):
        q = c.get("quantization_config") if isinstance(c, dict) else None
        if isinstance(q, dict) and q.get("weight_block_size") is not None:
            return fp8_block_size(q)
    return _FP8_BLOCK, _FP8_BLOCK


def fp8_block_size(quantization_config: dict) -> tuple[int, int]:
    """The scale block ``(rows, columns)`` of a checkpoint's FP8 ``quantization_config``
    (``weight_block_size``, else DeepSeek-V3's and Qwen3's 128 x 128)."""
    block = quantization_config.get("weight_block_size")
    if block is None:
        return _FP8_BLOCK, _FP8_BLOCK
    if not (isinstance(block, list | tuple) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise ValueError(f"config.json: quantization_config.weight_block_size must be [rows, columns], got {block!r}")
    return block[0], block[1]


def _check_scale_shape(key: str, scale_shape, shape, block: tuple[int, int]) -> None:
    """Raise ValueError unless the scales of the ``shape [N, K]`` matrix ``key`` are ``[ceil(N/bn),
    ceil(K/bk)]``."""
    want = [-(-shape[0] // block[0]), -(-shape[1] // block[1])]
    if list(scale_shape) != want:
        raise ValueError(f"{key}_scale_inv has shape {list(scale_shape)}, expected {want} (blocks of {block[0]} x "
                         f"{block[1]}; config.json's quantization_config.weight_block_size sets another block size)")


def check_fp8_scales(key: str, w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> None:
    """Raise ValueError naming ``key`` unless ``w`` is a 2-D FP8 matrix ``[N, K]`` and
    ``scale_inv`` its float block scales ``[ceil(N/bn), ceil(K/bk)]``."""
    if w.dtype not in _FP8_DTYPES.values() or w.dim() != 2:
        raise ValueError(f"{key} is a {w.dim()}-D {w.dtype} tensor next to block scales; kt_jit reads FP8 "
                         "(float8_e4m3fn / e5m2) matrices with block scales")
    _check_scale_shape(key, scale_inv.shape, w.shape, block)
    if not scale_inv.is_floating_point() or scale_inv.dtype in _FP8_DTYPES.values():
        raise ValueError(f"{key}_scale_inv is {scale_inv.dtype}; block scales must be fp32, bf16 or fp16")


def fp8_source(key: str, w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> Source:
    """What the packers take for the FP8 matrix ``key`` (``w [N, K]``, block scales ``scale_inv
    [ceil(N/bn), ceil(K/bk)]``): an :class:`Fp8Weight`, or, for block widths the JIT packer does not
    read (not a multiple of 32), the matrix dequantized to fp32. Raises ValueError naming ``key``
    when the scales do not fit the blocks."""
    check_fp8_scales(key, w, scale_inv, block)
    if block[1] % packer.CHUNK:  # (the JIT packer's FP8 path reads scales per 32 columns)
        return dequantize_fp8_blocks(w, scale_inv, block)
    return Fp8Weight(w, scale_inv.float().contiguous(), block)


def dequantize_fp8_blocks(w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """FP8 weights ``w [..., N, K]`` with block scales ``scale_inv [..., ceil(N/bn), ceil(K/bk)]``
    (fp32; DeepSeek-V3's naming: the factor that restores the weight) as fp32 ``w * scale``."""
    bn, bk = block
    n, k = w.shape[-2:]
    out = w.float()
    if n % bn == 0 and k % bk == 0:  # (every real checkpoint: scaled in place through a block view, 1.6x faster)
        out.view(*w.shape[:-2], n // bn, bn, k // bk, bk).mul_(scale_inv.float()[..., :, None, :, None])
        return out
    return out.mul_(scale_inv.float().repeat_interleave(bn, dim=-2)[..., :n, :].repeat_interleave(bk, dim=-1)[..., :k])


def expert_source(path: str | os.PathLike, prefix: str, stack: ExitStack,
                  num_experts: int | None = None) -> ExpertSource:
    """Find the experts under ``prefix`` in the checkpoint at ``path`` (file or directory); the
    files stay open (memory-mapped) until ``stack`` closes. Everything is checked from the
    safetensors headers before any weight is read. ``num_experts`` defaults to the count in the
    checkpoint's ``config.json`` (else the highest expert index found + 1)."""
    path = os.fspath(path)
    prefix = prefix.rstrip(".")
    prefix = prefix[: -len(".experts")] if prefix.endswith(".experts") else prefix
    if os.path.isfile(path) and os.path.isfile(os.path.join(os.path.dirname(path), "model.safetensors.index.json")):
        raise ValueError(f"{path} is one shard of a sharded checkpoint: pass its directory "
                         f"({os.path.dirname(path) or '.'}) so every shard is read")
    keys = _key_files(path)
    cfg = _config(path)
    handles: dict[str, object] = {}

    def header(key: str):
        file = keys[key]
        if file not in handles:
            handles[file] = stack.enter_context(_open_safetensors(file))
        return handles[file].get_slice(key)

    def dtype_of(key: str) -> torch.dtype:
        name = header(key).get_dtype()
        if name in _FP8_DTYPES:
            return _FP8_DTYPES[name]
        if name not in _DTYPES:
            raise ValueError(f"{key} is stored as {name}; kt_jit packs bf16/fp16/fp32 weights, and FP8 ones with "
                             "block scales (dequantize the checkpoint first)")
        return _DTYPES[name]

    biases = [k for k in keys if k.startswith(f"{prefix}.experts.") and k.endswith("bias")]
    if biases:
        raise ValueError(f"{prefix}: the experts have biases ({biases[0]}, ...); kt_jit's experts have none")
    configured = num_experts if num_experts is not None else _configured_experts(cfg)

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
        if e == 0 or (configured is not None and configured != e):
            raise ValueError(f"{prefix}: the checkpoint holds {e} experts, {configured or 'at least one'} expected")
        dtype = dtype_of(fused[0])
        if dtype in _FP8_DTYPES.values() or dtype_of(fused[1]) in _FP8_DTYPES.values():
            raise ValueError(f"{prefix}: fused FP8 experts (experts.gate_up_proj) are not read; FP8 is read from "
                             "per-expert keys with a weight_scale_inv each (dequantize the checkpoint first)")

        def fused_chunk(sl: slice) -> Chunk:
            gu = header(fused[0])[sl.start:sl.stop]
            down = header(fused[1])[sl.start:sl.stop]
            if transposed:  # (rows with unit column stride for the JIT packer)
                gu, down = gu.transpose(1, 2).contiguous(), down.transpose(1, 2).contiguous()
            return gu[:, :i], gu[:, i:], down

        return ExpertSource(e, h, i, dtype, fused_chunk)

    pattern = re.compile(rf"^{re.escape(prefix)}\.experts\.(\d+)\.({'|'.join(PER_EXPERT_NAMES)})\.weight$")
    found: dict[tuple[int, str], str] = {}
    for key in keys:
        if (m := pattern.match(key)) is not None:
            found[int(m.group(1)), PER_EXPERT_NAMES[m.group(2)]] = key
    if not found:
        near = sorted(k for k in keys if k.startswith(prefix))[:5]
        raise NoExpertsError(f"no experts under {prefix!r} in {path} (expected {prefix}.experts.<e>.gate_proj.weight, "
                             f".w1.weight or {prefix}.experts.gate_up_proj); keys there: {near or 'none'}")
    e = configured if configured is not None else 1 + max(idx for idx, _ in found)
    missing = [f"{idx}.{part}" for idx in range(e) for part in ("gate", "up", "down") if (idx, part) not in found]
    extra = sorted({idx for idx, _ in found if idx >= e})
    if missing or extra:
        raise ValueError(f"{prefix}: experts 0..{e - 1} expected; missing {missing[:6]}, unexpected {extra[:6]} "
                         "(a shard of the checkpoint may be missing)")
    i, h = header(found[0, "gate"]).get_shape()
    dtype = dtype_of(found[0, "gate"])
    fp8 = dtype in _FP8_DTYPES.values()
    block = _fp8_block(cfg) if fp8 else (0, 0)
    for (_, part), key in found.items():
        want = [h, i] if part == "down" else [i, h]
        if list(header(key).get_shape()) != want:
            raise ValueError(f"{key} has shape {header(key).get_shape()}, expected {want}")
        if (other := dtype_of(key)) != dtype:
            raise ValueError(f"{key} is {other}, {found[0, 'gate']} {dtype}: every expert matrix of a layer must "
                             "be stored in one dtype")
        if fp8:
            scale_key = key + "_scale_inv"
            if scale_key not in keys:
                raise ValueError(f"{key} is FP8 but the checkpoint has no {scale_key} (its block scales); "
                                 "dequantize the checkpoint first")
            if header(scale_key).get_dtype() not in _DTYPES:
                raise ValueError(f"{scale_key} is stored as {header(scale_key).get_dtype()}; block scales must be "
                                 "fp32, bf16 or fp16")
            _check_scale_shape(key, header(scale_key).get_shape(), want, block)

    def load(idx: int, part: str) -> Source:
        key = found[idx, part]
        if not fp8:
            return header(key)[:]
        return fp8_source(key, header(key)[:], header(key + "_scale_inv")[:], block)

    def per_expert_chunk(sl: slice) -> Chunk:
        parts = []
        for part in ("gate", "up", "down"):
            parts.append([load(idx, part) for idx in range(sl.start, sl.stop)])
        return parts[0], parts[1], parts[2]

    return ExpertSource(e, h, i, dtype, per_expert_chunk)

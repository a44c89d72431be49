"""Weight containers: frozen packed experts (:class:`MoEExperts`) and trainable LoRA (:class:`MoELoRA`)."""

from __future__ import annotations

import functools
import math
import os
import types

import torch
from torch import nn

from ..kernels import packer
from ..kernels.pack import check_gemm_dims, pack_bf16, unpack_tiles
from ..kernels.packer import Fp8Weight, Source
from ..kernels.quant import dequantize_int4, dequantize_int8, pack_int4, pack_int8
from ..runtime.buffers import ALIGN, aligned_empty, resident_empty
from ..runtime.checks import check_int, check_real
from ..runtime.cpu import cpu_info
from .aligned_file import is_padding, save_aligned
from .gradbuf import LoraGradBuffers

# mode -> (storage, grouped along K, zero points)
QUANT_MODES = {
    "bf16": ("bf16", False, False),
    "int8": ("int8", False, False),        # symmetric, per output channel
    "int4": ("int4", False, False),        # symmetric, per output channel
    "int4_1": ("int4", False, True),       # asymmetric (scale + zero point), per output channel
    "int4_kgroup": ("int4", True, False),  # symmetric, per group of group_size along K
    "int4_1kgroup": ("int4", True, True),  # asymmetric, per group
}
FORMAT_VERSION = 2  # 2: int4 rows 2i and 2i+1 share bytes (low/high nibbles), see kernels/quant.py
_STORAGE_DTYPES = {"bf16": torch.bfloat16, "int8": torch.int8, "int4": torch.uint8}
_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_PACK_CHUNK_BYTES = 256 << 20  # bound the temporary memory of packing


def _check_expert_tensor(name: str, t: torch.Tensor, shape: tuple[int, int, int] | None) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 3:
        raise ValueError(f"{name} must be 3-D [experts, out, in], got shape {tuple(t.shape)}")
    if t.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be bfloat16, float16 or float32, got {t.dtype}")
    if t.device.type != "cpu":
        raise ValueError(f"{name} must be on the CPU, got {t.device}")
    if shape is not None and tuple(t.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {shape}")


def _pack(w: torch.Tensor, quant: str, group_size: int) -> dict[str, torch.Tensor]:
    """The torch path: ``w [..., N, K]`` (float) packed (quantized) as tensors keyed by suffix."""
    storage, grouped, zero_point = QUANT_MODES[quant]
    if storage == "bf16":
        return {"": pack_bf16(w)}
    if storage == "int8":
        packed, scale = pack_int8(w)
        return {"": packed, "_scale": scale.unsqueeze(-2)}
    packed, scale, zero = pack_int4(w, group_size if grouped else 0, zero_point)
    out = {"": packed, "_scale": scale}
    if zero is not None:
        out["_zero"] = zero
    return out


def _allocate(t: dict[str, torch.Tensor], name: str, e: int, n: int, k: int, quant: str, group_size: int) -> None:
    """The resident tensors ``name``, ``name_scale``, ``name_zero`` of an ``e``-expert ``[N, K]``
    matrix (uninitialised), unless ``t`` has them."""
    if name in t:
        return
    storage, grouped, zero_point = QUANT_MODES[quant]
    shape = (e, n // 16, k // 2, 16) + ((2,) if storage != "int4" else ())
    t[name] = resident_empty(shape, _STORAGE_DTYPES[storage])
    g = k // group_size if grouped else 1
    if storage != "bf16":
        t[f"{name}_scale"] = resident_empty((e, g, n), torch.float32)
    if zero_point:
        t[f"{name}_zero"] = resident_empty((e, g, n), torch.uint8)


def _pack_into(t: dict[str, torch.Tensor], name: str, e: int, e0: int, experts: list[list[Source]], quant: str,
               group_size: int) -> None:
    """Pack experts ``e0, e0 + 1, ...`` of an ``e``-expert matrix into ``t[name + suffix]`` (allocated
    on first use); ``experts[j]`` is expert ``e0 + j``'s matrix ``[N, K]`` as the vertical
    concatenation of its parts (gate, up). The JIT packer (kernels/packer.py) writes the resident
    tensors directly, 15-75x faster than the torch path, which gives the same bytes and takes the
    float parts the packer does not (a column stride, gate and up in different dtypes; any part on a
    CPU without AVX-512 BF16, where FP8 parts are refused)."""
    storage, grouped, _ = QUANT_MODES[quant]
    parts = [p for ex in experts for p in ex]
    rows, k = (parts[0].weight if isinstance(parts[0], Fp8Weight) else parts[0]).shape
    _allocate(t, name, e, rows * len(experts[0]), k, quant, group_size)
    dtypes = {(p.weight if isinstance(p, Fp8Weight) else p).dtype for p in parts}
    if cpu_info().avx512_bf16 and len(dtypes) == 1 and all(packer.supports(p) for p in parts):
        packer.pack_into(t[name], t.get(f"{name}_scale"), t.get(f"{name}_zero"), e0, experts,
                         group_size if grouped else 0)
    else:
        if any(isinstance(p, Fp8Weight) for p in parts):
            raise ValueError("FP8 weights are packed by the JIT packer only, which needs AVX-512 BF16 and a scale "
                             "block width that is a multiple of 32; dequantize the checkpoint first")
        w = torch.stack([torch.cat(list(ex)) if len(ex) > 1 else ex[0] for ex in experts])
        for suffix, part in _pack(w, quant, group_size).items():
            t[name + suffix][e0:e0 + len(experts)] = part
    if storage != "bf16":
        _check_finite_scales(t[f"{name}_scale"][e0:e0 + len(experts)], name, e0)


def _check_finite_scales(scale: torch.Tensor, name: str, e0: int) -> None:
    """Raise ValueError naming the first weight group whose scale is NaN or infinite (``scale [n, g,
    N]`` of experts ``e0...`` of ``name``, "gate_up" (gate rows first) or "down"): a NaN or inf
    weight would otherwise quantize to finite codes and silently wipe out its channel or group."""
    bad = ~torch.isfinite(scale)
    if not bad.any():
        return
    j, grp, ch = (int(v) for v in bad.nonzero()[0])
    gate_rows = scale.shape[-1] // 2 if name == "gate_up" else 0
    proj = "down_proj" if name == "down" else "gate_proj" if ch < gate_rows else "up_proj"
    row = ch - gate_rows if proj == "up_proj" else ch
    raise ValueError(f"{proj} of expert {e0 + j} has NaN or infinite values (output channel {row}, weight group "
                     f"{grp}); quantizing would hide them. Fix the weights, or load this layer with quant='bf16'")


def pack_expert_matrix(w: torch.Tensor, name: str, quant: str, group_size: int,
                       transposed: bool = False) -> dict[str, torch.Tensor]:
    """One stacked expert matrix ``w [E, N, K]`` (``transposed``: ``[E, K, N]``) packed (quantized) a
    few experts at a time, as the tensors ``name``, ``name_scale``, ``name_zero`` of an
    :class:`MoEExperts` (``name`` "gate_up" or "down"). ``quant``/``group_size`` as validated by
    :meth:`MoEExperts.from_tensors`."""
    e = w.shape[0]
    t: dict[str, torch.Tensor] = {}
    step = max(1, _PACK_CHUNK_BYTES // (w[0].numel() * w.element_size()))
    for e0 in range(0, e, step):
        chunk = w[e0:e0 + step]
        if transposed:  # (rows with unit column stride for the JIT packer: one copy of a few experts)
            chunk = chunk.transpose(1, 2).contiguous()
        _pack_into(t, name, e, e0, [[x] for x in chunk], quant, group_size)
    return t


def pack_expert_parts(experts: list[list[Source]], name: str, quant: str, group_size: int) -> dict[str, torch.Tensor]:
    """One layer's expert matrix given per expert, ``experts[e]`` = its parts (``[gate [I, H], up
    [I, H]]`` or ``[down [H, I]]``; tensors or :class:`~kt_jit.kernels.packer.Fp8Weight`), packed
    (quantized) a few experts at a time into the tensors ``name``, ``name_scale``, ``name_zero`` of
    an :class:`MoEExperts`. ``quant``/``group_size`` as validated by :meth:`MoEExperts.from_tensors`."""
    first = experts[0][0].weight if isinstance(experts[0][0], Fp8Weight) else experts[0][0]
    t: dict[str, torch.Tensor] = {}
    step = max(1, _PACK_CHUNK_BYTES // (4 * first.numel() * len(experts[0])))  # (fp32 on the torch path)
    for e0 in range(0, len(experts), step):
        _pack_into(t, name, len(experts), e0, experts[e0:e0 + step], quant, group_size)
    return t


def _check_layout(h: int, i: int, quant: str, group_size: int) -> None:
    """A known quantization mode, H and I multiples of 32, and (K-group modes) a group size that is a
    multiple of 32 dividing both."""
    if not isinstance(quant, str) or quant not in QUANT_MODES:
        raise ValueError(f"quant must be one of {tuple(QUANT_MODES)}, got {quant!r}")
    check_gemm_dims(i, h, "expert")
    check_int(group_size, "group_size", positive=False, hint="a multiple of 32")
    if QUANT_MODES[quant][1] and (group_size <= 0 or group_size % 32 or h % group_size or i % group_size):
        raise ValueError(f"group_size={group_size} must be a positive multiple of 32 that divides both "
                         f"hidden_size={h} and intermediate_size={i}")


def _check_packed_tensors(t: dict[str, torch.Tensor], h: int, i: int, quant: str, group_size: int) -> None:
    """Every tensor a kernel will be pointed at: present, CPU, contiguous, of the right dtype and shape."""
    _check_layout(h, i, quant, group_size)
    storage, grouped, zero_point = QUANT_MODES[quant]
    if "gate_up" not in t:
        raise ValueError("packed experts need a 'gate_up' tensor")
    e = t["gate_up"].shape[0]
    g = {"gate_up": h // group_size if grouped else 1, "down": i // group_size if grouped else 1}
    expect: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for name, n, k in (("gate_up", 2 * i, h), ("down", h, i)):
        expect[name] = ((e, n // 16, k // 2, 16) + ((2,) if storage != "int4" else ()), _STORAGE_DTYPES[storage])
        if storage != "bf16":
            expect[f"{name}_scale"] = ((e, g[name], n), torch.float32)
        if zero_point:
            expect[f"{name}_zero"] = ((e, g[name], n), torch.uint8)
    if set(t) != set(expect):
        raise ValueError(f"packed {quant} experts need tensors {sorted(expect)}, got {sorted(t)}")
    for name, (shape, dtype) in expect.items():
        x = t[name]
        if tuple(x.shape) != shape or x.dtype != dtype or x.device.type != "cpu" or not x.is_contiguous():
            raise ValueError(f"tensor {name!r} must be a contiguous CPU {dtype} tensor of shape {shape}, "
                             f"got {x.dtype} {tuple(x.shape)} on {x.device}")


class MoEExperts:
    """The frozen routed experts of one MoE layer, packed once into kt_jit's tile layout.

    ``gate_up`` is the packed ``cat([gate, up], dim=1)`` (one GEMM with N = 2I computes gate and up
    together, forward and transposed) and ``down`` the packed down projection, in the tile order of
    kernels/pack.py: bf16 ``[E, N/16, K/2, 16, 2]``, int8 the same shape, int4 ``[E, N/16, K/2, 16]``
    nibbles (rows 2i and 2i+1 of a block share bytes, see kernels/quant.py). Quantized modes add
    ``<name>_scale [E, G, N]`` fp32 (G = 1 per channel, else K / group_size) and, for the asymmetric
    ``_1`` modes, ``<name>_zero [E, G, N]`` uint8. Nothing else
    is kept: no transposed or dequantized copy. ``tensors`` is a read-only mapping and the sizes
    and mode are read-only attributes: the kernels address these tensors as they were checked, so
    an object never changes after construction (build a new one instead).
    """

    _FIXED = frozenset({"tensors", "gate_up", "down", "num_experts", "hidden_size", "intermediate_size", "quant",
                        "storage", "zero_point", "group_size"})

    def __init__(self, tensors: dict[str, torch.Tensor], hidden_size: int, intermediate_size: int,
                 quant: str = "bf16", group_size: int = 0) -> None:
        _check_packed_tensors(tensors, hidden_size, intermediate_size, quant, group_size)
        self.tensors = types.MappingProxyType(dict(tensors))
        self.gate_up, self.down = tensors["gate_up"], tensors["down"]
        self.num_experts = self.gate_up.shape[0]
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.quant = quant
        self.storage, grouped, self.zero_point = QUANT_MODES[quant]
        self.group_size = int(group_size) if grouped else 0
        self.__dict__["_frozen"] = True

    def __setattr__(self, name: str, value) -> None:
        if name in self._FIXED and self.__dict__.get("_frozen"):
            # (routing checks expert ids against num_experts and the kernels size their reads by
            # these: a changed value would have them read out of bounds)
            raise AttributeError(f"MoEExperts.{name} is read-only: the packed tensors were checked against it; "
                                 "build a new MoEExperts (from_tensors, load) instead")
        super().__setattr__(name, value)

    def __getstate__(self) -> dict:  # (copy.deepcopy, pickle: a mapping proxy is neither)
        state = self.__dict__.copy()
        state["tensors"] = dict(self.tensors)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, tensors=types.MappingProxyType(dict(state["tensors"])))

    def zeros(self, name: str) -> torch.Tensor | None:
        """Zero points of ``"gate_up"`` or ``"down"`` ([E, G, N] uint8) for asymmetric modes."""
        return self.tensors.get(f"{name}_zero")

    def scales(self, name: str) -> torch.Tensor | None:
        """Per-channel scales of ``"gate_up"`` or ``"down"`` ([E, N] fp32), None for bf16."""
        return self.tensors.get(f"{name}_scale")

    @classmethod
    def from_tensors(cls, gate_proj: torch.Tensor, up_proj: torch.Tensor, down_proj: torch.Tensor,
                     quant: str = "bf16", group_size: int = 128) -> MoEExperts:
        """Pack (and quantize, online) Hugging Face-layout experts: gate/up ``[E, I, H]``, down
        ``[E, H, I]`` (bf16/fp16/fp32). H and I must be multiples of 32.

        ``quant``: "bf16", "int8", "int4", "int4_1", "int4_kgroup", "int4_1kgroup" (see
        QUANT_MODES); ``group_size`` (K-group modes only) any multiple of 32 dividing H and I.
        The inputs are not kept; free them to save memory.
        """
        _check_expert_tensor("gate_proj", gate_proj, None)
        e, i, h = gate_proj.shape
        if e == 0:
            raise ValueError("gate_proj holds no experts (shape [0, I, H]): give at least one")
        _check_expert_tensor("up_proj", up_proj, (e, i, h))
        _check_expert_tensor("down_proj", down_proj, (e, h, i))
        return cls._pack_chunks(e, h, i, lambda sl: (gate_proj[sl], up_proj[sl], down_proj[sl]), quant, group_size)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, prefix: str, quant: str = "bf16",
                        group_size: int = 128, num_experts: int | None = None) -> MoEExperts:
        """Pack (and quantize) one layer's routed experts straight from a safetensors checkpoint
        (a file, or a directory with or without ``model.safetensors.index.json``), reading a few
        experts at a time: the layer is never whole in memory before packing. ``prefix`` is the
        layer's MoE module, e.g. ``"model.layers.3.mlp"`` (Mixtral: ``...block_sparse_moe``).
        Per-expert keys (``experts.<e>.gate_proj/up_proj/down_proj`` or ``w1/w3/w2``) and fused
        ones (``experts.gate_up_proj [E, 2I, H]``, ``experts.down_proj [E, H, I]``, or both
        transposed) are recognised; see kt_jit/moe/checkpoint.py. Per-expert FP8 weights with
        block scales (DeepSeek-V3/R1's format: ``weight`` float8_e4m3fn and ``weight_scale_inv``,
        the block size from ``config.json``, else 128 x 128) are dequantized in registers by the
        JIT packer as it packs them (block widths that are not a multiple of 32: to fp32 a few
        experts at a time), so no bf16 copy of the checkpoint is needed. The expert count comes from
        ``num_experts``, else the checkpoint's ``config.json``, else the highest index found; pass
        a sharded checkpoint's directory, not one shard. ``quant``/``group_size`` as in
        :meth:`from_tensors`."""
        from contextlib import ExitStack

        from .checkpoint import expert_source

        with ExitStack() as stack:
            src = expert_source(path, prefix, stack, num_experts)
            return cls._pack_chunks(src.num_experts, src.hidden_size, src.intermediate_size, src.chunk, quant,
                                    group_size)

    @classmethod
    def _pack_chunks(cls, e: int, h: int, i: int, chunk, quant: str, group_size: int) -> MoEExperts:
        """Pack experts delivered by ``chunk(slice of experts) -> (gate, up, down)`` a few at a time
        (bounded temporary memory); each of the three is a sequence of the slice's expert matrices
        (a stacked tensor, or a list of tensors or :class:`~kt_jit.kernels.packer.Fp8Weight`)."""
        _check_layout(h, i, quant, group_size)  # (before the packing: the constructor checks again)
        grouped = QUANT_MODES[quant][1]
        t: dict[str, torch.Tensor] = {}
        step = max(1, _PACK_CHUNK_BYTES // (12 * i * h))  # (fp32 inputs: 3 matrices of 4 bytes)
        for e0 in range(0, e, step):
            gate, up, down = chunk(slice(e0, min(e, e0 + step)))
            _pack_into(t, "gate_up", e, e0, [[g, u] for g, u in zip(gate, up, strict=True)], quant, group_size)
            _pack_into(t, "down", e, e0, [[d] for d in down], quant, group_size)
        return cls(t, h, i, quant, group_size if grouped else 0)

    def dequantize(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(gate [E, I, H], up [E, I, H], down [E, H, I])`` as the kernels compute with them
        (bf16 for bf16 experts; fp32 ``q * scale`` for quantized ones)."""
        i = self.intermediate_size

        def one(name: str) -> torch.Tensor:
            packed = self.tensors[name]
            if self.storage == "bf16":
                return unpack_tiles(packed)
            if self.storage == "int8":
                return dequantize_int8(packed, self.tensors[f"{name}_scale"].squeeze(-2))
            return dequantize_int4(packed, self.tensors[f"{name}_scale"], self.zeros(name))

        gu = one("gate_up")
        return gu[:, :i].contiguous(), gu[:, i:].contiguous(), one("down")

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def expert_bytes(self) -> int:
        """Bytes of one expert's three matrices as stored (what a pass reads per active expert)."""
        return self.nbytes // self.num_experts

    def save(self, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
        """Write the packed (quantized) weights as safetensors with kt_jit metadata (plus the string
        pairs of ``metadata``), every tensor at a 64-byte file offset (so that :meth:`load`'s memory
        map gives aligned tensors), atomically."""
        meta = dict(metadata or {}) | {
            "format": "kt_jit.MoEExperts", "format_version": str(FORMAT_VERSION), "quant": self.quant,
            "group_size": str(self.group_size), "num_experts": str(self.num_experts),
            "hidden_size": str(self.hidden_size), "intermediate_size": str(self.intermediate_size)}
        if os.path.isdir(path):
            example = os.path.join(path, "experts.safetensors")
            raise ValueError(f"{path} is a directory; give a file name (e.g. {example})")
        save_aligned(dict(self.tensors), path, meta)

    @classmethod
    def load(cls, path: str | os.PathLike, mmap: bool = True) -> MoEExperts:
        """Load a file written by :meth:`save` (no re-quantization).

        With ``mmap`` (default) the tensors are memory-mapped from the file: nothing is read until
        used, the pages are shared between processes and they count as page cache, not as the
        process's own memory; but the file must stay as it is while the experts are in use
        (truncating or overwriting it in place kills the process with SIGBUS; :meth:`save` itself
        replaces files atomically). ``mmap=False`` reads everything into memory. Tensors off 64-byte
        alignment (files from other writers, or from kt_jit before it aligned them) are copied
        into aligned memory: the kernels stream 64-byte lines.
        """
        from safetensors import SafetensorError, safe_open

        if os.path.isdir(path):
            raise ValueError(f"{path} is a directory, not a file written by MoEExperts.save")

        try:
            with safe_open(os.fspath(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != "kt_jit.MoEExperts":
                    raise ValueError(f"{path} is not a kt_jit MoEExperts file (no kt_jit metadata)")
                # version 1 differs only in the int4 layout
                readable = {str(FORMAT_VERSION)} | ({"1"} if not meta.get("quant", "").startswith("int4") else set())
                if meta.get("format_version") not in readable:
                    raise ValueError(f"{path} has format version {meta.get('format_version')}; this kt_jit reads "
                                     f"version {FORMAT_VERSION}. Re-create it with MoEExperts.from_tensors(...).save()")
                tensors = {k: f.get_tensor(k) for k in f.keys() if not is_padding(k)}  # noqa: SIM118
        except SafetensorError as e:
            raise ValueError(f"{path} is not a readable safetensors file ({e}); it may be truncated") from e
        for k, v in tensors.items():
            # (files written without the 64-byte layout map off alignment: copied)
            if not mmap or v.data_ptr() % ALIGN:
                tensors[k] = aligned_empty(tuple(v.shape), v.dtype).copy_(v)
        try:
            e, h, i = int(meta["num_experts"]), int(meta["hidden_size"]), int(meta["intermediate_size"])
            quant, gs = meta["quant"], int(meta.get("group_size", "0"))
        except (KeyError, ValueError) as err:
            raise ValueError(f"{path}: its kt_jit metadata is incomplete or malformed ({err!r}); "
                             "re-create it with MoEExperts.save()") from err
        if quant not in QUANT_MODES:
            raise ValueError(f"{path}: unknown quant mode {quant!r}")
        if "gate_up" in tensors and tensors["gate_up"].shape[0] != e:
            raise ValueError(f"{path}: holds {tensors['gate_up'].shape[0]} experts, its metadata says {e}")
        try:
            return cls(tensors, h, i, quant, gs)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from err

    def __repr__(self) -> str:
        gs = f", group_size={self.group_size}" if self.group_size else ""
        return (f"MoEExperts(experts={self.num_experts}, hidden={self.hidden_size}, "
                f"intermediate={self.intermediate_size}, quant={self.quant!r}{gs}, {self.nbytes / 1e9:.2f} GB)")


LORA_NAMES = ("gate_lora_a", "gate_lora_b", "up_lora_a", "up_lora_b", "down_lora_a", "down_lora_b")


def lora_shapes(e: int, h: int, i: int, r: int) -> dict[str, tuple[int, int, int]]:
    """Shapes of the six per-expert LoRA tensors (A: [E, r, in], B: [E, out, r])."""
    return {"gate_lora_a": (e, r, h), "gate_lora_b": (e, i, r), "up_lora_a": (e, r, h),
            "up_lora_b": (e, i, r), "down_lora_a": (e, r, i), "down_lora_b": (e, h, r)}


@functools.cache
def _lora_shape_list(e: int, h: int, i: int, r: int) -> tuple[tuple[str, torch.Size], ...]:
    return tuple((n, torch.Size(s)) for n, s in lora_shapes(e, h, i, r).items())


class MoELoRA(nn.Module):
    """Per-expert LoRA adapters on gate, up and down: six bf16 Parameters.

    ``gate_lora_a``/``up_lora_a`` ``[E, r, H]``, ``gate_lora_b``/``up_lora_b`` ``[E, I, r]``,
    ``down_lora_a`` ``[E, r, I]``, ``down_lora_b`` ``[E, H, r]``. A is initialised as PEFT does
    (Kaiming-uniform with a=sqrt(5) per expert), B with zeros, so a fresh adapter changes nothing.
    ``scaling = alpha / rank``. Kernels read the Parameters' current storage on every call.
    ``storage``: six bf16 CPU contiguous tensors of these shapes (LORA_NAMES order) to be the
    Parameters themselves (no copy, no initialisation: the kernels read and an optimizer updates
    that memory), instead of fresh ones.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, rank: int = 16,
                 alpha: float = 32.0, dtype: torch.dtype = torch.bfloat16,
                 storage: tuple[torch.Tensor, ...] | None = None) -> None:
        super().__init__()
        num_experts, hidden_size, intermediate_size, rank = (
            check_int(v, name) for name, v in (("num_experts", num_experts), ("hidden_size", hidden_size),
                                               ("intermediate_size", intermediate_size), ("rank", rank)))
        alpha = check_real(alpha, "alpha", hint="the scaling is alpha / rank")
        if dtype != torch.bfloat16:
            raise ValueError(f"kt_jit's kernels read bfloat16 adapters; dtype must be torch.bfloat16, got {dtype}")
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.rank, self.alpha = rank, float(alpha)
        shapes = lora_shapes(num_experts, hidden_size, intermediate_size, rank)
        if storage is not None:
            if len(storage) != len(LORA_NAMES):
                raise ValueError(f"storage must hold {len(LORA_NAMES)} tensors ({LORA_NAMES}), got {len(storage)}")
            for name, t in zip(LORA_NAMES, storage, strict=True):
                if (not isinstance(t, torch.Tensor) or tuple(t.shape) != shapes[name] or t.dtype != dtype
                        or not t.is_cpu or not t.is_contiguous()):
                    raise ValueError(f"storage for {name} must be a contiguous bf16 CPU tensor of shape "
                                     f"{shapes[name]}, got {getattr(t, 'dtype', type(t).__name__)} "
                                     f"{tuple(getattr(t, 'shape', ()))}")
        for k, (name, shape) in enumerate(shapes.items()):
            data = storage[k].detach() if storage is not None else torch.zeros(shape, dtype=dtype)
            self.register_parameter(name, nn.Parameter(data))
        self.grad_buffers = LoraGradBuffers()  # backward reuses dropped gradient buffers (gradbuf.py)
        if storage is None:
            self.reset_parameters()

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for name in ("gate_lora_a", "up_lora_a", "down_lora_a"):
                p = getattr(self, name)
                bound = 1.0 / math.sqrt(p.shape[-1])  # kaiming_uniform_(a=sqrt(5)) on [r, in]
                p.uniform_(-bound, bound)
            for name in ("gate_lora_b", "up_lora_b", "down_lora_b"):
                getattr(self, name).zero_()

    @classmethod
    def from_tensors(cls, gate_lora_a: torch.Tensor, gate_lora_b: torch.Tensor, up_lora_a: torch.Tensor,
                     up_lora_b: torch.Tensor, down_lora_a: torch.Tensor, down_lora_b: torch.Tensor,
                     alpha: float = 32.0) -> MoELoRA:
        """Wrap existing tensors (copied into bf16 Parameters); shapes as in the class docstring."""
        for name, t in (("gate_lora_a", gate_lora_a), ("gate_lora_b", gate_lora_b)):
            if not isinstance(t, torch.Tensor) or t.dim() != 3:
                raise ValueError(f"{name} must be a 3-D tensor [experts, ...], got "
                                 f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        e, r, h = gate_lora_a.shape
        i = gate_lora_b.shape[1]
        lora = cls(e, h, i, r, alpha)
        tensors = dict(zip(LORA_NAMES, (gate_lora_a, gate_lora_b, up_lora_a, up_lora_b, down_lora_a,
                                        down_lora_b), strict=True))
        for name, shape in lora_shapes(e, h, i, r).items():
            t = tensors[name]
            if tuple(t.shape) != shape:
                raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {shape}")
            with torch.no_grad():
                getattr(lora, name).copy_(t)
        return lora

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The six Parameters in the order of LORA_NAMES."""
        params = self._parameters  # (nn.Module.__getattr__ per name is slow for a per-call path)
        return tuple(params[n] if n in params else getattr(self, n) for n in LORA_NAMES)

    def check_matches(self, experts: MoEExperts) -> tuple[torch.Tensor, ...]:
        """Raise ValueError unless the six Parameters fit ``experts`` (shapes), and are bf16, CPU and
        contiguous (checked on every call: a Parameter may have been replaced); returns them (the
        order of LORA_NAMES)."""
        want = _lora_shape_list(experts.num_experts, experts.hidden_size, experts.intermediate_size, self.rank)
        try:
            tensors = self.tensors()
        except AttributeError as err:
            raise ValueError(f"the LoRA adapters lack a tensor ({err}); every one of {LORA_NAMES} is needed") from err
        bf16 = torch.bfloat16
        for (name, shape), p in zip(want, tensors, strict=True):
            # (one test per tensor on the hot path; the messages below only when it fails)
            if isinstance(p, torch.Tensor) and p.shape == shape and p.dtype == bf16 and p.is_cpu and p.is_contiguous():
                continue
            if not isinstance(p, torch.Tensor):
                raise ValueError(f"LoRA {name} is {type(p).__name__}, not a tensor")
            if p.shape != shape:
                raise ValueError(f"LoRA {name} has shape {tuple(p.shape)} but the experts need {shape} "
                                 f"(experts={experts.num_experts}, H={experts.hidden_size}, "
                                 f"I={experts.intermediate_size}, rank={self.rank})")
            if p.dtype != bf16:
                raise ValueError(f"LoRA {name} must be bfloat16, got {p.dtype}")
            if not p.is_cpu:
                raise ValueError(f"LoRA {name} must be on the CPU, got {p.device}")
            if not p.is_contiguous():
                raise ValueError(f"LoRA {name} must be contiguous")
            raise ValueError(f"LoRA {name} does not fit the experts")  # (a test above without a message here)
        return tensors

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, hidden={self.hidden_size}, intermediate={self.intermediate_size}, "
                f"rank={self.rank}, alpha={self.alpha}")

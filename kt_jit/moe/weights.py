"""Weight containers: frozen packed experts (:class:`MoEExperts`) and trainable LoRA (:class:`MoELoRA`)."""

from __future__ import annotations

import math
import os

import torch
from torch import nn

from ..kernels.pack import check_gemm_dims, pack_bf16, unpack_tiles
from ..kernels.quant import dequantize_int8, pack_int8
from ..runtime.buffers import aligned_empty

QUANT_MODES = ("bf16", "int8")
FORMAT_VERSION = 1
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


def _pack(w: torch.Tensor, quant: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    if quant == "bf16":
        return pack_bf16(w), None
    return pack_int8(w)


class MoEExperts:
    """The frozen routed experts of one MoE layer, packed once into kt_jit's tile layout.

    ``gate_up``: ``[E, 2I/16, H/2, 16, 2]``, the packed ``cat([gate, up], dim=1)`` (one GEMM with
    N = 2I computes gate and up together, forward and transposed); ``down``: ``[E, H/16, I/2, 16,
    2]``. bf16, or int8 with per-channel fp32 scales ``gate_up_scale [E, 2I]`` and ``down_scale
    [E, H]``. Nothing else is kept: no transposed or dequantized copy.
    """

    def __init__(self, tensors: dict[str, torch.Tensor], hidden_size: int, intermediate_size: int,
                 quant: str = "bf16") -> None:
        self.tensors = tensors
        self.gate_up, self.down = tensors["gate_up"], tensors["down"]
        self.num_experts = self.gate_up.shape[0]
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.quant = quant

    def scales(self, name: str) -> torch.Tensor | None:
        """Per-channel scales of ``"gate_up"`` or ``"down"`` ([E, N] fp32), None for bf16."""
        return self.tensors.get(f"{name}_scale")

    @classmethod
    def from_tensors(cls, gate_proj: torch.Tensor, up_proj: torch.Tensor, down_proj: torch.Tensor,
                     quant: str = "bf16") -> MoEExperts:
        """Pack (and for ``quant="int8"`` quantize) Hugging Face-layout experts: gate/up
        ``[E, I, H]``, down ``[E, H, I]`` (bf16/fp16/fp32). H and I must be multiples of 32.
        The inputs are not kept; free them to save memory.
        """
        if quant not in QUANT_MODES:
            raise ValueError(f"quant must be one of {QUANT_MODES}, got {quant!r}")
        _check_expert_tensor("gate_proj", gate_proj, None)
        e, i, h = gate_proj.shape
        _check_expert_tensor("up_proj", up_proj, (e, i, h))
        _check_expert_tensor("down_proj", down_proj, (e, h, i))
        check_gemm_dims(i, h, "expert")
        wdtype = torch.bfloat16 if quant == "bf16" else torch.int8
        t = {"gate_up": aligned_empty((e, 2 * i // 16, h // 2, 16, 2), wdtype),
             "down": aligned_empty((e, h // 16, i // 2, 16, 2), wdtype)}
        if quant != "bf16":
            t["gate_up_scale"] = torch.empty(e, 2 * i)
            t["down_scale"] = torch.empty(e, h)
        step = max(1, _PACK_CHUNK_BYTES // (6 * i * h))
        for e0 in range(0, e, step):
            sl = slice(e0, min(e, e0 + step))
            for name, w in (("gate_up", torch.cat([gate_proj[sl], up_proj[sl]], dim=1)), ("down", down_proj[sl])):
                packed, scale = _pack(w, quant)
                t[name][sl] = packed
                if scale is not None:
                    t[f"{name}_scale"][sl] = scale
        return cls(t, h, i, quant)

    def dequantize(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(gate [E, I, H], up [E, I, H], down [E, H, I])`` as the kernels compute with them
        (bf16 for bf16 experts; fp32 ``q * scale`` for quantized ones)."""
        i = self.intermediate_size
        if self.quant == "bf16":
            gu, down = unpack_tiles(self.gate_up), unpack_tiles(self.down)
        else:
            gu = dequantize_int8(self.gate_up, self.tensors["gate_up_scale"])
            down = dequantize_int8(self.down, self.tensors["down_scale"])
        return gu[:, :i].contiguous(), gu[:, i:].contiguous(), down

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def expert_bytes(self) -> int:
        """Bytes of one expert's three matrices as stored (what a pass reads per active expert)."""
        return self.nbytes // self.num_experts

    def save(self, path: str | os.PathLike) -> None:
        """Write the packed (quantized) weights as safetensors with kt_jit metadata."""
        from safetensors.torch import save_file

        meta = {"format": "kt_jit.MoEExperts", "format_version": str(FORMAT_VERSION), "quant": self.quant,
                "num_experts": str(self.num_experts), "hidden_size": str(self.hidden_size),
                "intermediate_size": str(self.intermediate_size)}
        tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
        save_file({k: v.contiguous() for k, v in self.tensors.items()}, tmp, metadata=meta)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> MoEExperts:
        """Load a file written by :meth:`save` (memory-mapped; no re-quantization)."""
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(os.fspath(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != "kt_jit.MoEExperts":
                    raise ValueError(f"{path} is not a kt_jit MoEExperts file (no kt_jit metadata)")
                if meta.get("format_version") != str(FORMAT_VERSION):
                    raise ValueError(f"{path} has format version {meta.get('format_version')}; this kt_jit reads "
                                     f"version {FORMAT_VERSION}. Re-create it with MoEExperts.from_tensors(...).save()")
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
        except SafetensorError as e:
            raise ValueError(f"{path} is not a readable safetensors file ({e}); it may be truncated") from e
        e, h, i = int(meta["num_experts"]), int(meta["hidden_size"]), int(meta["intermediate_size"])
        quant = meta["quant"]
        expect = {"gate_up": (e, 2 * i // 16, h // 2, 16, 2), "down": (e, h // 16, i // 2, 16, 2)}
        if quant != "bf16":
            expect.update({"gate_up_scale": (e, 2 * i), "down_scale": (e, h)})
        for k, shape in expect.items():
            if k not in tensors or tuple(tensors[k].shape) != shape:
                raise ValueError(f"{path}: tensor {k!r} missing or of the wrong shape (expected {shape})")
        return cls(tensors, h, i, quant)

    def __repr__(self) -> str:
        return (f"MoEExperts(experts={self.num_experts}, hidden={self.hidden_size}, "
                f"intermediate={self.intermediate_size}, quant={self.quant!r}, {self.nbytes / 1e9:.2f} GB)")


LORA_NAMES = ("gate_lora_a", "gate_lora_b", "up_lora_a", "up_lora_b", "down_lora_a", "down_lora_b")


def lora_shapes(e: int, h: int, i: int, r: int) -> dict[str, tuple[int, int, int]]:
    """Shapes of the six per-expert LoRA tensors (A: [E, r, in], B: [E, out, r])."""
    return {"gate_lora_a": (e, r, h), "gate_lora_b": (e, i, r), "up_lora_a": (e, r, h),
            "up_lora_b": (e, i, r), "down_lora_a": (e, r, i), "down_lora_b": (e, h, r)}


class MoELoRA(nn.Module):
    """Per-expert LoRA adapters on gate, up and down: six bf16 Parameters.

    ``gate_lora_a``/``up_lora_a`` ``[E, r, H]``, ``gate_lora_b``/``up_lora_b`` ``[E, I, r]``,
    ``down_lora_a`` ``[E, r, I]``, ``down_lora_b`` ``[E, H, r]``. A is initialised as PEFT does
    (Kaiming-uniform with a=sqrt(5) per expert), B with zeros, so a fresh adapter changes nothing.
    ``scaling = alpha / rank``. Kernels read the Parameters' current storage on every call.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, rank: int = 16,
                 alpha: float = 32.0, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.rank, self.alpha = rank, float(alpha)
        for name, shape in lora_shapes(num_experts, hidden_size, intermediate_size, rank).items():
            self.register_parameter(name, nn.Parameter(torch.zeros(shape, dtype=dtype)))
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
        return tuple(getattr(self, n) for n in LORA_NAMES)

    def check_matches(self, experts: MoEExperts) -> None:
        want = lora_shapes(experts.num_experts, experts.hidden_size, experts.intermediate_size, self.rank)
        for name, shape in want.items():
            p = getattr(self, name)
            if tuple(p.shape) != shape:
                raise ValueError(f"LoRA {name} has shape {tuple(p.shape)} but the experts need {shape} "
                                 f"(experts={experts.num_experts}, H={experts.hidden_size}, "
                                 f"I={experts.intermediate_size}, rank={self.rank})")
            if p.dtype != torch.bfloat16:
                raise ValueError(f"LoRA {name} must be bfloat16, got {p.dtype}")
            if p.device.type != "cpu":
                raise ValueError(f"LoRA {name} must be on the CPU, got {p.device}")
            if not p.is_contiguous():
                raise ValueError(f"LoRA {name} must be contiguous")

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, hidden={self.hidden_size}, intermediate={self.intermediate_size}, "
                f"rank={self.rank}, alpha={self.alpha}")

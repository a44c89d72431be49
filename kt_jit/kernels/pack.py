"""Packing of BF16 weights ``W[N, K]`` (nn.Linear layout) into the tile order every kernel reads.

Packed layout, shape ``[N/16, K/2, 16, 2]`` (bf16, 64-byte aligned)::

    packed[nb, r, i, e] = W[16*nb + i, 2*r + e]

Row ``r`` of n-block ``nb`` is one 64-byte line: the bf16 pairs along K of 16 consecutive output
channels ("VNNI pairs"). Rows 16*kb .. 16*kb+15 of an n-block are one AMX B tile (16 x 64 B) for
the forward GEMM, and the same line is one zmm for the AVX-512 kernels. The transposed GEMM reads
these same bytes (see kernels/gemm.py); no second copy is stored.
"""

from __future__ import annotations

import torch

from ..runtime.buffers import aligned_empty

TILE_N = 16  # output channels per packed block
PAIR = 2     # bf16 elements per dword along K


def check_gemm_dims(n: int, k: int, what: str = "weight") -> None:
    """Raise ValueError unless N and K are positive multiples of 32."""
    if n <= 0 or k <= 0 or n % 32 or k % 32:
        raise ValueError(f"{what} shape [N={n}, K={k}] is not supported: kt_jit kernels need N and K "
                         "to be positive multiples of 32 (pad the weight with zero rows/columns).")


def pack_tiles(w: torch.Tensor) -> torch.Tensor:
    """Rearrange ``w [..., N, K]`` (any dtype, kept) into the tile order ``[..., N/16, K/2, 16, 2]``."""
    if w.dim() < 2:
        raise ValueError(f"expected a weight of shape [..., N, K], got {tuple(w.shape)}")
    if w.device.type != "cpu":
        raise ValueError(f"weights must be on the CPU, got device {w.device}")
    *lead, n, k = w.shape
    check_gemm_dims(n, k)
    src = w.reshape(*lead, n // TILE_N, TILE_N, k // PAIR, PAIR)
    out = aligned_empty((*lead, n // TILE_N, k // PAIR, TILE_N, PAIR), w.dtype)
    out.copy_(src.transpose(-3, -2))
    return out


def pack_bf16(w: torch.Tensor) -> torch.Tensor:
    """Pack ``w [..., N, K]`` (any float dtype, converted to bf16) into ``[..., N/16, K/2, 16, 2]``."""
    if w.dim() < 2:
        raise ValueError(f"expected a weight of shape [..., N, K], got {tuple(w.shape)}")
    return pack_tiles(w.to(torch.bfloat16))


def unpack_tiles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_tiles`: ``[..., N/16, K/2, 16, 2]`` -> ``[..., N, K]`` (dtype kept)."""
    if not isinstance(packed, torch.Tensor) or packed.dim() < 4 or tuple(packed.shape[-2:]) != (TILE_N, PAIR):
        shape = tuple(packed.shape) if isinstance(packed, torch.Tensor) else type(packed).__name__
        raise ValueError(f"not a packed weight [..., N/16, K/2, 16, 2]: got {shape}")
    *lead, nb, kp, _, _ = packed.shape
    return packed.transpose(-3, -2).reshape(*lead, nb * TILE_N, kp * PAIR).contiguous()


def unpack_bf16(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_bf16`: ``[..., N/16, K/2, 16, 2]`` -> ``[..., N, K]`` (bf16)."""
    return unpack_tiles(packed)

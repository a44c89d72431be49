"""Online weight quantisation (vectorised torch), producing what the kernels read.

``int8``: symmetric per output channel, ``q = round(w / s)`` in [-127, 127] with ``s = max|w| / 127``
per row of ``W [N, K]``; the kernels compute ``s[n] * sum_k x[k] q[n, k]`` (q exact in bf16,
scale applied in fp32), so ``dequantize`` = ``q * s`` in fp32 is exactly the weight they use.
"""

from __future__ import annotations

import torch

from .pack import pack_tiles, unpack_tiles


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [..., N, K]`` float -> (``q`` int8 ``[..., N, K]``, ``scale`` fp32 ``[..., N]``)."""
    wf = w.float()
    scale = wf.abs().amax(-1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(wf / scale.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return q, scale.contiguous()


def pack_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize and pack: (``[..., N/16, K/2, 16, 2]`` int8, ``[..., N]`` fp32 scales)."""
    q, scale = quantize_int8(w)
    return pack_tiles(q), scale


def dequantize_int8(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The fp32 weight ``[..., N, K]`` the int8 kernels compute with."""
    return unpack_tiles(packed).float() * scale.unsqueeze(-1)

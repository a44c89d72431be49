"""Online weight quantisation (vectorised torch), producing what the kernels read.

``int8``: symmetric per output channel, ``q = round(w / s)`` in [-127, 127] with ``s = max|w| / 127``
per row of ``W [N, K]``; the kernels compute ``s[n] * sum_k x[k] q[n, k]`` (q exact in bf16,
scale applied in fp32), so ``dequantize`` = ``q * s`` in fp32 is exactly the weight they use.
"""

from __future__ import annotations

import torch

from .pack import pack_tiles, unpack_tiles


def _usable_scale(scale: torch.Tensor) -> torch.Tensor:
    """``scale`` with its zeros (all-zero channels or groups) replaced by 1; NaN and inf stay, for
    the packer to refuse."""
    return torch.where(scale == 0, torch.ones_like(scale), scale)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [..., N, K]`` float -> (``q`` int8 ``[..., N, K]``, ``scale`` fp32 ``[..., N]``)."""
    wf = w.float()
    scale = wf.abs().amax(-1) / 127.0
    scale = _usable_scale(scale)
    q = torch.round(wf / scale.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return q, scale.contiguous()


def pack_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize and pack: (``[..., N/16, K/2, 16, 2]`` int8, ``[..., N]`` fp32 scales)."""
    q, scale = quantize_int8(w)
    return pack_tiles(q), scale


def dequantize_int8(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The fp32 weight ``[..., N, K]`` the int8 kernels compute with."""
    return unpack_tiles(packed).float() * scale.unsqueeze(-1)


# --- INT4 -----------------------------------------------------------------------------------
# Values are 4-bit codes q in [0, 15] with a zero point z: w ~ s * (q - z). Symmetric modes use
# z = 8 (codes 1..15 for -7..7, not stored); asymmetric ("_1") modes store z per channel/group.
# Scales (and zero points) are per output channel, or per group of ``group_size`` along K, laid
# out [G, N] so the 16 channels of one packed row read one contiguous vector.
#
# Packed layout [..., N/16, K/2, 16] uint8: the 32 codes of one tile row (element e = 2*i + p for
# channel i, k-parity p, as in pack_tiles) sit in 16 bytes, byte j = code[j] | code[j+16] << 4, so
# unpacking is (and 15 | shift 4) then a plain concatenation.


def quantize_int4(w: torch.Tensor, group_size: int = 0, asym: bool = False):
    """``w [..., N, K]`` -> (codes uint8 ``[..., N, K]``, scale fp32 ``[..., G, N]``,
    zero uint8 ``[..., G, N]`` or None for symmetric); ``group_size`` 0 = one group per channel."""
    *lead, n, k = w.shape
    gs = group_size or k
    wf = w.float().reshape(*lead, n, k // gs, gs)
    if asym:
        # the range always contains 0, so the zero point is a code in [0, 15]
        lo, hi = wf.amin(-1).clamp(max=0), wf.amax(-1).clamp(min=0)
        scale = (hi - lo) / 15.0
        scale = _usable_scale(scale)
        zero = torch.round(-lo / scale).clamp_(0, 15)
        q = torch.round(wf / scale.unsqueeze(-1) + zero.unsqueeze(-1)).clamp_(0, 15)
        zero_out = zero.to(torch.uint8).transpose(-1, -2).contiguous()
    else:
        scale = wf.abs().amax(-1) / 7.0
        scale = _usable_scale(scale)
        q = torch.round(wf / scale.unsqueeze(-1)).clamp_(-8, 7) + 8
        zero_out = None
    codes = q.to(torch.uint8).reshape(*lead, n, k)
    return codes, scale.transpose(-1, -2).contiguous(), zero_out


def pack_int4_codes(codes: torch.Tensor) -> torch.Tensor:
    """codes uint8 ``[..., N, K]`` -> nibble-packed ``[..., N/16, K/2, 16]`` uint8.

    In tile order (kernels/pack.py) a k-pair row holds 32 codes (16 channels x 2 k). Rows 2i and
    2i+1 of a block share the 32 bytes of slots 2i and 2i+1: byte j holds element j of row 2i in
    its low nibble and element j of row 2i+1 in its high nibble, so a kernel gets both rows from
    one load with a zero-extension to words and one mask or shift each (no byte shuffles)."""
    tiles = pack_tiles(codes)  # [..., N/16, K/2, 16, 2]
    rows = tiles.reshape(*tiles.shape[:-3], tiles.shape[-3] // 2, 2, 32)
    return (rows[..., 0, :] | (rows[..., 1, :] << 4)).reshape(tiles.shape[:-1]).contiguous()


def unpack_int4_codes(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4_codes`."""
    words = packed.reshape(*packed.shape[:-2], packed.shape[-2] // 2, 1, 32)
    rows = torch.cat([words & 15, words >> 4], -2)  # [..., K/4, 2, 32]
    return unpack_tiles(rows.reshape(*packed.shape, 2))


def pack_int4(w: torch.Tensor, group_size: int = 0, asym: bool = False):
    """Quantize and pack: (``[..., N/16, K/2, 16]`` uint8, scale ``[..., G, N]``, zero or None)."""
    codes, scale, zero = quantize_int4(w, group_size, asym)
    return pack_int4_codes(codes), scale, zero


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """The fp32 weight ``[..., N, K]`` the int4 kernels compute with: ``s * (q - z)``."""
    codes = unpack_int4_codes(packed).float()
    *lead, n, k = codes.shape
    g = scale.shape[-2]
    z = zero.float() if zero is not None else torch.full_like(scale, 8.0)
    per = lambda t: t.transpose(-1, -2).unsqueeze(-1)  # noqa: E731 - [..., G, N] -> [..., N, G, 1]
    return ((codes.reshape(*lead, n, g, k // g) - per(z)) * per(scale)).reshape(*lead, n, k)

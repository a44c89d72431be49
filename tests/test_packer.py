"""The JIT packer (kernels/packer.py) against the torch packing and quantization of kernels/quant.py:
the same bytes, scales and zero points, bit for bit, for every source dtype and storage."""

import pytest
import torch

from kt_jit.kernels import packer
from kt_jit.kernels.pack import pack_bf16
from kt_jit.kernels.quant import pack_int4, pack_int8
from kt_jit.moe.checkpoint import dequantize_fp8_blocks
from kt_jit.runtime.cpu import cpu_info

pytestmark = pytest.mark.skipif(not cpu_info().avx512_bf16, reason="the JIT packer needs AVX-512 BF16")

# (storage, group size, zero points): every quantization mode of moe/weights.py
MODES = [("bf16", 0, False), ("int8", 0, False), ("int4", 0, False), ("int4", 0, True), ("int4", 64, False),
         ("int4", 32, True)]
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
SENTINEL = 90  # what the outputs hold before packing


def _torch_pack(w: torch.Tensor, storage: str, gs: int, asym: bool):
    """(packed, scale [E, G, N] or None, zero or None) by the torch path."""
    if storage == "bf16":
        return pack_bf16(w), None, None
    if storage == "int8":
        packed, scale = pack_int8(w)
        return packed, scale.unsqueeze(-2), None
    return pack_int4(w, gs, asym)


def _jit_pack(experts, like, gs: int, first: int = 0, spare: int = 0):
    """pack_into outputs shaped like the torch path's ``like`` (with ``spare`` extra experts around
    the packed ones, which must stay untouched)."""
    def empty(t):
        if t is None:
            return None
        return torch.full((t.shape[0] + spare, *t.shape[1:]), SENTINEL, dtype=t.dtype)
    out = [empty(t) for t in like]
    packer.pack_into(out[0], out[1], out[2], first, experts, gs)
    return out


def _fp8_bytes(dtype, n, k, g):
    """Random FP8 values over every finite byte pattern (subnormals and zeros included)."""
    b = torch.randint(0, 256, (n, k), generator=g, dtype=torch.uint8)
    special = b.view(dtype).float().isnan() | b.view(dtype).float().isinf()
    b[special] = 0x01
    return b.view(dtype)


@pytest.mark.parametrize("storage,gs,asym", MODES)
@pytest.mark.parametrize("source", [torch.bfloat16, torch.float16, torch.float32])
def test_pack_into_matches_torch_packing(source, storage, gs, asym):
    """Two experts of two parts each (gate, up), rows read from one column in with a pitch wider
    than K, edge-case rows among random ones (all zero, all positive, all negative, subnormal in the
    source dtype, exact halves after the division): the packed bytes, scales and zero points equal
    the torch path's on the concatenated matrix, and the entries around the packed ones are not
    written."""
    g = torch.Generator().manual_seed(1)
    n, k = 48, 256
    wide = [[torch.randn(n, k + 64, generator=g) * 0.05 * (e + 1) for _ in range(2)] for e in range(2)]
    edge = wide[1][0]
    edge[0] = 0
    edge[1].abs_()
    edge[2] = -edge[2].abs()
    edge[3] *= torch.finfo(source).tiny / edge[3].abs().max()  # (subnormal but the largest)
    halves = torch.arange(k + 64) % 14 - 6.5
    edge[4], edge[5] = halves, halves
    edge[4, 1::32], edge[5, 1::32] = 127.0, 7.0  # (w / s = w for int8 / int4: ties to round to even)
    experts = [[p.to(source)[:, 1:1 + k] for p in ex] for ex in wide]  # (unaligned rows, pitch K + 64)
    full = torch.stack([torch.cat([p.float() for p in ex]) for ex in experts])
    want = _torch_pack(full, storage, gs, asym)
    got = _jit_pack(experts, want, gs, first=1, spare=2)
    for name, w, o in zip(("packed", "scale", "zero"), want, got, strict=True):
        if w is None:
            continue
        assert torch.equal(o[1:3], w), name
        assert (o[0] == SENTINEL).all() and (o[3] == SENTINEL).all(), f"{name}: an entry outside was written"


@pytest.mark.parametrize("storage,gs,asym", MODES)
@pytest.mark.parametrize("dtype", FP8)
def test_pack_into_dequantizes_fp8_blocks(dtype, storage, gs, asym):
    """FP8 parts with block scales (blocks of 40 rows, so 16-row blocks straddle two scale rows,
    and 96 columns, cut short at the edges; every finite byte value) pack as the torch path packs
    ``fp8.float() * scale``; e4m3fn's NaN bytes come out as NaN."""
    g = torch.Generator().manual_seed(2)
    n, k, block = 80, 320, (40, 96)
    experts = [[packer.Fp8Weight(_fp8_bytes(dtype, n, k, g),
                                 torch.rand(-(-n // block[0]), -(-k // block[1]), generator=g) * 0.01, block)
                for _ in range(2)] for _ in range(2)]
    full = torch.stack([torch.cat([dequantize_fp8_blocks(*p) for p in ex]) for ex in experts])
    want = _torch_pack(full, storage, gs, asym)
    got = _jit_pack(experts, want, gs)
    for name, w, o in zip(("packed", "scale", "zero"), want, got, strict=True):
        assert w is None or torch.equal(o, w), name
    if dtype == torch.float8_e4m3fn and storage == "bf16":
        nan = torch.zeros(16, 32, dtype=torch.uint8)
        nan[3, 5], nan[7, 30] = 0x7F, 0xFF
        out = torch.empty(1, 1, 16, 16, 2, dtype=torch.bfloat16)
        packer.pack_into(out, None, None, 0, [[packer.Fp8Weight(nan.view(dtype), torch.ones(1, 1), (128, 128))]])
        unpacked = out[0, 0].transpose(0, 1).reshape(16, 32)
        assert unpacked.isnan().nonzero().tolist() == [[3, 5], [7, 30]]


def test_supports_and_pack_into_errors():
    """What the packer does not take is refused up front with a message, never written to memory
    it does not own."""
    w = torch.randn(32, 64).bfloat16()
    assert packer.supports(w) and not packer.supports(w.t()) and not packer.supports(w[None])
    f8 = w.to(torch.float8_e4m3fn)
    assert not packer.supports(f8)  # FP8 needs its scales
    assert packer.supports(packer.Fp8Weight(f8, torch.ones(1, 1), (32, 64)))
    assert not packer.supports(packer.Fp8Weight(f8, torch.ones(1, 2), (32, 48)))  # block width not 32k
    assert not packer.supports(packer.Fp8Weight(f8, torch.ones(2, 2), (32, 64)))  # scales misshapen
    assert not packer.supports(packer.Fp8Weight(f8, torch.ones(1, 1, dtype=torch.bfloat16), (32, 64)))
    assert not packer.supports(packer.Fp8Weight(f8, torch.ones(1, 1), (32.0, 64.0)))
    assert not packer.supports(packer.Fp8Weight(f8, torch.ones(1, 1).to("meta"), (32, 64)))  # (not on the CPU)
    packed = torch.empty(2, 2, 32, 16, 2, dtype=torch.bfloat16)
    scale = torch.empty(2, 1, 32)
    cases = [
        ((packed, None, None, 0, [[w.t().contiguous().t()]]), "unit column stride"),
        ((packed, None, None, 0, [[w], [w[:16]]]), "same shape"),
        ((packed, None, None, 1, [[w], [w]]), "room for 2 experts from 1"),
        ((packed, scale, None, 0, [[w]]), "scale must be .* only for int8/int4"),
        ((packed.to(torch.int8), None, None, 0, [[w]]), r"scale must be a contiguous CPU torch.float32"),
        ((packed[..., 0].to(torch.uint8), scale, None, 0, [[w]], 48), "group_size=48 must be 0 or a multiple of 32"),
        ((packed.to(torch.int8), scale, torch.empty(2, 1, 32, dtype=torch.uint8), 0, [[w]]),
         "zero points exist for int4 storage only"),
        ((packed.float(), None, None, 0, [[w]]), "bf16, int8 or uint8"),
        ((packed.to(torch.int8), scale, None, 0, [[w]], 32), "groups along K exist for int4 storage only"),
        ((packed, None, None, 0, [[w[:, :0]]]), "columns of 32"),
    ]
    for args, why in cases:
        with pytest.raises(ValueError, match=why):
            packer.pack_into(*args)


@pytest.mark.parametrize("quant", ["bf16", "int8", "int4_1kgroup"])
def test_strided_experts_take_the_torch_path_to_the_same_bytes(quant, monkeypatch):
    """Experts whose rows are not contiguous (a transposed view), or gate and up in different dtypes,
    go through the torch path of kernels/quant.py, contiguous ones through the JIT packer: the
    packed experts are identical."""
    import kt_jit

    g = torch.Generator().manual_seed(3)
    e, h, i = 3, 128, 96
    gate, up = (torch.randn(e, i, h, generator=g).bfloat16() for _ in range(2))
    down = torch.randn(e, h, i, generator=g).bfloat16()
    calls = []
    real = packer.pack_into
    monkeypatch.setattr(packer, "pack_into", lambda *a, **k: calls.append(1) or real(*a, **k))
    jit = kt_jit.MoEExperts.from_tensors(gate, up, down, quant=quant, group_size=32)
    assert len(calls) == 2
    strided = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (gate, up, down)]
    slow = kt_jit.MoEExperts.from_tensors(*strided, quant=quant, group_size=32)
    assert len(calls) == 2  # (no JIT packing of column-strided rows)
    mixed = kt_jit.MoEExperts.from_tensors(gate.float(), up, down, quant=quant, group_size=32)  # (torch path too)
    assert len(calls) == 3  # (down alone went through the packer)
    for other in (slow, mixed):
        assert set(other.tensors) == set(jit.tensors)
        for name, t in jit.tensors.items():
            assert torch.equal(other.tensors[name], t), name

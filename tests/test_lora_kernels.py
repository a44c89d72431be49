"""Grouped LoRA small GEMMs in native layouts (xat, xb, xty) against the float32 reference."""

import pytest
import torch
from reference import linear as ref_linear
from reference import rel_err

from kt_jit.kernels.lora import XTY_PAIR_CHUNK, LoraSpec, get_kernel
from kt_jit.runtime.cpu import cpu_info

pytestmark = pytest.mark.skipif(not cpu_info().avx512_bf16, reason="LoRA kernels need AVX-512 BF16")


def _groups(*rows):
    return torch.tensor([list(r) for r in rows], dtype=torch.int64)


def _bf(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).bfloat16()


@pytest.mark.parametrize("n,k", [(16, 256), (32, 64), (96, 16), (64, 32), (144, 16)])
@pytest.mark.parametrize("accumulate,y_dtype", [(False, "f32"), (True, "f32"), (False, "bf16")])
def test_xat(n, k, accumulate, y_dtype):
    """Y (+)= alpha X W^T, two groups with their own weights, rows and output pitch (bf16 output:
    the fp32 sums rounded once)."""
    kern = get_kernel(LoraSpec("xat", n, k, accumulate=accumulate, y_dtype=y_dtype))
    ms = (5, 11)
    xs = [_bf(m, k, seed=i) for i, m in enumerate(ms)]
    ws = [_bf(n, k, seed=10 + i) for i in range(2)]
    pitch = n + 16  # outputs written into a wider buffer
    dtype = torch.float32 if y_dtype == "f32" else torch.bfloat16
    ys = [torch.randn(m, pitch).to(dtype) for m in ms]
    before = [y.clone() for y in ys]
    rows = [(x.data_ptr(), w.data_ptr(), y.data_ptr(), m) for x, w, y, m in zip(xs, ws, ys, ms, strict=True)]
    kern.launch(_groups(*rows), k * 2, 0, pitch * ys[0].element_size(), 0.5)
    for x, w, y, b in zip(xs, ws, ys, before, strict=True):
        want = 0.5 * ref_linear(x, w) + (b[:, :n].float() if accumulate else 0)
        assert rel_err(y[:, :n].float(), want) < (1e-5 if y_dtype == "f32" else 4e-3)
        assert torch.equal(y[:, n:], b[:, n:])  # nothing written past N


@pytest.mark.parametrize("n,k", [(16, 128), (64, 16), (32, 40), (128, 16), (144, 8), (1088, 16), (32, 15)])
@pytest.mark.parametrize("x_dtype", ["f32", "bf16"])
def test_xb(n, k, x_dtype):
    """Y += alpha X B (bf16 X with even K: two k per step as pair dot products; odd K one at a time)."""
    kern = get_kernel(LoraSpec("xb", n, k, x_dtype=x_dtype, accumulate=True))
    m = 13
    x = torch.randn(m, k) if x_dtype == "f32" else _bf(m, k, seed=3)
    b = _bf(k, n, seed=4)
    y0 = torch.randn(m, n)
    y = y0.clone()
    kern.launch(_groups((x.data_ptr(), b.data_ptr(), y.data_ptr(), m)), k * x.element_size(), 0, n * 4, 2.0)
    assert rel_err(y, y0 + 2.0 * (x.float() @ b.float())) < 1e-5


def test_xb_pair_form_needs_aligned_rows():
    """The pair form reads X's (k, k+1) pairs as 4-byte words: a row pitch that is not a multiple of
    4 bytes is refused before the kernel runs; B must be bf16."""
    kern = get_kernel(LoraSpec("xb", 16, 32, x_dtype="bf16", accumulate=True))
    x, b, y = _bf(2, 33), _bf(32, 16), torch.zeros(2, 16)
    with pytest.raises(ValueError, match="multiple of 4"):
        kern.launch(_groups((x.data_ptr(), b.data_ptr(), y.data_ptr(), 2)), 66, 0, 64, 1.0)
    with pytest.raises(ValueError, match="bf16"):
        LoraSpec("xb", 16, 32, w_dtype="f32")


@pytest.mark.parametrize("n,k", [(16, 128), (32, 16), (144, 16), (16, 2048)])
@pytest.mark.parametrize("x_dtype", ["f32", "bf16"])
def test_xb_bf16_copy(n, k, x_dtype):
    """Non-accumulating xb also storing a bf16 copy of Y (a fifth group field, its own pitch): the copy
    is Y rounded once, and nothing is written past N in either. bf16 X (the MoE backward's T = dY B,
    two k per step) is read at a pitch wider than K."""
    kern = get_kernel(LoraSpec("xb", n, k, x_dtype=x_dtype, copy_bf16=True))
    ms = (3, 9)
    xs = [torch.randn(m, k + 32, generator=torch.Generator().manual_seed(m)) for m in ms]
    if x_dtype == "bf16":
        xs = [x.bfloat16() for x in xs]
    bs = [_bf(k, n, seed=20 + i) for i in range(2)]
    ys = [torch.full((m, n + 16), float("nan")) for m in ms]
    zs = [torch.full((m, n + 48), 7.0, dtype=torch.bfloat16) for m in ms]
    rows = [(x.data_ptr(), b.data_ptr(), y.data_ptr(), m, z.data_ptr())
            for x, b, y, m, z in zip(xs, bs, ys, ms, zs, strict=True)]
    kern.launch(_groups(*rows), (k + 32) * xs[0].element_size(), 0, (n + 16) * 4, 0.5, ldz=(n + 48) * 2)
    for x, b, y, z in zip(xs, bs, ys, zs, strict=True):
        assert rel_err(y[:, :n], 0.5 * (x[:, :k].float() @ b.float())) < 1e-5
        assert torch.equal(z[:, :n], y[:, :n].bfloat16())
        assert torch.isnan(y[:, n:]).all() and (z[:, n:] == 7.0).all()


@pytest.mark.parametrize("a,bdim", [(256, 16), (16, 96), (64, 32), (8, 16), (16, 1024), (8, 192)])
@pytest.mark.parametrize("ms", [(7, 1), (3, 0), (17, 40)])
@pytest.mark.parametrize("dtypes", [("bf16", "f32"), ("f32", "bf16"), ("f32", "f32"), ("bf16", "bf16")])
@pytest.mark.parametrize("row_scale", [False, True])
@pytest.mark.parametrize("y_dtype", ["f32", "bf16"])
def test_xty(a, bdim, dtypes, ms, row_scale, y_dtype):
    """Two groups; a group with no tokens writes zeros (how unused experts get their gradient); with
    ``row_scale`` each token's Q row is weighted by its own factor (a fifth group field). B a
    multiple of 1024: the 4 x 64 tiles (up to 16 tokens) or the 8 x 32 ones (ms 17, 40);
    bf16 output: the fp32 sums rounded once."""
    kern = get_kernel(LoraSpec("xty", bdim, a, x_dtype=dtypes[0], w_dtype=dtypes[1], row_scale=row_scale,
                               y_dtype=y_dtype))
    ps = [(_bf(m, a, seed=m) if dtypes[0] == "bf16" else torch.randn(m, a)) for m in ms]
    qs = [(_bf(m, bdim, seed=m + 1) if dtypes[1] == "bf16" else torch.randn(m, bdim)) for m in ms]
    ws = [torch.rand(max(m, 1)) if row_scale else torch.ones(max(m, 1)) for m in ms]
    dt = torch.float32 if y_dtype == "f32" else torch.bfloat16
    cs = [torch.full((a, bdim), float("nan"), dtype=dt) for _ in ms]
    rows = [(p.data_ptr(), q.data_ptr(), c.data_ptr(), m) + ((w.data_ptr(),) if row_scale else ())
            for p, q, c, m, w in zip(ps, qs, cs, ms, ws, strict=True)]
    kern.launch(_groups(*rows),
                ps[0].stride(0) * ps[0].element_size(), qs[0].stride(0) * qs[0].element_size(), 0, 0.25)
    for p, q, c, w in zip(ps, qs, cs, ws, strict=True):
        want = 0.25 * p.float().T @ (w[:q.shape[0], None] * q.float())
        if y_dtype == "f32":
            assert rel_err(c, want) < 1e-5
        else:  # one rounding of sums that match to 1e-5: within a bf16 ulp of the reference's rounding
            assert rel_err(c.float(), want.bfloat16().float()) < 4e-3


@pytest.mark.parametrize("a,bdim", [(256, 16), (16, 96), (8, 16), (16, 1024), (64, 2048), (4096, 16), (24, 3072)])
@pytest.mark.parametrize("dtypes", [("bf16", "f32"), ("f32", "bf16"), ("f32", "f32"), ("bf16", "bf16")])
@pytest.mark.parametrize("row_scale", [False, True])
@pytest.mark.parametrize("y_dtype", ["f32", "bf16"])
def test_xty_token_pairs(a, bdim, dtypes, row_scale, y_dtype):
    """bf16 products over token pairs: the fp32 reference on the operands the kernel rounds to bf16
    (P and the row-weighted Q, or the row-weighted P when P is fp32). Groups of odd and even sizes,
    none, and more token pairs than one stage (XTY_PAIR_CHUNK) in one launch; groups of several work
    items (64 x 2048, 4096 x 16, 24 x 3072: more than XTY_ITEM_OUTPUTS outputs; the last one ends
    mid-row and is partial)."""
    kern = get_kernel(LoraSpec("xty", bdim, a, x_dtype=dtypes[0], w_dtype=dtypes[1], row_scale=row_scale,
                               y_dtype=y_dtype, token_pairs=True))
    ms = (7, 1, 0, 2 * XTY_PAIR_CHUNK + 3, 2)
    ps = [(_bf(m, a + 16, seed=m) if dtypes[0] == "bf16" else torch.randn(m, a + 16)) for m in ms]
    qs = [(_bf(m, bdim + 32, seed=m + 1) if dtypes[1] == "bf16" else torch.randn(m, bdim + 32)) for m in ms]
    ws = [torch.rand(max(m, 1)) for m in ms]
    dt = torch.float32 if y_dtype == "f32" else torch.bfloat16
    cs = [torch.full((a, bdim), float("nan"), dtype=dt) for _ in ms]
    rows = [(p.data_ptr(), q.data_ptr(), c.data_ptr(), m) + ((w.data_ptr(),) if row_scale else ())
            for p, q, c, m, w in zip(ps, qs, cs, ms, ws, strict=True)]
    kern.launch(_groups(*rows), ps[0].stride(0) * ps[0].element_size(), qs[0].stride(0) * qs[0].element_size(),
                0, 0.25)
    for p, q, c, w, m in zip(ps, qs, cs, ws, ms, strict=True):
        p, q = p[:, :a].float(), q[:, :bdim].float()
        w = w[:m, None] if row_scale else torch.ones(m, 1)
        scale_p = row_scale and dtypes[0] == "f32"
        p, q = (w * p if scale_p else p).bfloat16().float(), (q if scale_p else w * q).bfloat16().float()
        want = 0.25 * p.T @ q
        if not m:
            assert (c == 0).all()
        elif y_dtype == "f32":
            assert rel_err(c, want) < 1e-5
        else:
            assert rel_err(c.float(), want.bfloat16().float()) < 4e-3


def test_xty_token_pairs_broadcast_from_the_stage():
    """Every bf16 dot of the token-pair form takes P's pair as an embedded broadcast (a separate
    broadcast instruction is 1.3x slower on Zen 4), for both gradient shapes of the MoE."""
    from kt_jit.codegen.compile import compile_assembly, target_for
    from kt_jit.kernels.lora import build_ir

    for bdim, a, x_dtype in ((2048, 16, "f32"), (768, 16, "f32"), (16, 2048, "bf16")):
        asm = compile_assembly(build_ir(LoraSpec("xty", bdim, a, x_dtype=x_dtype, y_dtype="bf16", token_pairs=True)),
                               target_for("avx512"))
        dots = [line for line in asm.splitlines() if "vdpbf16ps" in line]
        assert dots and all("{1to16}" in line for line in dots), (bdim, a)


@pytest.mark.parametrize("a,bdim", [(24, 2048), (264, 32), (136, 48), (8, 3072), (24, 3072), (16, 7168),
                                    (32, 1408), (696, 48)])
@pytest.mark.parametrize("accumulate,y_dtype", [(False, "bf16"), (True, "f32")])
def test_xty_covers_every_output_once(a, bdim, accumulate, y_dtype):
    """Tile numberings that cross rows or leave a partial last item (A a multiple of 8 but not 16;
    groups of one item, and of several whose items end mid-row or leave a partial last one: 24 x
    3072, 16 x 7168, 32 x 1408, 696 x 48), groups of few and of many tokens in one launch: every
    output written once (accumulated into a random C, or over NaN)."""
    kern = get_kernel(LoraSpec("xty", bdim, a, x_dtype="f32", w_dtype="bf16", accumulate=accumulate,
                               y_dtype=y_dtype))
    ms = (3, 40)
    ps = [torch.randn(m, a, generator=torch.Generator().manual_seed(m)) for m in ms]
    qs = [_bf(m, bdim, seed=m + 1) for m in ms]
    dt = torch.float32 if y_dtype == "f32" else torch.bfloat16
    cs = [torch.randn(a, bdim).to(dt) if accumulate else torch.full((a, bdim), float("nan"), dtype=dt) for _ in ms]
    before = [c.float().clone() for c in cs]
    kern.launch(_groups(*[(p.data_ptr(), q.data_ptr(), c.data_ptr(), m) for p, q, c, m in zip(ps, qs, cs, ms,
                                                                                             strict=True)]),
                a * 4, bdim * 2, 0, 0.5)
    for p, q, c, b in zip(ps, qs, cs, before, strict=True):
        want = 0.5 * p.T @ q.float() + (b if accumulate else 0)
        assert rel_err(c.float(), want if y_dtype == "f32" else want.bfloat16().float()) < (1e-5 if accumulate
                                                                                            else 4e-3)


def test_spec_validation():
    with pytest.raises(ValueError, match="multiple of 16"):
        LoraSpec("xb", 24, 16)
    with pytest.raises(ValueError, match="K=48"):
        LoraSpec("xat", 16, 48)
    with pytest.raises(ValueError, match="form"):
        LoraSpec("xyz", 16, 16)
    with pytest.raises(ValueError, match="row weights"):
        LoraSpec("xb", 16, 16, row_scale=True)
    with pytest.raises(ValueError, match="bf16 copy"):
        LoraSpec("xb", 16, 16, accumulate=True, copy_bf16=True)
    with pytest.raises(ValueError, match="token pairs"):
        LoraSpec("xb", 16, 16, token_pairs=True)


def test_xty_bf16_outputs_use_streaming_stores_and_must_be_aligned():
    """The LoRA weight gradients (bf16 xty) are written with streaming stores (LLVM drops the hint on
    stores of bfloat vectors unless the bits are made opaque first); a misaligned output would
    fault, so the launch refuses it."""
    from kt_jit.codegen.compile import compile_assembly, target_for
    from kt_jit.kernels.lora import build_ir

    for bdim in (2048, 64):  # the 4 x 64 / 8 x 32 tiles, and 16-column-pair tiles
        asm = compile_assembly(build_ir(LoraSpec("xty", bdim, 16, x_dtype="f32", w_dtype="bf16", y_dtype="bf16")),
                               target_for("avx512"))
        assert "vmovnt" in asm and "sfence" in asm, bdim
    f32 = compile_assembly(build_ir(LoraSpec("xty", 2048, 16, x_dtype="f32", w_dtype="bf16")), target_for("avx512"))
    assert "vmovnt" not in f32  # (fp32 outputs may accumulate: read-modify-write)
    kern = get_kernel(LoraSpec("xty", 64, 16, x_dtype="f32", w_dtype="bf16", y_dtype="bf16"))
    p, q = torch.randn(3, 16), _bf(3, 64, seed=3)
    c = torch.zeros(16 * 64 + 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="32-byte aligned"):
        kern.launch(_groups((p.data_ptr(), q.data_ptr(), c.data_ptr() + 2, 3)), 64, 128, 0, 1.0)

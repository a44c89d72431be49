"""The MoE LoRA fine-tuning operator against the float32 reference (tests/reference.py::moe)."""

import threading

import pytest
import torch
from conftest import ISAS, NEEDS_AVX512_BF16, file_mappings, fp8_blocks
from reference import moe as ref_moe
from reference import rel_err

import kt_jit
from kt_jit.moe.weights import LORA_NAMES

E, H, I, R = 8, 128, 96, 8


QUANTS = ["bf16", "int8", "int4", "int4_1", "int4_kgroup", "int4_1kgroup"]


def make_layer(e=E, h=H, i=I, r=R, seed=0, lora_b_scale=0.02, quant="bf16"):
    """Experts, LoRA, and the (gate, up, down) the kernels effectively use (dequantized if quantized)."""
    g = torch.Generator().manual_seed(seed)
    gate = (torch.randn(e, i, h, generator=g) / h**0.5).bfloat16()
    up = (torch.randn(e, i, h, generator=g) / h**0.5).bfloat16()
    down = (torch.randn(e, h, i, generator=g) / i**0.5).bfloat16()
    experts = kt_jit.MoEExperts.from_tensors(gate, up, down, quant=quant, group_size=32)
    if quant != "bf16":
        gate, up, down = experts.dequantize()
    lora = kt_jit.MoELoRA(e, h, i, rank=r, alpha=2.0 * r)
    with torch.no_grad():  # non-zero B so every LoRA gradient is exercised
        for name in ("gate_lora_b", "up_lora_b", "down_lora_b"):
            getattr(lora, name).copy_(torch.randn(getattr(lora, name).shape, generator=g) * lora_b_scale)
    return gate, up, down, experts, lora


def make_batch(t, k, e=E, h=H, seed=1, ids=None, normalise=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=g).bfloat16()
    if ids is None:
        ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    w = torch.rand(t, k, generator=g) + 0.1
    if normalise:
        w = w / w.sum(1, keepdim=True)
    return x, ids, w


def reference_grads(x, ids, w, gate, up, down, lora, dout):
    """The reference's (output, dX, router gradient, [six LoRA gradients] or [] for ``lora`` None)."""
    xr = x.float().requires_grad_()
    wr = w.clone().requires_grad_()
    lr = [p.detach().float().requires_grad_() for p in lora.tensors()] if lora is not None else None
    out = ref_moe(xr, ids, wr, gate, up, down, lr, lora.scaling if lora is not None else 0.0)
    out.backward(dout)
    return out.detach(), xr.grad, wr.grad, [p.grad for p in lr or ()]


def check_against_reference(layer, batch, dout, fwd=0.005, grad=0.01):
    """Output and every gradient of kt_jit within ``fwd`` / ``grad`` of the float32 reference.

    Experts the reference gives an exactly zero gradient (no tokens) must get exactly zero too.
    """
    gate, up, down, experts, lora = layer
    x, ids, w = batch
    ref = reference_grads(x, ids, w, gate, up, down, lora, dout)
    ours = run_ours(x, ids, w, experts, lora, dout)
    assert rel_err(ours[0], ref[0]) < fwd, "output"
    assert ours[1].dtype == torch.bfloat16 and rel_err(ours[1], ref[1]) < grad, "grad input"
    assert rel_err(ours[2], ref[2]) < grad, "router grad"
    for name, a, b in zip(LORA_NAMES, ours[3], ref[3], strict=True):
        assert a.dtype == torch.bfloat16 and a.shape == b.shape, name
        if b.abs().sum() == 0:
            assert a.abs().sum() == 0, name
        else:
            assert rel_err(a, b) < grad, name


def run_ours(x, ids, w, experts, lora, dout):
    xo = x.clone().requires_grad_()
    wo = w.clone().requires_grad_()
    for p in lora.parameters():
        p.grad = None
    out = kt_jit.moe_sft(xo, ids, wo, experts, lora)
    out.backward(dout)
    return out.detach(), xo.grad, wo.grad, [p.grad for p in lora.tensors()]


@pytest.mark.parametrize("quant", QUANTS)
def test_moe_sft_forward(quant):
    gate, up, down, experts, lora = make_layer(quant=quant)
    x, ids, w = make_batch(37, 4)
    out = kt_jit.moe_sft(x, ids, w, experts, lora)
    assert out.dtype == torch.float32 and out.shape == x.shape
    ref = ref_moe(x, ids, w, gate, up, down, [p.detach() for p in lora.tensors()], lora.scaling)
    assert rel_err(out, ref) < 0.005
    out16 = kt_jit.moe_sft(x, ids, w, experts, lora, out_dtype=torch.bfloat16)
    assert out16.dtype == torch.bfloat16 and rel_err(out16, ref) < 0.005
    plain = kt_jit.moe_sft(x, ids, w, experts)
    assert rel_err(plain, ref_moe(x, ids, w, gate, up, down)) < 0.005


@pytest.mark.parametrize("quant", QUANTS)
def test_moe_sft_backward(quant):
    dout = torch.randn(37, H, generator=torch.Generator().manual_seed(9))
    check_against_reference(make_layer(quant=quant), make_batch(37, 4), dout)


ROUTING_CASES = {
    "T=1": dict(t=1, k=4),
    "T=13 (not a multiple of 16)": dict(t=13, k=3),
    "top-1": dict(t=20, k=1),
    "all tokens on one expert": dict(t=24, k=1, ids=torch.full((24, 1), 5)),
    "experts with no tokens": dict(t=10, k=2, ids=torch.tensor([[0, 3]] * 10)),
    "weights not summing to 1": dict(t=17, k=4, normalise=False),
    "many tokens": dict(t=150, k=6),
    # bf16: experts of 16, 28, 31 and 32 rows take the tokens-in-lanes transposed GEMM
    "16-row tile sizes": dict(t=157, k=1, ids=torch.repeat_interleave(
        torch.arange(8), torch.tensor([12, 13, 16, 28, 31, 32, 5, 20])).view(-1, 1)),
}


@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("case", list(ROUTING_CASES))
def test_routing_edge_cases(case, quant):
    spec = dict(ROUTING_CASES[case])
    t, k = spec.pop("t"), spec.pop("k")
    dout = torch.randn(t, H, generator=torch.Generator().manual_seed(3))
    check_against_reference(make_layer(quant=quant), make_batch(t, k, **spec), dout)


@NEEDS_AVX512_BF16
def test_tuning_override_reaches_the_operator(monkeypatch):
    """A pass run after KT_JIT_TUNING changes takes kernels, buffers and launch plans made under the
    new values (here a smallest tokens-in-lanes group of 12, two streamed blocks per pass)."""
    from kt_jit.moe import sft

    monkeypatch.setenv("KT_JIT_ISA", "avx512")
    layer = make_layer()
    spec = dict(ROUTING_CASES["16-row tile sizes"])
    t, k = spec.pop("t"), spec.pop("k")
    batch, dout = make_batch(t, k, **spec), torch.randn(t, H, generator=torch.Generator().manual_seed(3))
    for _ in range(sft.RECORD_AT_CALL):  # (a launch plan for the default values, then a run from it)
        check_against_reference(layer, batch, dout)
    tuning = "lanes_min_rows=12,stream_group_blocks=2"
    monkeypatch.setenv("KT_JIT_TUNING", tuning)
    assert sft._kernel("bwd", layer[3], "gate_up").spec.schedule.tl == 12
    check_against_reference(layer, batch, dout)
    # (the passes' keys hold the values: a plan of the defaults would replay their kernels)
    tuned = sft.gemm.host_tuning()
    assert (tuned.lanes_min_rows, tuned.stream_group_blocks) == (12, 2)
    assert any(tuned in key for key in [*sft._plans, *sft._calls] if key[0] == "bwd")
    monkeypatch.setenv("KT_JIT_TUNING", "lanes_min_rows=3")  # a bad setting stops the forward at once
    with pytest.raises(ValueError, match="KT_JIT_TUNING"):
        kt_jit.moe_sft(batch[0], batch[1], batch[2], layer[3])


@NEEDS_AVX512_BF16
def test_bf16_backward_passes_dy_in_lanes(monkeypatch, lanes_form):
    """With the tokens-in-lanes form on (schedule tl), the bf16 AVX-512 backward's transposed GEMMs
    have it, and the pass transposes dY for it in the same launch batch: one dytiles launch before
    each GEMM."""
    from kt_jit.kernels import dytiles
    from kt_jit.moe import sft

    monkeypatch.setenv("KT_JIT_ISA", "avx512")
    layer = make_layer()
    for name in ("gate_up", "down"):
        assert sft._kernel("bwd", layer[3], name).spec.schedule.tl == lanes_form
    launches = []
    orig = dytiles.DyTilesKernel.launch
    monkeypatch.setattr(dytiles.DyTilesKernel, "launch",
                        lambda self, *a, **kw: (launches.append(self.spec), orig(self, *a, **kw))[1])
    monkeypatch.setenv("KT_JIT_LAUNCH_PLANS", "0")
    spec = dict(ROUTING_CASES["16-row tile sizes"])
    t, k = spec.pop("t"), spec.pop("k")
    check_against_reference(layer, make_batch(t, k, **spec), torch.randn(t, H, generator=torch.Generator()
                                                                           .manual_seed(3)))
    assert [(s.form, s.n) for s in launches] == [("lanes", H), ("lanes", 2 * I)]
    launches.clear()  # 15 routed rows: no expert can reach 16, so no rearrangement is launched
    check_against_reference(layer, make_batch(5, 3), torch.randn(5, H, generator=torch.Generator().manual_seed(4)))
    assert launches == []


def test_moe_sft_lora_weight_sync():
    """In-place updates and replaced storage are both seen by the next forward, with no sync call."""
    gate, up, down, experts, lora = make_layer()
    x, ids, w = make_batch(9, 2)

    def ref():
        return ref_moe(x, ids, w, gate, up, down, [p.detach() for p in lora.tensors()], lora.scaling)

    before = kt_jit.moe_sft(x, ids, w, experts, lora)
    with torch.no_grad():
        lora.down_lora_b.add_(0.5)  # in place, as an optimizer step does
    after = kt_jit.moe_sft(x, ids, w, experts, lora)
    assert rel_err(after, before) > 0.01
    assert rel_err(after, ref()) < 0.005
    lora.gate_lora_a.data = torch.randn_like(lora.gate_lora_a) * 0.1  # storage replaced
    assert rel_err(kt_jit.moe_sft(x, ids, w, experts, lora), ref()) < 0.005


def test_moe_sft_training_loop():
    """100 AdamW steps on a fixed target: loss falls and tracks the float32 reference run within 5%."""
    gate, up, down, experts, lora = make_layer(lora_b_scale=0.0)
    ref_params = [p.detach().float().clone().requires_grad_() for p in lora.tensors()]
    # more tokens than the adapters can fit exactly, so the loss keeps a meaningful size
    x, ids, w = make_batch(256, 2, seed=5)
    target = torch.randn(256, H, generator=torch.Generator().manual_seed(6)) * 0.5
    opt = torch.optim.AdamW(lora.parameters(), lr=3e-3)
    ref_opt = torch.optim.AdamW(ref_params, lr=3e-3)
    losses, ref_losses = [], []
    for _ in range(100):
        loss = (kt_jit.moe_sft(x, ids, w, experts, lora) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        ref_loss = (ref_moe(x, ids, w, gate, up, down, ref_params, lora.scaling) - target).pow(2).mean()
        ref_opt.zero_grad()
        ref_loss.backward()
        ref_opt.step()
        ref_losses.append(ref_loss.item())
    assert losses[-1] < 0.2 * losses[0]
    for step, (a, b) in enumerate(zip(losses, ref_losses, strict=True)):
        assert abs(a - b) <= 0.05 * b, (step, a, b)


@pytest.mark.parametrize("quant", ["bf16", "int8"])
def test_backward_skips_gradients_nobody_needs(quant, monkeypatch):
    """An input that needs no gradient gets none, and the transposed gate/up GEMM (only the input
    gradient uses it) does not run; frozen adapters get no gradients. What is computed is
    unchanged. (Launch plans off: this watches the Python that prepares the launches.)"""
    import kt_jit.moe.sft as core

    monkeypatch.setenv("KT_JIT_LAUNCH_PLANS", "0")

    gate, up, down, experts, lora = make_layer(quant=quant)
    x, ids, w = make_batch(13, 3)
    dout = torch.randn(13, H, generator=torch.Generator().manual_seed(7))
    full = run_ours(x, ids, w, experts, lora, dout)
    called = []
    real = core._grouped_bwd
    monkeypatch.setattr(core, "_grouped_bwd", lambda *a, **k: (called.append(a[2]), real(*a, **k)))
    wo = w.clone().requires_grad_()
    for p in lora.parameters():
        p.grad = None
    kt_jit.moe_sft(x, ids, wo, experts, lora).backward(dout)  # x needs no gradient
    assert called == ["down"]
    assert torch.equal(wo.grad, full[2])
    for p, g in zip(lora.tensors(), full[3], strict=True):
        assert torch.equal(p.grad, g)
    called.clear()
    lora.requires_grad_(False)
    for p in lora.parameters():
        p.grad = None
    forms = []
    real_lora = core._lora
    monkeypatch.setattr(core, "_lora", lambda form, *a, **k: (forms.append(form), real_lora(form, *a, **k)))
    xo = x.clone().requires_grad_()
    kt_jit.moe_sft(xo, ids, w, experts, lora).backward(dout)  # frozen adapters, no router gradient
    assert called == ["down", "gate_up"]
    assert "xty" not in forms and "xat" in forms  # the weight-gradient kernels did not run
    assert torch.equal(xo.grad, full[1])
    assert all(p.grad is None for p in lora.parameters())


def test_non_reentrant_checkpointing_drops_the_saved_activations(monkeypatch):
    """Under torch.utils.checkpoint(use_reentrant=False) nothing the forward saved stays alive
    until the backward (it is recomputed); gradients are unchanged."""
    import weakref

    import kt_jit.moe.sft as core

    gate, up, down, experts, lora = make_layer()
    x, ids, w = make_batch(9, 2)
    dout = torch.randn(9, H, generator=torch.Generator().manual_seed(8))
    plain = run_ours(x, ids, w, experts, lora, dout)
    refs = []
    real = core.forward

    def spy(*a, **k):
        out, saved = real(*a, **k)
        refs.append(weakref.ref(saved.block))
        return out, saved

    monkeypatch.setattr(core, "forward", spy)
    for p in lora.parameters():
        p.grad = None
    xo = x.clone().requires_grad_()
    out = torch.utils.checkpoint.checkpoint(lambda a: kt_jit.moe_sft(a, ids, w, experts, lora), xo,
                                            use_reentrant=False)
    assert len(refs) == 1 and refs[0]() is None
    out.backward(dout)
    assert len(refs) == 2  # recomputed for the backward
    assert torch.equal(xo.grad, plain[1])
    for p, g in zip(lora.tensors(), plain[3], strict=True):
        assert torch.equal(p.grad, g)


@pytest.mark.parametrize("with_lora", [True, False])
def test_saved_activations_are_two_bf16_rows_per_routed_pair(monkeypatch, with_lora):
    """The forward keeps [G | U] in bf16, one row per routed pair (no per-expert padding; the
    activation is recomputed), plus the LoRA rows s X A^T (3r bf16 per padded row): at 16 tokens
    on 8 experts of 16-row segments that is far below the fp32 rows it kept before."""
    import kt_jit.moe.sft as core

    gate, up, down, experts, lora = make_layer(r=16)
    lora = lora if with_lora else None
    x, ids, w = make_batch(16, 2)
    dout = torch.randn(16, H, generator=torch.Generator().manual_seed(8))
    saved = []
    real = core.forward

    def spy(*a, **k):
        out, kept = real(*a, **k)
        saved.append(kept)
        return out, kept

    monkeypatch.setattr(core, "forward", spy)
    xo, wo = x.clone().requires_grad_(), w.clone().requires_grad_()
    kt_jit.moe_sft(xo, ids, wo, experts, lora).backward(dout)
    (kept,) = saved
    pairs, rows = 16 * 2, kept.routing.rows
    assert rows > pairs  # (the segments are padded: the LoRA rows keep that layout)
    lora_bytes = rows * 3 * 16 * 2 if with_lora else 0
    assert pairs * 4 * I + lora_bytes <= kept.block.numel() <= pairs * 4 * I + lora_bytes + 3 * 64
    ref = reference_grads(x, ids, w, gate, up, down, lora, dout)
    assert rel_err(xo.grad, ref[1]) < 0.01 and rel_err(wo.grad, ref[2]) < 0.01
    for p, g in zip(lora.tensors() if with_lora else (), ref[3], strict=True):
        assert rel_err(p.grad, g) < 0.01


@pytest.mark.parametrize("loss", ["nonlinear", "linear"])
def test_double_backward_is_refused(loss):
    """Second-order gradients through the MoE are not implemented: asking for them raises, also when
    the loss is linear in the output (then grad_out carries no graph, but the first-order gradients
    still depend on x and the adapters through the saved activations)."""
    _, _, _, experts, lora = make_layer()
    x, ids, w = make_batch(5, 2)
    xo = x.clone().requires_grad_()
    out = kt_jit.moe_sft(xo, ids, w, experts, lora)

    def total(y):
        return y.pow(2).sum() if loss == "nonlinear" else y.sum()

    gx, ga = torch.autograd.grad(total(out), (xo, lora.gate_lora_a), create_graph=True)
    assert gx.requires_grad and ga.requires_grad
    with pytest.raises(RuntimeError, match="no second-order gradients"):
        (gx.pow(2).sum() + ga.float().pow(2).sum()).backward()
    plain = torch.autograd.grad(total(kt_jit.moe_sft(xo, ids, w, experts, lora)), xo)[0]
    assert torch.equal(gx.detach(), plain)  # (the first-order values are those without create_graph)


def test_direct_apply_equals_the_public_apply(monkeypatch):
    """moe_sft calls the autograd Function's C apply directly (kt_jit/api/sft.py::_apply); with the
    public ``Function.apply`` instead, output and every gradient are the same, bit for bit."""
    from kt_jit.api import sft as api_sft

    assert api_sft._direct_apply  # (this torch has the internals; the fallback is what runs below)
    _, _, _, experts, lora = make_layer()
    x, ids, w = make_batch(6, 2)
    dout = torch.randn(6, H, generator=torch.Generator().manual_seed(5))
    direct = run_ours(x, ids, w, experts, lora, dout)
    monkeypatch.setattr(api_sft, "_direct_apply", False)
    public = run_ours(x, ids, w, experts, lora, dout)
    for a, b in zip(direct[:3] + tuple(direct[3]), public[:3] + tuple(public[3]), strict=True):
        assert torch.equal(a, b)


def test_functorch_transforms_refused_and_dead_wrappers_unwrapped():
    """As with the public apply: under a torch.func transform the op refuses (it has no
    setup_context), and a tensor leaked out of a finished transform (a dead wrapper) works."""
    _, _, _, experts, lora = make_layer()
    x, ids, w = make_batch(4, 2)
    leaked = []

    def loss(a):
        leaked.append(a)
        return kt_jit.moe_sft(a, ids, w, experts, lora).sum()

    with pytest.raises(RuntimeError, match="setup_context"):
        torch.func.grad(loss)(x.float())
    dead = leaked[0]
    assert torch._C._functorch.is_functorch_wrapped_tensor(dead)
    want = run_ours(x.float(), ids, w, experts, lora, torch.ones(4, H))
    got = run_ours(dead, ids, w, experts, lora, torch.ones(4, H))
    for a, b in zip(got[:3] + tuple(got[3]), want[:3] + tuple(want[3]), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_checkpointing(use_reentrant):
    gate, up, down, experts, lora = make_layer()
    x, ids, w = make_batch(11, 3)
    dout = torch.randn(11, H, generator=torch.Generator().manual_seed(4))
    plain = run_ours(x, ids, w, experts, lora, dout)
    xo = x.clone().requires_grad_()
    wo = w.clone().requires_grad_()
    for p in lora.parameters():
        p.grad = None
    out = torch.utils.checkpoint.checkpoint(lambda a, b: kt_jit.moe_sft(a, ids, b, experts, lora) * 1.0, xo, wo,
                                            use_reentrant=use_reentrant)
    out.backward(dout)
    assert torch.equal(out.detach(), plain[0])
    assert torch.equal(xo.grad, plain[1]) and torch.equal(wo.grad, plain[2])
    for a, b in zip([p.grad for p in lora.tensors()], plain[3], strict=True):
        assert torch.equal(a, b)


def test_op_cache_stack():
    gate, up, down, experts, lora = make_layer()
    op = kt_jit.MoESFTOp(experts, lora, max_cache_depth=2)
    x1, ids1, w1 = make_batch(5, 2, seed=1)
    x2, ids2, w2 = make_batch(7, 2, seed=2)
    with pytest.raises(RuntimeError, match="No forward cache"):
        op.backward(torch.zeros(5, H))
    op.forward(x1, ids1, w1)
    op.forward(x2, ids2, w2)
    with pytest.raises(RuntimeError, match="Forward cache full"):
        op.forward(x1, ids1, w1)
    op.forward(x1, ids1, w1, save_for_backward=False)  # inference forward needs no slot
    d2 = torch.randn(7, H)
    g2 = op.backward(d2)  # newest first
    ref = reference_grads(x2, ids2, w2, gate, up, down, lora, d2)
    assert rel_err(g2["grad_input"], ref[1]) < 0.01 and rel_err(g2["grad_weights"], ref[2]) < 0.01
    assert rel_err(g2["down_lora_b"], ref[3][5]) < 0.01
    assert op.cache_depth == 1
    with pytest.raises(ValueError, match="grad_output"):
        op.backward(torch.zeros(3, H))
    assert op.cache_depth == 1  # a rejected backward does not consume the forward
    op.backward(torch.zeros(5, H))
    with pytest.raises(RuntimeError, match="No forward cache"):
        op.backward(torch.zeros(5, H))


def test_op_is_thread_safe():
    gate, up, down, experts, lora = make_layer()
    op = kt_jit.MoESFTOp(experts, lora, max_cache_depth=64)
    x, ids, w = make_batch(6, 2)
    errors = []

    def worker():
        try:
            for _ in range(8):
                op.forward(x, ids, w)
                op.backward(torch.ones(6, H))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors and op.cache_depth == 0


def test_bad_inputs_are_clear_errors():
    _, _, _, experts, lora = make_layer()
    x, ids, w = make_batch(4, 2)
    bad = {
        "2-D": (x[0], ids, w),
        "hidden size": (torch.zeros(4, H + 32, dtype=torch.bfloat16), ids, w),
        "int64": (x, ids.int(), w),
        "float tensor": (x, ids, w.long()),
        "disagree": (x, ids[:3], w[:3]),
        "experts": (x, ids + E, w),
        "contiguous": (x.T.contiguous().T, ids, w),
        "bfloat16/float16/float32": (x.long(), ids, w),
    }
    for match, (a, b, c) in bad.items():
        with pytest.raises(ValueError, match=match):
            kt_jit.moe_sft(a, b, c, experts, lora)
    with pytest.raises(ValueError, match="expert ids in"):
        kt_jit.moe_sft(x, ids - 1 - ids, w, experts, lora)
    with torch.no_grad(), pytest.raises(ValueError, match="expert ids in"):  # the no-autograd path too
        kt_jit.moe_sft(x, ids + E, w, experts)
    with pytest.raises(ValueError, match="out_dtype"):
        kt_jit.moe_sft(x, ids, w, experts, lora, out_dtype=torch.float16)
    with pytest.raises(ValueError, match="MoEExperts"):
        kt_jit.moe_sft(x, ids, w, "experts", lora)
    wrong_lora = kt_jit.MoELoRA(E, H, I + 32, rank=R)
    with pytest.raises(ValueError, match="LoRA gate_lora_b has shape"):
        kt_jit.moe_sft(x, ids, w, experts, wrong_lora)
    if torch.device("meta"):
        with pytest.raises(ValueError, match="CPU"):
            kt_jit.moe_sft(x.to("meta"), ids, w, experts, lora)


def test_bad_expert_tensors_are_clear_errors():
    e, i, h = 2, 64, 64
    ok = torch.zeros(e, i, h)
    with pytest.raises(ValueError, match="multiples of 32"):
        kt_jit.MoEExperts.from_tensors(torch.zeros(e, 48, h), torch.zeros(e, 48, h), torch.zeros(e, h, 48))
    with pytest.raises(ValueError, match="up_proj has shape"):
        kt_jit.MoEExperts.from_tensors(ok, torch.zeros(e, i, h + 32), torch.zeros(e, h, i))
    with pytest.raises(ValueError, match="3-D"):
        kt_jit.MoEExperts.from_tensors(ok[0], ok, ok)
    with pytest.raises(ValueError, match="quant"):
        kt_jit.MoEExperts.from_tensors(ok, ok, torch.zeros(e, h, i), quant="fp4")
    for gs in (0, 48, 128):  # not a multiple of 32, or not dividing H = I = 64
        with pytest.raises(ValueError, match="group_size"):
            kt_jit.MoEExperts.from_tensors(ok, ok, torch.zeros(e, h, i), quant="int4_kgroup", group_size=gs)


@pytest.mark.parametrize("quant", [q for q in QUANTS if q != "bf16"])
def test_quantization_error_against_bf16(quant):
    """What quantizing costs, against the bf16 experts' float32 reference (INT8: fwd <= 3%, grads <= 4%)."""
    gate, up, down, _, lora = make_layer()
    _, _, _, qexperts, _ = make_layer(quant=quant)
    x, ids, w = make_batch(40, 4)
    dout = torch.randn(40, H, generator=torch.Generator().manual_seed(5))
    ref = reference_grads(x, ids, w, gate, up, down, lora, dout)
    ours = run_ours(x, ids, w, qexperts, lora, dout)
    # INT8 within the bounds; INT4 bounds are regression guards around the measured error
    # (measured on these Gaussian weights, group size 32: int8 1.2%/1.4%, int4 21%/24%, int4_1 18%/19%,
    # int4_kgroup 17%/18%, int4_1kgroup 14%/16%)
    limits = {"int8": (0.03, 0.04), "int4": (0.25, 0.3), "int4_1": (0.22, 0.25), "int4_kgroup": (0.21, 0.23),
              "int4_1kgroup": (0.18, 0.2)}[quant]
    assert rel_err(ours[0], ref[0]) < limits[0]
    assert rel_err(ours[1], ref[1]) < limits[1] and rel_err(ours[2], ref[2]) < limits[1]
    for name, a, b in zip(LORA_NAMES, ours[3], ref[3], strict=True):
        assert rel_err(a, b) < limits[1], name


@pytest.mark.parametrize("quant", QUANTS)
def test_save_load_round_trip(quant, tmp_path):
    _, _, _, experts, lora = make_layer(quant=quant)
    path = tmp_path / "experts.safetensors"
    experts.save(path)
    loaded = kt_jit.MoEExperts.load(path)
    assert loaded.quant == quant and loaded.nbytes == experts.nbytes
    mapped = file_mappings(path)
    for name, t in experts.tensors.items():
        assert torch.equal(loaded.tensors[name], t), name
        # memory-mapped from the file (not copied), at 64-byte aligned addresses
        ptr = loaded.tensors[name].data_ptr()
        assert ptr % 64 == 0 and any(lo <= ptr < hi for lo, hi in mapped), name
    x, ids, w = make_batch(9, 2)
    assert torch.equal(kt_jit.moe_sft(x, ids, w, loaded, lora), kt_jit.moe_sft(x, ids, w, experts, lora))


def test_aligned_files_pad_between_tensors_and_read_anywhere(tmp_path):
    """save_aligned puts every tensor at a 64-byte offset (padding entries between odd sizes) and the
    file stays a plain safetensors file; a packed file from another writer (off alignment) loads
    into aligned copies."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from kt_jit.moe.aligned_file import is_padding, save_aligned

    g = torch.Generator().manual_seed(5)
    tensors = {"a": torch.randn(3, generator=g), "b": torch.randint(0, 255, (5, 7), generator=g, dtype=torch.uint8),
               "c": torch.randn(2, 9, generator=g).bfloat16(), "d": torch.zeros(0), "e": torch.arange(4),
               "f": torch.tensor(3.5), "g": torch.tensor([True, False, True]), "h": torch.arange(6.0)[::2]}
    path = tmp_path / "aligned.safetensors"
    save_aligned(tensors, path, {"k": "v"})
    plain = load_file(path)
    assert sum(is_padding(k) for k in plain) >= 3
    assert all(torch.equal(plain[k], t) for k, t in tensors.items())
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"k": "v"}
        assert all(f.get_tensor(k).data_ptr() % 64 == 0 for k in tensors if tensors[k].numel())
    for reserved in ("__pad0__", "__metadata__"):
        with pytest.raises(ValueError, match="reserved"):
            save_aligned({reserved: torch.zeros(1)}, tmp_path / "x.safetensors")

    _, _, _, experts, _ = make_layer(quant="int4_1")
    meta = {"format": "kt_jit.MoEExperts", "format_version": "2", "quant": "int4_1", "group_size": "0",
            "num_experts": str(E), "hidden_size": str(H), "intermediate_size": str(I)}
    other = tmp_path / "other.safetensors"
    save_file({"pad": torch.zeros(1, dtype=torch.uint8), **experts.tensors}, other, metadata=meta)
    with safe_open(str(other), framework="pt") as f:
        assert any(f.get_tensor(k).data_ptr() % 64 for k in experts.tensors)  # (what the copy is for)
    with pytest.raises(ValueError, match="need tensors"):  # (an unknown tensor is refused)
        kt_jit.MoEExperts.load(other)
    save_file(dict(experts.tensors), other, metadata=meta)
    loaded = kt_jit.MoEExperts.load(other)
    assert all(torch.equal(loaded.tensors[k], t) and loaded.tensors[k].data_ptr() % 64 == 0
               for k, t in experts.tensors.items())


def test_load_rejects_bad_files(tmp_path):
    _, _, _, experts, _ = make_layer(quant="int8")
    path = tmp_path / "experts.safetensors"
    experts.save(path)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated|readable"):
        kt_jit.MoEExperts.load(truncated)
    from safetensors.torch import load_file, save_file

    other = tmp_path / "other.safetensors"
    save_file(load_file(path), other, metadata={"format": "kt_jit.MoEExperts", "format_version": "999",
                                                "quant": "int8"})
    with pytest.raises(ValueError, match="format version 999"):
        kt_jit.MoEExperts.load(other)
    plain = tmp_path / "plain.safetensors"
    save_file({"a": torch.zeros(2)}, plain)
    with pytest.raises(ValueError, match="not a kt_jit"):
        kt_jit.MoEExperts.load(plain)


@pytest.mark.parametrize("layout", ["per_expert", "mixtral", "fused", "fused_transposed", "sharded"])
def test_from_checkpoint_matches_from_tensors(layout, tmp_path, monkeypatch):
    """A layer's experts read from safetensors in each key layout pack to the same bytes as
    from_tensors, a few experts at a time (the packing never sees the whole layer)."""
    from safetensors.torch import save_file

    import kt_jit.moe.weights as weights

    g = torch.Generator().manual_seed(3)
    gate, up, down = (torch.randn(E, *s, generator=g).bfloat16() for s in ((I, H), (I, H), (H, I)))
    prefix = "model.layers.2.mlp"
    if layout == "fused":
        tensors = {f"{prefix}.experts.gate_up_proj": torch.cat([gate, up], 1), f"{prefix}.experts.down_proj": down}
    elif layout == "fused_transposed":  # (Qwen3-VL-MoE checkpoints)
        tensors = {f"{prefix}.experts.gate_up_proj": torch.cat([gate, up], 1).transpose(1, 2).contiguous(),
                   f"{prefix}.experts.down_proj": down.transpose(1, 2).contiguous()}
    else:
        names = ("w1", "w3", "w2") if layout == "mixtral" else ("gate_proj", "up_proj", "down_proj")
        tensors = {f"{prefix}.experts.{e}.{n}.weight": t[e].clone() for e in range(E)
                   for n, t in zip(names, (gate, up, down), strict=True)}
    tensors["model.layers.2.mlp.gate.weight"] = torch.zeros(E, H)  # the router, ignored
    if layout == "sharded":  # two files and an index, as save_pretrained writes them
        import json

        keys = sorted(tensors)
        shards = {"a.safetensors": keys[: len(keys) // 2], "b.safetensors": keys[len(keys) // 2:]}
        for file, ks in shards.items():
            save_file({k: tensors[k] for k in ks}, tmp_path / file)
        (tmp_path / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {k: f for f, ks in shards.items() for k in ks}}))
        path = tmp_path
    else:
        path = tmp_path / "model.safetensors"
        save_file(tensors, path)
    monkeypatch.setattr(weights, "_PACK_CHUNK_BYTES", 3 * 6 * I * H)  # 3 experts per chunk
    for quant in ("bf16", "int4_kgroup"):
        got = kt_jit.MoEExperts.from_checkpoint(path, prefix, quant=quant, group_size=32)
        want = kt_jit.MoEExperts.from_tensors(gate, up, down, quant=quant, group_size=32)
        assert got.quant == quant and got.tensors.keys() == want.tensors.keys()
        for name, t in want.tensors.items():
            assert torch.equal(got.tensors[name], t), (quant, name)


@pytest.mark.parametrize("block,h,i,fp8", [(None, 256, 384, torch.float8_e4m3fn), ((32, 64), H, I, torch.float8_e5m2),
                                           ((16, 48), H, I, torch.float8_e4m3fn)])
def test_from_checkpoint_reads_fp8_block_scales(block, h, i, fp8, tmp_path, monkeypatch):
    """FP8 experts with block scales (DeepSeek-V3's format: e4m3 weights, fp32 weight_scale_inv per
    block; the block size from config.json, else 128 x 128; blocks cut short at the edges for I = 96
    in blocks of 64) pack to the same bytes as from_tensors of the weights they stand for, computed
    block by block here; blocks 48 wide, which the JIT packer does not take, go through fp32)."""
    import json

    from safetensors.torch import save_file

    import kt_jit.moe.weights as weights

    bn, bk = block or (128, 128)
    g = torch.Generator().manual_seed(4)
    prefix, tensors, wanted = "model.layers.1.mlp", {}, {"gate": [], "up": [], "down": []}
    for e in range(E):
        for name, part, (n, k) in (("gate_proj", "gate", (i, h)), ("up_proj", "up", (i, h)),
                                   ("down_proj", "down", (h, i))):
            q, scales, exact = fp8_blocks(torch.randn(n, k, generator=g) * (e + 1), (bn, bk), fp8)
            tensors[f"{prefix}.experts.{e}.{name}.weight"] = q
            tensors[f"{prefix}.experts.{e}.{name}.weight_scale_inv"] = scales
            wanted[part].append(exact)
    save_file(tensors, tmp_path / "model.safetensors")
    if block:
        (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {
            "quant_method": "fp8", "weight_block_size": list(block)}}))
    monkeypatch.setattr(weights, "_PACK_CHUNK_BYTES", 3 * 12 * i * h)  # 3 experts per chunk
    gate, up, down = (torch.stack(wanted[p]) for p in ("gate", "up", "down"))
    for quant in ("bf16", "int8"):
        got = kt_jit.MoEExperts.from_checkpoint(tmp_path, prefix, quant=quant)
        want = kt_jit.MoEExperts.from_tensors(gate, up, down, quant=quant)
        for name, t in want.tensors.items():
            assert torch.equal(got.tensors[name], t), (quant, name)
    # a scale tensor of another block size or dtype, one missing, and a matrix in another dtype are named
    key = f"{prefix}.experts.3.up_proj.weight"
    for scale, why in ((torch.ones(2, 5), r"_scale_inv has shape \[2, 5\], expected"),
                       (tensors[key + "_scale_inv"].to(fp8), "_scale_inv is stored as F8_E")):
        save_file(tensors | {key + "_scale_inv": scale}, tmp_path / "model.safetensors")
        with pytest.raises(ValueError, match="experts.3.up_proj.weight" + why):
            kt_jit.MoEExperts.from_checkpoint(tmp_path, prefix)
    save_file(tensors | {key: torch.zeros(i, h, dtype=torch.bfloat16)}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="experts.3.up_proj.weight is torch.bfloat16, .* must be stored in one"):
        kt_jit.MoEExperts.from_checkpoint(tmp_path, prefix)
    del tensors[key + "_scale_inv"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="experts.3.up_proj.weight is FP8 but the checkpoint has no"):
        kt_jit.MoEExperts.from_checkpoint(tmp_path, prefix)


def test_from_checkpoint_errors(tmp_path):
    import json

    from safetensors.torch import save_file

    p = tmp_path / "m.safetensors"
    save_file({"model.layers.0.mlp.experts.0.gate_proj.weight": torch.zeros(I, H, dtype=torch.bfloat16),
               "model.layers.0.mlp.experts.0.up_proj.weight": torch.zeros(I, H, dtype=torch.bfloat16),
               "model.layers.0.mlp.experts.0.down_proj.weight": torch.zeros(H, I, dtype=torch.bfloat16),
               "model.layers.0.mlp.experts.1.gate_proj.weight": torch.zeros(I, H, dtype=torch.bfloat16)}, p)
    with pytest.raises(ValueError, match=r"missing \['1.up', '1.down'\]"):
        kt_jit.MoEExperts.from_checkpoint(p, "model.layers.0.mlp")
    with pytest.raises(ValueError, match="no experts under 'model.layers.1.mlp'"):
        kt_jit.MoEExperts.from_checkpoint(p, "model.layers.1.mlp")
    with pytest.raises(ValueError, match="does not exist"):
        kt_jit.MoEExperts.from_checkpoint(tmp_path / "nope", "model.layers.0.mlp")
    # the expert count comes from config.json when there is one; a lone shard is refused
    (tmp_path / "config.json").write_text('{"num_experts": 3}')
    with pytest.raises(ValueError, match="missing .*1.up.*2.gate"):
        kt_jit.MoEExperts.from_checkpoint(p, "model.layers.0.mlp.experts")  # (the module's name works too)
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    with pytest.raises(ValueError, match="one shard of a sharded checkpoint"):
        kt_jit.MoEExperts.from_checkpoint(p, "model.layers.0.mlp")
    for text, why in (('{"weight_map": ', "is not valid JSON"), ("[]", "holds a JSON list, not an object"),
                      ('{"metadata": {}}', "has no weight_map")):  # a damaged index, then config.json
        (tmp_path / "model.safetensors.index.json").write_text(text)
        with pytest.raises(ValueError, match=f"model.safetensors.index.json {why}"):
            kt_jit.MoEExperts.from_checkpoint(tmp_path, "model.layers.0.mlp")
    (tmp_path / "model.safetensors.index.json").unlink()
    (tmp_path / "config.json").write_text('{"num_experts": 3')
    with pytest.raises(ValueError, match="config.json is not valid JSON .*restore it"):
        kt_jit.MoEExperts.from_checkpoint(p, "model.layers.0.mlp")
    (tmp_path / "config.json").unlink()
    sharded = tmp_path / "sharded"  # an index naming a shard that is not there; a file that is not safetensors
    sharded.mkdir()
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        f"model.layers.0.mlp.experts.0.{n}.weight": "model-00002-of-00002.safetensors"
        for n in ("gate_proj", "up_proj", "down_proj")}}))
    with pytest.raises(ValueError, match="model-00002-of-00002.safetensors is not there or not a file"):
        kt_jit.MoEExperts.from_checkpoint(sharded, "model.layers.0.mlp")
    (sharded / "model.safetensors.index.json").unlink()
    (sharded / "model.safetensors").write_bytes(b"<html>rate limited</html>")
    with pytest.raises(ValueError, match="model.safetensors is not a readable safetensors file"):
        kt_jit.MoEExperts.from_checkpoint(sharded, "model.layers.0.mlp")
    with pytest.raises(ValueError, match=r"gate_proj holds no experts \(shape \[0, I, H\]\)"):
        kt_jit.MoEExperts.from_tensors(*(torch.zeros(0, *s) for s in ((I, H), (I, H), (H, I))))
    experts = kt_jit.MoEExperts.from_tensors(*(torch.zeros(1, *s) for s in ((I, H), (I, H), (H, I))))
    with pytest.raises(FileNotFoundError, match="nowhere is not a directory"):
        experts.save(tmp_path / "nowhere" / "experts.safetensors")
    bad = tmp_path / "bad.safetensors"
    save_file({"x.experts.0.gate_proj.weight": torch.zeros(I, H), "x.experts.0.up_proj.weight": torch.zeros(I, H),
               "x.experts.0.down_proj.weight": torch.zeros(I, H)}, bad)
    with pytest.raises(ValueError, match="down_proj.weight has shape"):
        kt_jit.MoEExperts.from_checkpoint(bad, "x")
    fp8 = tmp_path / "fp8.safetensors"
    save_file({f"x.experts.0.{n}.weight": torch.zeros(*s).to(torch.float8_e4m3fn)
               for n, s in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I)))}, fp8)
    with pytest.raises(ValueError, match="dequantize the checkpoint"):
        kt_jit.MoEExperts.from_checkpoint(fp8, "x")
    save_file({"x.experts.gate_up_proj": torch.zeros(2, 2 * I, H).to(torch.float8_e4m3fn),
               "x.experts.down_proj": torch.zeros(2, H, I).to(torch.float8_e4m3fn)}, fp8)
    with pytest.raises(ValueError, match="fused FP8 experts .* are not read; FP8 is read from per-expert keys"):
        kt_jit.MoEExperts.from_checkpoint(fp8, "x")


@pytest.mark.parametrize("quant", QUANTS)
def test_dequantize_shapes_and_error(quant):
    g = torch.Generator().manual_seed(0)
    gate, up, down = (torch.randn(s, generator=g) for s in ((2, 64, 96), (2, 64, 96), (2, 96, 64)))
    experts = kt_jit.MoEExperts.from_tensors(gate, up, down, quant=quant, group_size=32)
    dg, du, dd = experts.dequantize()
    assert dg.shape == gate.shape and du.shape == up.shape and dd.shape == down.shape
    limit = {"bf16": 0.005, "int8": 0.01, "int4": 0.15, "int4_1": 0.13, "int4_kgroup": 0.13,
             "int4_1kgroup": 0.11}[quant]
    for a, b in ((dg, gate), (du, up), (dd, down)):
        assert rel_err(a, b) < limit


def test_experts_memory_and_lora_init():
    gate, up, down, experts, _ = make_layer()
    assert experts.nbytes == 3 * E * H * I * 2  # resident size equals the bf16 size exactly
    fresh = kt_jit.MoELoRA(E, H, I, rank=R)
    for name in ("gate_lora_b", "up_lora_b", "down_lora_b"):
        assert getattr(fresh, name).abs().sum() == 0
    bound = 1 / H**0.5
    assert 0 < fresh.gate_lora_a.abs().max() <= bound
    x, ids, w = make_batch(5, 2)
    assert torch.equal(kt_jit.moe_sft(x, ids, w, experts, fresh), kt_jit.moe_sft(x, ids, w, experts))
    copy = kt_jit.MoELoRA.from_tensors(*fresh.tensors(), alpha=fresh.alpha)
    assert all(torch.equal(a, b) for a, b in zip(copy.tensors(), fresh.tensors(), strict=True))


@pytest.mark.parametrize("isa", ["amx_emu"])
def test_amx_kernel_path_through_the_operator(isa, monkeypatch):
    """The grouped AMX kernels (segments as whole tiles, pre-arranged dY) give the same gradients."""
    from kt_jit.moe import sft

    monkeypatch.setenv("KT_JIT_ISA", isa)
    monkeypatch.setattr(sft, "AMX_BF16_MIN_ROWS", 0)  # every pass on the AMX kernels
    dout = torch.randn(21, 64, generator=torch.Generator().manual_seed(2))
    check_against_reference(make_layer(h=64, i=64), make_batch(21, 3, h=64), dout)


def spy_launches(monkeypatch, gemm_what, dy_what) -> list:
    """Record ``gemm_what(kernel)`` for every GEMM launch and ``dy_what(kernel)`` for every dY
    layout launch into the returned list (launch plans off: a replay skips the launch calls)."""
    from kt_jit.kernels import dytiles, gemm

    monkeypatch.setenv("KT_JIT_LAUNCH_PLANS", "0")
    launched = []
    for cls, what in ((gemm.GemmKernel, gemm_what), (dytiles.DyTilesKernel, dy_what)):
        def spy(self, *args, _orig=cls.launch, _what=what, **kwargs):
            launched.append(_what(self))
            return _orig(self, *args, **kwargs)
        monkeypatch.setattr(cls, "launch", spy)
    return launched


@pytest.mark.parametrize("isa", [p for p in ISAS if p.values[0] != "avx512"])
@pytest.mark.parametrize("quant", QUANTS[1:])
def test_quantized_experts_on_amx_kernels(isa, quant, monkeypatch):
    """Quantized experts on an AMX CPU: a pass with at least AMX_QUANT_MIN_ROWS routed rows per
    active expert runs the AMX kernels (codes decoded to bf16 tiles, LoRA in separate passes), a
    sparser one the AVX-512 integer kernels; forward and every gradient match the reference."""
    from kt_jit.moe import sft
    from kt_jit.moe.routing import route

    monkeypatch.setenv("KT_JIT_ISA", isa)
    launched = spy_launches(monkeypatch, lambda k: (k.spec.op, k.spec.isa), lambda k: ("dy", k.spec.scaled))
    layer = make_layer(h=64, i=64, quant=quant)
    for t in (7, 8):  # the switch point: AMX_QUANT_MIN_ROWS rows per active expert, every mode
        ids = torch.tensor([[0, 1]] * t)
        assert sft.pass_isa(layer[3], route(ids, E)) == (isa if t >= sft.AMX_QUANT_MIN_ROWS else None)
    for t, k, want in ((48, 3, isa), (96, 3, isa), (2, 2, None)):  # 18, 36 and 1 rows per active expert
        batch = make_batch(t, k, h=64)
        assert sft.pass_isa(layer[3], route(batch[1], E)) == want
        assert sft._fuses_lora(layer[3], want) == (want is None)
        dout = torch.randn(t, 64, generator=torch.Generator().manual_seed(t))
        launched.clear()
        check_against_reference(layer, batch, dout)
        gemm_isas = {isa_ for op, isa_ in launched if op != "dy"}
        assert gemm_isas == {want or "avx512"}, launched
        assert {op for op, _ in launched} == {"fwd", "bwd"} | ({"dy"} if want else set()), launched
        if want:  # per channel: dY diag(s) tiles
            assert {s for op, s in launched if op == "dy"} == {quant in ("int8", "int4", "int4_1")}


@NEEDS_AVX512_BF16
@pytest.mark.parametrize("isa", [p for p in ISAS if p.values[0] != "avx512"])
def test_bf16_experts_on_amx_cpus_take_avx512_kernels_at_few_rows(isa, monkeypatch, lanes_form):
    """bf16 experts on an AMX CPU: a pass below AMX_BF16_MIN_ROWS routed rows per active expert runs
    the AVX-512 kernels (LoRA fused, no dY tiles but, with the tokens-in-lanes form on, dY in its
    layout), a denser one the AMX kernels (LoRA in separate passes, dY packed into tiles); forward
    and every gradient match the reference either way."""
    from kt_jit.moe import sft
    from kt_jit.moe.routing import route

    monkeypatch.setenv("KT_JIT_ISA", isa)
    launched = spy_launches(monkeypatch, lambda k: (k.spec.op, k.spec.isa, k.spec.lora_rank > 0),
                            lambda k: ("dy", k.spec.form, False))
    layer = make_layer(h=64, i=64)
    for t in (3, 4):  # the switch point: AMX_BF16_MIN_ROWS rows per active expert
        ids = torch.tensor([[0, 1]] * t)
        assert sft.pass_isa(layer[3], route(ids, E)) == ("avx512" if t < sft.AMX_BF16_MIN_ROWS else None)
    assert sft.pass_isa(layer[3], route(torch.zeros(0, 2, dtype=torch.int64), E)) is None
    skewed = torch.tensor([[0]] * 20 + [[e] for e in range(1, E)])  # expert 0: 20 rows, 27 over 8 experts
    for t, k, want, ids in ((27, 1, "avx512", skewed), (24, 3, isa, None)):  # 3.4 and 9 rows per active expert
        batch = make_batch(t, k, h=64, ids=ids)
        assert sft.pass_isa(layer[3], route(batch[1], E)) == (None if want == isa else want)
        dout = torch.randn(t, 64, generator=torch.Generator().manual_seed(t))
        launched.clear()
        check_against_reference(layer, batch, dout)
        gemms = {(op, isa_, fused) for op, isa_, fused in launched if op != "dy"}
        if want == "avx512":  # every GEMM on AVX-512 with its LoRA term fused; expert 0's dY in lanes
            assert gemms == {("fwd", "avx512", True), ("bwd", "avx512", True)}, launched
            assert {form for op, form, _ in launched if op == "dy"} == {"lanes"}, launched
        else:
            assert gemms == {("fwd", isa, False), ("bwd", isa, False)}, launched
            assert any(form == "amx" for op, form, _ in launched if op == "dy"), launched


@pytest.mark.parametrize("isa", [pytest.param("avx512", marks=NEEDS_AVX512_BF16), "amx_emu"])
@pytest.mark.parametrize("quant", ["bf16", "int8"])
def test_zero_tokens_forward_and_backward(isa, quant, monkeypatch):
    """T = 0: empty output and input gradient, all-zero adapter gradients, on both kernel paths."""
    monkeypatch.setenv("KT_JIT_ISA", isa)
    *_, experts, lora = make_layer(h=64, i=64, quant=quant)
    x = torch.zeros(0, 64, dtype=torch.bfloat16, requires_grad=True)
    w = torch.zeros(0, 2, requires_grad=True)
    out = kt_jit.moe_sft(x, torch.zeros(0, 2, dtype=torch.int64), w, experts, lora)
    assert out.shape == (0, 64)
    out.backward(torch.zeros(0, 64))
    assert x.grad.shape == (0, 64) and w.grad.shape == (0, 2)
    assert all(p.grad is not None and p.grad.abs().sum() == 0 for p in lora.tensors())


@pytest.mark.parametrize("isa,i", [pytest.param("avx512", 96, marks=NEEDS_AVX512_BF16),
                                   pytest.param("avx512", 64, marks=NEEDS_AVX512_BF16), ("amx_emu", 64)])
def test_fused_and_separate_lora_paths(isa, i, monkeypatch):
    """The AVX-512 GEMMs fuse the LoRA products (I = 96 splits gate/up at a 32-column work item,
    I = 64 at 64 columns); the AMX path adds them in separate passes."""
    from kt_jit.moe import sft

    monkeypatch.setenv("KT_JIT_ISA", isa)
    monkeypatch.setattr(sft, "AMX_BF16_MIN_ROWS", 0)  # (the AMX path at any row count)
    layer = make_layer(h=64, i=i)
    assert sft._fuses_lora(layer[3]) == (isa == "avx512")
    dout = torch.randn(13, 64, generator=torch.Generator().manual_seed(3))
    check_against_reference(layer, make_batch(13, 3, h=64), dout)


@pytest.mark.parametrize("rows_max", [0, 1 << 20])
@pytest.mark.parametrize("rank", [8, 32])
def test_gate_up_a_products_in_the_gather_or_separate(rows_max, rank, monkeypatch):
    """The gate/up adapters' A-products come from the gather launch at few rows per expert and
    from a separate grouped launch above (both forced here, padded and native ranks)."""
    from kt_jit.moe import sft

    monkeypatch.setattr(sft, "GATHER_A_ROWS_MAX", rows_max)
    monkeypatch.setenv("KT_JIT_LAUNCH_PLANS", "0")  # (a plan of the other branch would replay)
    dout = torch.randn(11, H, generator=torch.Generator().manual_seed(4))
    layer = make_layer(r=rank)
    check_against_reference(layer, make_batch(11, 3), dout)
    # without saving, the products go to scratch rows instead of a saved tensor
    gate, up, down, experts, lora = layer
    x, ids, w = make_batch(11, 3, seed=5)
    out = kt_jit.MoESFTOp(experts, lora).forward(x, ids, w, save_for_backward=False)
    want = ref_moe(x.float(), ids, w, gate, up, down, [p.detach().float() for p in lora.tensors()], lora.scaling)
    assert rel_err(out, want) < 0.005


@pytest.mark.parametrize("rank", [4, 16, 32, 48])
def test_lora_ranks(rank):
    """Ranks the kernels run natively (16, 32) and ranks that are zero-padded (4 -> 16, 48 -> 64)."""
    dout = torch.randn(19, H, generator=torch.Generator().manual_seed(8))
    check_against_reference(make_layer(r=rank), make_batch(19, 3), dout)


def test_inputs_modified_before_backward_are_detected():
    _, _, _, experts, lora = make_layer()
    x, ids, w = make_batch(6, 2)
    xo = x.clone().requires_grad_()
    out = kt_jit.moe_sft(xo, ids, w, experts, lora)
    with torch.no_grad():
        xo.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward(torch.ones_like(out))
    ids2 = ids.clone()  # the routing is derived from the ids: changing them in place is caught too
    out = kt_jit.moe_sft(x.clone().requires_grad_(), ids2, w, experts, lora)
    ids2[0, 0] = (ids2[0, 0] + 1) % E
    with pytest.raises(RuntimeError, match="topk_ids was modified in place"):
        out.backward(torch.ones_like(out))
    op = kt_jit.MoESFTOp(experts, lora)
    x2 = x.clone()
    op.forward(x2, ids, w)
    x2.mul_(2)
    with pytest.raises(RuntimeError, match="modified in place"):
        op.backward(torch.ones(6, H))


def test_op_copied_with_a_saved_forward_runs_its_backward_alone():
    """A deep copy (or pickle) of an op holding a saved forward has its own routing: its backward
    after the original is gone gives the original's gradients."""
    import copy
    import gc
    import pickle

    *_, experts, lora = make_layer()
    x, ids, w = make_batch(9, 3)
    dout = torch.randn(9, H, generator=torch.Generator().manual_seed(4))
    op = kt_jit.MoESFTOp(experts, lora)
    op.forward(x, ids, w)
    twins = [copy.deepcopy(op), pickle.loads(pickle.dumps(op))]
    want = op.backward(dout)
    del op
    gc.collect()
    for twin in twins:
        got = twin.backward(dout)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_deferred_and_immediate_launches_agree(monkeypatch):
    """An MoE pass's launches batched (the default) or run one by one: bit-identical results."""
    results = []
    *_, experts, lora = make_layer(quant="int8")
    dout = torch.randn(11, H, generator=torch.Generator().manual_seed(5))
    for defer in ("1", "0"):
        monkeypatch.setenv("KT_JIT_DEFER_LAUNCHES", defer)
        results.append(run_ours(*make_batch(11, 3), experts, lora, dout))
    (out_a, dx_a, dw_a, lg_a), (out_b, dx_b, dw_b, lg_b) = results
    assert torch.equal(out_a, out_b) and torch.equal(dx_a, dx_b) and torch.equal(dw_a, dw_b)
    assert all(torch.equal(a, b) for a, b in zip(lg_a, lg_b, strict=True))


def test_op_rechecks_replaced_lora():
    _, _, _, experts, lora = make_layer()
    op = kt_jit.MoESFTOp(experts, lora)
    x, ids, w = make_batch(4, 2)
    lora.gate_lora_a = torch.nn.Parameter(torch.randn(E, H, R).bfloat16().transpose(1, 2))  # not contiguous
    with pytest.raises(ValueError, match="contiguous"):
        op.forward(x, ids, w)
    lora.gate_lora_a = torch.nn.Parameter(torch.randn(E, R + 16, H).bfloat16())
    with pytest.raises(ValueError, match="gate_lora_a has shape"):
        op.forward(x, ids, w)


def test_op_records_no_graph_and_restores_grad_mode():
    """The op runs with autograd recording off (its own switch, not torch.no_grad) and turns it back
    on afterwards, also when the pass raises; under torch.no_grad it leaves the mode off."""
    _, _, _, experts, lora = make_layer()
    op = kt_jit.MoESFTOp(experts, lora)
    x, ids, w = make_batch(4, 2)
    x = x.float().requires_grad_()  # converted to bf16 inside: not recorded either
    out = op.forward(x, ids, w)
    assert not out.requires_grad and out.grad_fn is None and torch.is_grad_enabled()
    assert op._stack[-1].x.grad_fn is None  # (its bf16 copy of x: recorded were grad mode on)
    grads = op.backward(torch.randn(4, H))
    assert all(not g.requires_grad for g in grads.values()) and torch.is_grad_enabled()
    with pytest.raises(ValueError, match="expert ids"):
        op.forward(x, torch.full_like(ids, E), w)
    assert torch.is_grad_enabled()
    with torch.no_grad():
        op.forward(x, ids, w, save_for_backward=False)
        assert not torch.is_grad_enabled()


def test_asymmetric_int4_groups_away_from_zero():
    """Groups whose values are all positive (or all negative) still quantize within range."""
    from kt_jit.kernels.quant import dequantize_int4, pack_int4

    w = torch.rand(2, 64, 64) + 1.0
    w[1] = -w[1]
    p, s, z = pack_int4(w, 32, asym=True)
    assert rel_err(dequantize_int4(p, s, z), w) < 0.05


def test_experts_constructor_validates_tensors():
    _, _, _, experts, _ = make_layer(quant="int8")
    t = dict(experts.tensors)
    t["down"] = t["down"][:-1]
    with pytest.raises(ValueError, match="'down'"):
        kt_jit.MoEExperts(t, H, I, "int8")
    t = dict(experts.tensors)
    t["gate_up"] = t["gate_up"].view(torch.uint8)
    with pytest.raises(ValueError, match="'gate_up'"):
        kt_jit.MoEExperts(t, H, I, "int8")
    with pytest.raises(ValueError, match="need tensors"):
        kt_jit.MoEExperts({"gate_up": experts.gate_up, "down": experts.down}, H, I, "int8")


@pytest.mark.parametrize("quant", ["bf16", "int8", "int4_1kgroup"])
def test_row_buffers_padded_off_4kb_pitches(quant):
    """H=2048, I=1024: every per-expert row buffer of the backward (dY, dX, D, [dG | dU]) would have a
    4 KB-multiple pitch and gets 64 bytes of padding; ~20 rows per expert take the streamed
    transposed GEMM for bf16 and int8 (allowed up to 24 rows with padded pitches; int4_1kgroup's
    small groups take the fold form up to 8 rows, so the panel), T=3 the small-group paths."""
    from kt_jit.moe.sft import _Arena, _Layout, _row_pitch

    assert _row_pitch(2048, 2) == 2 * (2048 + 32)
    assert _row_pitch(1024, 4) == 4 * (1024 + 16)
    assert _row_pitch(7168, 2) == 2 * (7168 + 32)  # 14 KB: only two L1 sets
    assert _row_pitch(160, 2) == 320  # 5 x 64: already odd
    arena = _Arena(3, _Layout((("a", (2048, 2, True)), ("b", (16, 4, False)), ("c", (1024, 4, True)))))
    a, b, c = (arena.rows[n] for n in "abc")
    assert (a.pitch, b.pitch, c.pitch) == (4160, 64, 4160)
    assert all(v.addr % 64 == 0 for v in (a, b, c))
    assert b.addr >= a.addr + 3 * a.pitch and c.addr >= b.addr + 3 * b.pitch  # no overlap
    layer = make_layer(e=4, h=2048, i=1024, quant=quant)
    for t in (40, 3):
        dout = torch.randn(t, 2048, generator=torch.Generator().manual_seed(t))
        check_against_reference(layer, make_batch(t, 2, e=4, h=2048, seed=t), dout)


def test_op_refuses_experts_changed_between_forward_and_backward():
    """Backward runs on the forward's saved rows and routing: experts of another shape would have the
    kernels index them out of bounds (this crashed the process before it was checked)."""
    _, _, _, experts, lora = make_layer()
    x, ids, w = make_batch(5, 2)
    for other in (make_layer(h=H + 32)[3], make_layer(i=I + 32)[3], make_layer(e=E // 2)[3],
                  make_layer(quant="int8")[3]):
        op = kt_jit.MoESFTOp(experts)
        op.forward(x, ids, w)
        op.experts = other
        with pytest.raises(RuntimeError, match="experts changed"):
            op.backward(torch.ones(5, H))
    op = kt_jit.MoESFTOp(experts, lora)  # the same shapes (e.g. a reloaded copy) are accepted
    op.forward(x, ids, w)
    op.experts = make_layer(seed=3)[3]
    assert op.backward(torch.ones(5, H))["grad_input"].shape == (5, H)


def test_op_refuses_adapters_changed_between_forward_and_backward():
    """An optimizer step (in place) or a replaced Parameter between a saved forward and its backward
    would mix old and new adapter values in the gradients: the backward raises (moe_sft's autograd
    does through its saved tensors); a step after the backward is the normal order."""
    _, _, _, experts, lora = make_layer()
    x, ids, w = make_batch(6, 2)
    op = kt_jit.MoESFTOp(experts, lora)
    op.forward(x, ids, w)
    with torch.no_grad():
        lora.gate_lora_b.mul_(3)
    with pytest.raises(RuntimeError, match="adapters were changed"):
        op.backward(torch.ones(6, H))
    op.forward(x, ids, w)
    lora.up_lora_a = torch.nn.Parameter(lora.up_lora_a.detach().clone())  # same values, another tensor
    with pytest.raises(RuntimeError, match="adapters were changed"):
        op.backward(torch.ones(6, H))
    op.forward(x, ids, w)
    grads = op.backward(torch.ones(6, H))
    with torch.no_grad():  # (the step after the backward)
        lora.gate_lora_b.sub_(grads["gate_lora_b"])
    op.forward(x, ids, w)
    assert op.backward(torch.ones(6, H))["grad_input"].shape == (6, H)


def test_op_backward_checks_grad_output():
    _, _, _, experts, lora = make_layer()
    x, ids, w = make_batch(3, 2)
    op = kt_jit.MoESFTOp(experts, lora)
    op.forward(x, ids, w)
    bad = {"CPU": torch.zeros(3, H, device="meta"), "dense": torch.zeros(3, H).to_sparse(),
           "floating": torch.zeros(3, H, dtype=torch.complex64), "tensor": [[0.0] * H] * 3,
           rf"\[3, {H}\]": torch.zeros(3, H + 1)}
    for match, g in bad.items():
        with pytest.raises(ValueError, match=match):
            op.backward(g)
        assert op.cache_depth == 1  # (the saved forward stays for a correct call)
    assert op.backward(torch.ones(3, H, dtype=torch.float64))["grad_input"].shape == (3, H)


def test_inference_mode_tensors_are_refused_only_when_saved():
    _, _, _, experts, lora = make_layer()
    with torch.inference_mode():
        x, ids, w = make_batch(3, 2)
        ref = kt_jit.moe_sft(x, ids, w, experts, lora)  # no grad: nothing saved, fine
    with pytest.raises(ValueError, match="inference_mode"):
        kt_jit.moe_sft(x, ids, w, experts, lora)  # the adapters require grad: it would save x
    op = kt_jit.MoESFTOp(experts, lora)
    with pytest.raises(ValueError, match="inference_mode"):
        op.forward(x, ids, w)
    assert torch.equal(op.forward(x, ids, w, save_for_backward=False), ref)


def test_experts_are_read_only_and_copyable():
    import copy
    import pickle

    _, _, _, experts, _ = make_layer(quant="int4_1kgroup")
    with pytest.raises(TypeError):
        experts.tensors["gate_up"] = experts.gate_up[:1].clone()  # (kernels would read past its end)
    for twin in (copy.deepcopy(experts), pickle.loads(pickle.dumps(experts))):
        assert sorted(twin.tensors) == sorted(experts.tensors)
        assert all(torch.equal(twin.tensors[k], v) for k, v in experts.tensors.items())
        with pytest.raises(TypeError):
            twin.tensors["down"] = twin.down
        with pytest.raises(AttributeError, match="read-only"):
            twin.num_experts = 4 * E
    x, ids, w = make_batch(3, 2)
    for name, value in (("num_experts", 1000), ("hidden_size", 2 * H), ("intermediate_size", I // 2),
                        ("group_size", 64), ("tensors", {}), ("down", experts.gate_up)):
        with pytest.raises(AttributeError, match=f"MoEExperts.{name} is read-only"):
            setattr(experts, name, value)  # (an id of 999 < 1000 then read out of bounds: a crash)
    experts.note = "other attributes stay writable"
    assert kt_jit.moe_sft(x, ids, w, experts).shape == (3, H)


def test_experts_constructor_and_load_check_sizes_and_groups(tmp_path):
    _, _, _, experts, _ = make_layer(quant="int4_kgroup")
    with pytest.raises(ValueError, match="multiples of 32"):  # (the packed shapes alone allow I = 65)
        kt_jit.MoEExperts(dict(experts.tensors), H, I + 1, "int4_kgroup", 32)
    with pytest.raises(ValueError, match="group_size"):
        kt_jit.MoEExperts(dict(experts.tensors), H, I, "int4_kgroup", 16)
    from safetensors.torch import load_file, save_file

    path = tmp_path / "experts.safetensors"
    experts.save(path)
    meta = {"format": "kt_jit.MoEExperts", "format_version": "2", "quant": "int4_kgroup", "group_size": "32",
            "num_experts": str(E), "hidden_size": str(H), "intermediate_size": str(I)}
    for change, match in (({"intermediate_size": str(I + 1)}, "multiples of 32"), ({"group_size": "abc"}, "metadata"),
                          ({"hidden_size": None}, "metadata")):
        edited = {k: v for k, v in (meta | change).items() if v is not None}
        save_file(load_file(path), tmp_path / "edited.safetensors", metadata=edited)
        with pytest.raises(ValueError, match=match):
            kt_jit.MoEExperts.load(tmp_path / "edited.safetensors")
    with pytest.raises(ValueError, match="directory"):
        kt_jit.MoEExperts.load(tmp_path)
    with pytest.raises(ValueError, match="directory"):
        experts.save(tmp_path)
    assert [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []


def test_load_without_mmap_survives_the_file_changing(tmp_path):
    _, _, _, experts, lora = make_layer(quant="int8")
    path = tmp_path / "experts.safetensors"
    experts.save(path)
    x, ids, w = make_batch(4, 2)
    loaded = kt_jit.MoEExperts.load(path, mmap=False)
    path.write_bytes(b"")  # (with the default mmap=True this would be a SIGBUS at the next read)
    with torch.no_grad():
        assert torch.equal(kt_jit.moe_sft(x, ids, w, loaded, lora), kt_jit.moe_sft(x, ids, w, experts, lora))


def test_api_objects_are_checked_when_given():
    _, _, _, experts, lora = make_layer()
    x, ids, w = make_batch(2, 2)
    with pytest.raises(ValueError, match="MoELoRA"):
        kt_jit.moe_sft(x, ids, w, experts, tuple(lora.tensors()))
    with pytest.raises(ValueError, match="MoEExperts"):
        kt_jit.MoESFTOp("experts")
    with pytest.raises(ValueError, match="MoELoRA"):
        kt_jit.MoESFTOp(experts, lora=tuple(lora.tensors()))
    for depth in (0, 1.5, "2", True):
        with pytest.raises(ValueError, match="max_cache_depth"):
            kt_jit.MoESFTOp(experts, max_cache_depth=depth)
    with pytest.raises(ValueError, match="bfloat16"):
        kt_jit.MoELoRA(E, H, I, dtype=torch.float32)
    with pytest.raises(ValueError, match="3-D"):
        kt_jit.MoELoRA.from_tensors(*(t[0] for t in lora.tensors()))
    del lora.down_lora_b
    with pytest.raises(ValueError, match="lack a tensor"):
        kt_jit.moe_sft(x, ids, w, experts, lora)


@pytest.mark.parametrize("quant", QUANTS[1:])
@pytest.mark.parametrize("bad,where", [(float("nan"), "gate"), (float("inf"), "up"), (float("-inf"), "down")])
def test_quantizing_refuses_nan_and_inf_weights(quant, bad, where):
    """A NaN or infinite weight would quantize to finite codes (its group's scale fell back to 1) and
    silently wipe out its channel: packing raises, naming the projection and the expert, on the JIT
    packer's path (bf16 rows) and on the torch path (fp32 rows read through a column stride)."""
    g = torch.Generator().manual_seed(0)
    gate, up = (torch.randn(E, I, H, generator=g) / H**0.5 for _ in range(2))
    down = torch.randn(E, H, I, generator=g) / I**0.5
    {"gate": gate, "up": up, "down": down}[where][5, 7, 40] = bad
    for ws in ((gate.bfloat16(), up.bfloat16(), down.bfloat16()),
               (gate.transpose(1, 2).contiguous().transpose(1, 2), up, down)):
        with pytest.raises(ValueError, match=f"{where}_proj of expert 5 has NaN or infinite values.*channel 7"):
            kt_jit.MoEExperts.from_tensors(*ws, quant=quant, group_size=32)
    kt_jit.MoEExperts.from_tensors(gate.bfloat16(), up.bfloat16(), down.bfloat16())  # (bf16 keeps them as they are)


def test_experts_and_adapter_arguments_are_validated():
    """Arguments of the wrong type get a ValueError naming them (they reached struct, torch.zeros or
    a comparison before, or were accepted: alpha as a string, NaN); integer-likes (NumPy) work."""
    import numpy as np

    gate, up, down, *_ = make_layer()
    for kw, msg in ((dict(quant="int4_kgroup", group_size=32.0), "group_size must be an integer"),
                    (dict(quant="int4_kgroup", group_size=None), "group_size must be an integer"),
                    (dict(quant=["bf16"]), "quant must be one of")):
        with pytest.raises(ValueError, match=msg):
            kt_jit.MoEExperts.from_tensors(gate, up, down, **kw)
    assert kt_jit.MoEExperts.from_tensors(gate, up, down, quant="int4_kgroup", group_size=np.int64(32)).group_size == 32
    for kw, msg in ((dict(rank=16.0), "rank must be a positive integer"), (dict(rank=None), "rank must be"),
                    (dict(num_experts=-1), "num_experts must be"), (dict(alpha="32"), "alpha must be a finite"),
                    (dict(alpha=float("nan")), "alpha must be a finite"), (dict(alpha=None), "alpha must be")):
        args = dict(num_experts=E, hidden_size=H, intermediate_size=I) | kw
        with pytest.raises(ValueError, match=msg):
            kt_jit.MoELoRA(**args)
    lora = kt_jit.MoELoRA(np.int64(E), H, I, rank=np.int64(16), alpha=np.float32(8))
    assert lora.rank == 16 and type(lora.rank) is int and lora.scaling == 0.5

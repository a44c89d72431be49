"""kt_jit.moe_checkpoint_context: non-reentrant checkpointing without a second MoE forward."""

import gc

import pytest
import torch
from test_moe_sft import H, make_batch, make_layer, run_ours

import kt_jit
import kt_jit.moe.sft as core
from kt_jit.api import checkpointing


@pytest.fixture
def forwards(monkeypatch):
    """Counts the MoE forwards that run kernels (list of `save` flags)."""
    calls = []
    real = core.forward

    def spy(*a, **k):
        calls.append(k.get("save", a[6] if len(a) > 6 else None))
        return real(*a, **k)

    monkeypatch.setattr(core, "forward", spy)
    return calls


def _block(experts, lora, ids, gate, out_dtype=torch.float32):
    """A layer-like region: a norm-ish op before the MoE, and after it an op that saves the MoE's
    output (for the gradient of ``gate``) and a residual."""

    def fn(h, w):
        a = h * torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(h.dtype)
        y = kt_jit.moe_sft(a, ids, w, experts, lora, out_dtype=out_dtype)
        return h.float() + y * gate

    return fn


def _grads(xo, wo, gate, lora):
    return [xo.grad, wo.grad, gate.grad, *[p.grad for p in lora.tensors()]]


def _run(fn, x, w, gate, lora, dout, **ckpt):
    for t in (gate, *lora.parameters()):
        t.grad = None
    xo, wo = x.clone().requires_grad_(), w.clone().requires_grad_()
    out = torch.utils.checkpoint.checkpoint(fn, xo, wo, **ckpt) if ckpt else fn(xo, wo)
    out.backward(dout)
    return out.detach(), _grads(xo, wo, gate, lora)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_recompute_runs_no_moe_forward_and_gradients_are_unchanged(forwards, out_dtype):
    """Output and every gradient equal the uncheckpointed run's bit for bit; plain non-reentrant
    checkpointing runs the MoE twice, with the context once."""
    _, _, _, experts, lora = make_layer()
    x, ids, w = make_batch(13, 3)
    gate = torch.randn(H, generator=torch.Generator().manual_seed(2)).requires_grad_()
    dout = torch.randn(13, H, generator=torch.Generator().manual_seed(3))
    fn = _block(experts, lora, ids, gate, out_dtype)
    want = _run(fn, x, w, gate, lora, dout)
    forwards.clear()
    plain = _run(fn, x, w, gate, lora, dout, use_reentrant=False)
    assert forwards == [True, True]
    forwards.clear()
    kept = _run(fn, x, w, gate, lora, dout, use_reentrant=False, context_fn=kt_jit.moe_checkpoint_context)
    assert forwards == [True]
    for got in (plain, kept):
        assert torch.equal(got[0], want[0])
        for a, b in zip(got[1], want[1], strict=True):
            assert torch.equal(a, b)


def test_layers_recompute_in_reverse_order(forwards):
    """Two checkpointed layers sharing one experts object (and a stack of several such): each
    recompute finds its own forward."""
    _, _, _, experts, lora = make_layer()
    x, ids, w = make_batch(7, 2)
    gate = torch.ones(H, requires_grad=True)
    region = _block(experts, lora, ids, gate)
    dout = torch.randn(7, H, generator=torch.Generator().manual_seed(5))

    def stack(h, wt, **ckpt):
        for _ in range(3):
            h = (torch.utils.checkpoint.checkpoint(region, h, wt, **ckpt) if ckpt else region(h, wt)).bfloat16()
        return h.float()

    want = _run(stack, x, w, gate, lora, dout)
    forwards.clear()
    got = _run(lambda h, wt: stack(h, wt, use_reentrant=False, context_fn=kt_jit.moe_checkpoint_context),
               x, w, gate, lora, dout)
    assert len(forwards) == 3
    assert torch.equal(got[0], want[0])
    for a, b in zip(got[1], want[1], strict=True):
        assert torch.equal(a, b)


def test_a_recompute_with_other_inputs_runs_the_forward(forwards):
    """A recompute whose MoE input differs from the first forward's (here: dropout without the RNG
    state kept) runs the forward again rather than returning the wrong output; the gradients are
    those of the first forward's activations, without a checkpoint error."""
    _, _, _, experts, lora = make_layer()
    x, ids, w = make_batch(9, 2)

    g = torch.full((H,), 2.0, requires_grad=True)  # its gradient needs the MoE output recomputed

    def fn(h, wt):
        return kt_jit.moe_sft(torch.nn.functional.dropout(h, 0.5), ids, wt, experts, lora) * g

    torch.manual_seed(0)
    xo = x.clone().requires_grad_()
    out = torch.utils.checkpoint.checkpoint(fn, xo, w, use_reentrant=False, preserve_rng_state=False,
                                            context_fn=kt_jit.moe_checkpoint_context)
    out.sum().backward()
    assert forwards == [True, True]
    assert xo.grad is not None and torch.isfinite(xo.grad).all()


def test_in_place_changes_before_the_backward_raise():
    _, _, _, experts, lora = make_layer()
    x, ids, w = make_batch(5, 2)
    xo = x.clone().requires_grad_()
    h = xo * 1.0
    out = torch.utils.checkpoint.checkpoint(lambda a: kt_jit.moe_sft(a, ids, w, experts, lora), h,
                                            use_reentrant=False, context_fn=kt_jit.moe_checkpoint_context)
    with torch.no_grad():
        lora.gate_lora_b.add_(1.0)  # an optimizer step before the backward
    with pytest.raises(RuntimeError, match="modified in place"):
        out.sum().backward()


def test_kept_forwards_go_with_their_graph():
    """A first forward whose backward never runs (evaluation, an exception) keeps nothing once its
    graph is gone."""
    _, _, _, experts, lora = make_layer()
    x, ids, w = make_batch(6, 2)
    out = torch.utils.checkpoint.checkpoint(lambda a: kt_jit.moe_sft(a, ids, w, experts, lora),
                                            x.clone().requires_grad_(), use_reentrant=False,
                                            context_fn=kt_jit.moe_checkpoint_context)
    assert any(r() is not None for r in checkpointing._kept[id(experts)])
    del out
    gc.collect()
    assert all(r() is None for r in checkpointing._kept.get(id(experts), ()))


def test_outside_the_context_nothing_changes(forwards):
    """Without the context (and with the context's objects entered by hand and left) moe_sft
    saves through autograd as before; the phase is per thread and nests."""
    _, _, _, experts, lora = make_layer()
    x, ids, w = make_batch(4, 2)
    fwd, rec = kt_jit.moe_checkpoint_context()
    with fwd:
        assert checkpointing.phase() == "forward"
        with rec:
            assert checkpointing.phase() == "recompute"
        assert checkpointing.phase() == "forward"
    assert checkpointing.phase() is None
    plain = run_ours(x, ids, w, experts, lora, torch.ones(4, H))
    assert forwards == [True] and plain[1] is not None

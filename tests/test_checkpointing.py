"""kt_jit.moe_checkpoint_context: non-reentrant checkpointing without a second MoE forward."""

import threading
import weakref

import pytest
import torch
from test_moe_sft import H, make_batch, make_layer

import kt_jit
import kt_jit.moe.sft as core
from kt_jit.api import checkpointing

CTX = dict(use_reentrant=False, context_fn=kt_jit.moe_checkpoint_context)
PLAIN = dict(use_reentrant=False)


@pytest.fixture
def forwards(monkeypatch):
    """The saved blocks of the MoE forwards that ran kernels (weak references, in call order)."""
    blocks = []
    real = core.forward

    def spy(*a, **k):
        out, saved = real(*a, **k)
        blocks.append(weakref.ref(saved.block) if saved is not None else None)
        return out, saved

    monkeypatch.setattr(core, "forward", spy)
    return blocks


def _block(experts, lora, ids, gate, out_dtype=torch.float32):
    """A layer-like region: a norm-ish op before the MoE, and after it an op that saves the MoE's
    output (for the gradient of ``gate``, so a recompute must reach the MoE) and a residual."""

    def fn(h, w):
        a = h * torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(h.dtype)
        y = kt_jit.moe_sft(a, ids, w, experts, lora, out_dtype=out_dtype)
        return h.float() + y * gate

    return fn


def _run(fn, x, w, params, dout, ckpt=None):
    """(output, [grads of x, w, *params]) of ``fn(x, w)`` (checkpointed with ``ckpt`` kwargs)."""
    for t in params:
        t.grad = None
    xo, wo = x.clone().requires_grad_(), w.clone().requires_grad_()
    out = torch.utils.checkpoint.checkpoint(fn, xo, wo, **ckpt) if ckpt else fn(xo, wo)
    out.backward(dout)
    return out.detach(), [xo.grad, wo.grad, *[p.grad for p in params]]


def _assert_same(got, want):
    assert torch.equal(got[0], want[0])
    assert len(got[1]) == len(want[1])
    for a, b in zip(got[1], want[1], strict=True):
        assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_recompute_runs_no_moe_forward_and_gradients_are_unchanged(forwards, out_dtype):
    """Output and every gradient equal the uncheckpointed run's bit for bit; plain non-reentrant
    checkpointing runs the MoE twice, with the context once."""
    _, _, _, experts, lora = make_layer()
    x, ids, w = make_batch(13, 3)
    gate = torch.randn(H, generator=torch.Generator().manual_seed(2)).requires_grad_()
    dout = torch.randn(13, H, generator=torch.Generator().manual_seed(3))
    fn = _block(experts, lora, ids, gate, out_dtype)
    params = [gate, *lora.parameters()]
    want = _run(fn, x, w, params, dout)
    forwards.clear()
    _assert_same(_run(fn, x, w, params, dout, PLAIN), want)
    assert len(forwards) == 2
    forwards.clear()
    _assert_same(_run(fn, x, w, params, dout, CTX), want)
    assert len(forwards) == 1


def test_saved_activations_are_freed_by_the_backward(forwards):
    """As without checkpointing, the backward frees what the forward kept, while the graph's
    output (and so its nodes) stays referenced."""
    _, _, _, experts, lora = make_layer()
    x, ids, w = make_batch(7, 2)
    gate = torch.ones(H, requires_grad=True)
    out = torch.utils.checkpoint.checkpoint(_block(experts, lora, ids, gate), x.clone().requires_grad_(), w, **CTX)
    assert len(forwards) == 1 and forwards[0]() is not None  # kept through the checkpoint
    out.sum().backward()
    assert forwards[0]() is None and out.grad_fn is not None


def test_in_place_changes_after_the_moe_in_the_region():
    """An op that changes the MoE's output in place: the recompute does not reuse the (changed)
    output, runs the MoE again, and the gradients are those without checkpointing."""
    _, _, _, experts, lora = make_layer()
    x, ids, w = make_batch(6, 2)
    g = torch.full((H,), 2.0, requires_grad=True)

    def fn(h, wt):
        y = kt_jit.moe_sft(h, ids, wt, experts, lora)
        y.mul_(0.5)
        return y * g

    dout = torch.ones(6, H)
    params = [g, *lora.parameters()]
    _assert_same(_run(fn, x, w, params, dout, CTX), _run(fn, x, w, params, dout))


def test_two_adapters_on_one_experts_object_with_equal_inputs():
    """Each recompute call gets its own first-forward output (the adapters tell them apart)."""
    _, _, _, experts, lora_a = make_layer(seed=0)
    _, _, _, _, lora_b = make_layer(seed=7)
    x, ids, w = make_batch(6, 2)
    ga, gb = torch.ones(H, requires_grad=True), torch.ones(H, requires_grad=True)

    def fn(h, wt):
        return kt_jit.moe_sft(h, ids, wt, experts, lora_a) * ga + kt_jit.moe_sft(h, ids, wt, experts, lora_b) * gb

    dout = torch.randn(6, H, generator=torch.Generator().manual_seed(4))
    params = [ga, gb, *lora_a.parameters(), *lora_b.parameters()]
    _assert_same(_run(fn, x, w, params, dout, CTX), _run(fn, x, w, params, dout))


@pytest.mark.parametrize("outer,inner", [(CTX, PLAIN), (PLAIN, CTX), (CTX, CTX)])
def test_nested_checkpoints(outer, inner):
    """A checkpoint inside another, either or both with the context: no checkpoint error, the
    gradients of the uncheckpointed run."""
    _, _, _, experts, lora = make_layer()
    x, ids, w = make_batch(6, 2)
    g = torch.full((H,), 2.0, requires_grad=True)

    def inner_fn(h, wt):
        return kt_jit.moe_sft(h * 1.0, ids, wt, experts, lora) * g

    def nested(h, wt):
        return torch.utils.checkpoint.checkpoint(inner_fn, h, wt, **inner).sin()

    def flat(h, wt):
        return inner_fn(h, wt).sin()

    dout = torch.randn(6, H, generator=torch.Generator().manual_seed(6))
    params = [g, *lora.parameters()]
    _assert_same(_run(nested, x, w, params, dout, outer), _run(flat, x, w, params, dout))


def test_layers_recompute_in_reverse_order(forwards):
    """Three checkpointed layers sharing one experts object: each recompute finds its own forward."""
    _, _, _, experts, lora = make_layer()
    x, ids, w = make_batch(7, 2)
    gate = torch.ones(H, requires_grad=True)
    region = _block(experts, lora, ids, gate)
    dout = torch.randn(7, H, generator=torch.Generator().manual_seed(5))

    def stack(h, wt, ckpt=None):
        for _ in range(3):
            h = (torch.utils.checkpoint.checkpoint(region, h, wt, **ckpt) if ckpt else region(h, wt)).bfloat16()
        return h.float()

    params = [gate, *lora.parameters()]
    want = _run(stack, x, w, params, dout)
    forwards.clear()
    _assert_same(_run(lambda h, wt: stack(h, wt, CTX), x, w, params, dout), want)
    assert len(forwards) == 3


def test_a_recompute_with_other_inputs_runs_the_forward(forwards):
    """A recompute whose MoE input differs from the first forward's (dropout without the RNG
    state kept) runs the forward again rather than returning the first forward's output; the
    MoE's gradients come from the first forward's activations, without a checkpoint error."""
    _, _, _, experts, lora = make_layer()
    x, ids, w = make_batch(9, 2)
    g = torch.full((H,), 2.0, requires_grad=True)  # its gradient needs the MoE output recomputed
    ys = []

    def fn(h, wt):
        ys.append(kt_jit.moe_sft(torch.nn.functional.dropout(h, 0.5), ids, wt, experts, lora))
        return ys[-1] * g

    torch.manual_seed(0)
    xo = x.clone().requires_grad_()
    out = torch.utils.checkpoint.checkpoint(fn, xo, w, preserve_rng_state=False, **CTX)
    out.sum().backward()
    assert len(forwards) == 2
    assert not torch.equal(ys[0], ys[1])  # the recompute computed its own output
    assert torch.equal(g.grad, ys[1].detach().sum(0))  # what a recompute means for ops after it


@pytest.mark.parametrize("case", ["lora_none", "autograd_grad", "retain_graph", "other_thread"])
def test_call_patterns(case):
    """No adapters; torch.autograd.grad; a second backward through a retained graph; the backward
    on another thread: the gradients of the uncheckpointed run."""
    _, _, _, experts, lora = make_layer()
    lora = None if case == "lora_none" else lora
    x, ids, w = make_batch(8, 2)
    g = torch.full((H,), 0.5, requires_grad=True)

    def fn(h, wt):
        return kt_jit.moe_sft(h, ids, wt, experts, lora) * g

    def grads(ckpt):
        xo = x.clone().requires_grad_()
        out = torch.utils.checkpoint.checkpoint(fn, xo, w, **ckpt) if ckpt else fn(xo, w)
        loss = out.pow(2).sum()
        if case == "autograd_grad":
            return torch.autograd.grad(loss, (xo, g))
        if case == "retain_graph":
            first = torch.autograd.grad(loss, (xo, g), retain_graph=True)
            return (*first, *torch.autograd.grad(loss, (xo, g)))
        if case == "other_thread":
            result = []
            t = threading.Thread(target=lambda: result.append(torch.autograd.grad(loss, (xo, g))))
            t.start()
            t.join()
            return result[0]
        return torch.autograd.grad(loss, (xo, g))

    for a, b in zip(grads(CTX), grads(None), strict=True):
        assert torch.equal(a, b)


def test_in_place_changes_before_the_backward_raise():
    """What autograd checks for saved tensors, the context checks too (they are saved past the
    checkpoint's hooks): an adapter or the input changed before the backward raises."""
    _, _, _, experts, lora = make_layer()
    x, ids, w = make_batch(5, 2)
    for change in ("adapter", "input"):
        h = x.clone().requires_grad_() * 1.0
        out = torch.utils.checkpoint.checkpoint(lambda a: kt_jit.moe_sft(a, ids, w, experts, lora), h, **CTX)
        with torch.no_grad():
            (lora.gate_lora_b if change == "adapter" else h).add_(1.0)
        with pytest.raises(RuntimeError, match="modified in place"):
            out.sum().backward()


def test_phases_nest_per_thread_and_yield_to_other_hooks():
    """current() is the innermost entered phase, and None under saved-tensor hooks entered inside
    it (another checkpoint's or save_on_cpu's: those calls run as without the context)."""
    fwd, rec = kt_jit.moe_checkpoint_context()
    assert checkpointing.current() is None
    with fwd:
        assert checkpointing.current() is fwd
        with rec:
            assert checkpointing.current() is rec
            seen = []
            t = threading.Thread(target=lambda: seen.append(checkpointing.current()))
            t.start()
            t.join()
            assert seen == [None]
        assert checkpointing.current() is fwd
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            assert checkpointing.current() is None
    assert checkpointing.current() is None

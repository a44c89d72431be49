"""LoRA gradient buffers reused across backwards (kt_jit/moe/gradbuf.py): reused only when the
previous gradients were dropped untouched, and the gradients are always those of fresh buffers."""

import pytest
import torch
from test_moe_sft import make_batch, make_layer

import kt_jit
import kt_jit.moe.sft as core
from kt_jit.codegen.worker import flush_launches

# two batches on disjoint experts: the second backward must zero what the first one wrote
FIRST = torch.tensor([[0, 1], [2, 3], [1, 2]])
SECOND = torch.tensor([[4, 5], [6, 7], [5, 6]])


def backward_grads(experts, lora, ids, seed):
    x, _, w = make_batch(ids.shape[0], ids.shape[1], seed=seed, ids=ids)
    out = kt_jit.moe_sft(x.requires_grad_(), ids, w, experts, lora)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)))
    return [p.grad for p in lora.tensors()]


def fresh_grads(experts, lora, ids, seed, monkeypatch):
    with monkeypatch.context() as m:
        m.setenv("KT_JIT_REUSE_LORA_GRADS", "0")
        for p in lora.tensors():
            p.grad = None
        grads = [g.clone() for g in backward_grads(experts, lora, ids, seed)]
        for p in lora.tensors():
            p.grad = None
    return grads


def assert_same(grads, expected):
    for g, e in zip(grads, expected, strict=True):
        assert torch.equal(g, e)
    for g in grads:  # experts 0-3 had no tokens in the second batch
        assert g[:4].abs().sum() == 0


@pytest.fixture(params=["in xty launches", "separate launch"])
def zeroing(request, monkeypatch):
    """Both ways stale experts get zeroed: zero-row groups of the xty launches (few experts) or one
    zero_slices launch (many)."""
    monkeypatch.setattr(core, "FOLD_ZEROS_MAX", 16 if request.param == "in xty launches" else -1)
    calls = []
    real = core.fill.zero_slices
    monkeypatch.setattr(core.fill, "zero_slices", lambda *a: calls.append(1) or real(*a))
    yield request.param
    assert bool(calls) == (request.param == "separate launch"), "stale experts were zeroed the other way"


def test_dropped_gradients_are_reused_and_stale_experts_zeroed(monkeypatch, zeroing):
    *_, experts, lora = make_layer(r=16)  # a kernel rank: autograd adopts the buffers
    expected = fresh_grads(experts, lora, SECOND, 2, monkeypatch)
    backward_grads(experts, lora, FIRST, 1)
    bufs = lora.grad_buffers._bufs
    for p, b in zip(lora.tensors(), bufs, strict=True):
        assert p.grad.data_ptr() == b.data_ptr()  # autograd adopted the returned buffer
        p.grad = None  # optimizer.zero_grad()
    grads = backward_grads(experts, lora, SECOND, 2)
    assert lora.grad_buffers._bufs is bufs, "the dropped buffers were not reused"
    assert_same(grads, expected)


def test_a_run_of_reusing_backwards_matches_fresh_ones(monkeypatch, zeroing):
    """Five backwards on the same reused buffers, the active experts changing each time (disjoint,
    overlapping, back again): the bookkeeping of which experts may hold values swaps its two arrays
    once per backward, and every backward's gradients equal those of fresh buffers."""
    *_, experts, lora = make_layer(r=16)  # a kernel rank: autograd adopts the buffers
    mixed = torch.tensor([[1, 4], [0, 7], [3, 4]])
    steps = [(FIRST, 1), (SECOND, 2), (FIRST, 3), (mixed, 4), (SECOND, 5)]
    expected = [fresh_grads(experts, lora, ids, seed, monkeypatch) for ids, seed in steps]
    bufs = None
    for (ids, seed), want in zip(steps, expected, strict=True):
        grads = backward_grads(experts, lora, ids, seed)
        if bufs is None:
            bufs = lora.grad_buffers._bufs
        assert lora.grad_buffers._bufs is bufs, "the dropped buffers were not reused"
        assert all(torch.equal(g, e) for g, e in zip(grads, want, strict=True))
        del grads  # (held, the buffers would not be reused)
        for p in lora.tensors():
            p.grad = None  # optimizer.zero_grad()


def test_gradients_still_held_are_not_overwritten(monkeypatch):
    *_, experts, lora = make_layer(r=16)  # a kernel rank: autograd adopts the buffers
    expected = fresh_grads(experts, lora, SECOND, 2, monkeypatch)
    held = backward_grads(experts, lora, FIRST, 1)
    copies = [g.clone() for g in held]
    bufs = lora.grad_buffers._bufs
    for p in lora.tensors():
        p.grad = None  # the caller still holds them through `held`
    grads = backward_grads(experts, lora, SECOND, 2)
    assert lora.grad_buffers._bufs is not bufs
    assert_same(grads, expected)
    for g, c in zip(held, copies, strict=True):
        assert torch.equal(g, c)


def test_gradients_changed_in_place_are_not_reused(monkeypatch):
    *_, experts, lora = make_layer(r=16)  # a kernel rank: autograd adopts the buffers
    expected = fresh_grads(experts, lora, SECOND, 2, monkeypatch)
    backward_grads(experts, lora, FIRST, 1)
    bufs = lora.grad_buffers._bufs
    for p in lora.tensors():
        p.grad.add_(1.0)  # non-zero everywhere, idle experts included
        p.grad = None
    grads = backward_grads(experts, lora, SECOND, 2)
    assert lora.grad_buffers._bufs is not bufs
    assert_same(grads, expected)


def test_accumulated_gradients_match_two_fresh_backwards(monkeypatch):
    """Without zero_grad autograd adds the second gradient into the first (held) one."""
    *_, experts, lora = make_layer(r=16)  # a kernel rank: autograd adopts the buffers
    first = fresh_grads(experts, lora, FIRST, 1, monkeypatch)
    second = fresh_grads(experts, lora, SECOND, 2, monkeypatch)
    backward_grads(experts, lora, FIRST, 1)
    grads = backward_grads(experts, lora, SECOND, 2)
    for g, a, b in zip(grads, first, second, strict=True):
        assert torch.equal(g, a + b)


def test_op_gradients_reused_after_the_caller_drops_them(monkeypatch):
    *_, experts, lora = make_layer(r=16)  # a kernel rank: autograd adopts the buffers
    op = kt_jit.MoESFTOp(experts, lora)

    def step(ids, seed):
        x, _, w = make_batch(ids.shape[0], ids.shape[1], seed=seed, ids=ids)
        op.forward(x, ids, w)
        return op.backward(torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)))

    with monkeypatch.context() as m:
        m.setenv("KT_JIT_REUSE_LORA_GRADS", "0")
        expected = {k: v.clone() for k, v in step(SECOND, 2).items()}
    step(FIRST, 1)
    bufs = lora.grad_buffers._bufs
    got = step(SECOND, 2)
    assert lora.grad_buffers._bufs is bufs
    for k, v in expected.items():
        assert torch.equal(got[k], v), k


def test_padded_rank_gradients_reuse_their_buffers(monkeypatch):
    """Rank 8 runs at kernel rank 16: autograd copies the returned (sliced) gradients, so the
    buffers are free again right after the backward."""
    *_, experts, lora = make_layer(r=8)
    expected = fresh_grads(experts, lora, SECOND, 2, monkeypatch)
    backward_grads(experts, lora, FIRST, 1)
    bufs = lora.grad_buffers._bufs
    for p in lora.tensors():
        p.grad = None
    grads = backward_grads(experts, lora, SECOND, 2)
    assert lora.grad_buffers._bufs is bufs
    assert_same(grads, expected)


def test_knob_off_in_between_leaves_the_kept_buffers_consistent(monkeypatch):
    """KT_JIT_REUSE_LORA_GRADS=0 for a backward between two reusing ones: that backward neither
    takes nor forgets the kept buffers, so the next reuse still zeroes the experts written before."""
    *_, experts, lora = make_layer(r=16)  # a kernel rank: autograd adopts the buffers
    expected = fresh_grads(experts, lora, SECOND, 2, monkeypatch)
    backward_grads(experts, lora, FIRST, 1)  # the kept buffers: experts 0-3 written
    bufs = lora.grad_buffers._bufs
    for p in lora.tensors():
        p.grad = None
    fresh_grads(experts, lora, FIRST, 3, monkeypatch)  # knob off: fresh buffers, dropped again
    assert lora.grad_buffers._bufs is bufs
    grads = backward_grads(experts, lora, SECOND, 2)
    assert lora.grad_buffers._bufs is bufs, "the dropped buffers were not reused"
    assert_same(grads, expected)


def test_interrupted_zeroing_is_redone(monkeypatch, zeroing):
    """A backward that fails while zeroing stale experts leaves them marked as written: the next
    reusing backward zeroes them."""
    *_, experts, lora = make_layer(r=16)
    expected = fresh_grads(experts, lora, torch.tensor([[0, 1], [1, 0], [0, 1]]), 3, monkeypatch)
    backward_grads(experts, lora, FIRST, 1)  # writes experts 0-3
    for p in lora.tensors():
        p.grad = None

    failed = []

    def fail(*args):
        failed.append(1)
        raise RuntimeError("interrupted")

    with monkeypatch.context() as m:
        m.setenv("KT_JIT_LAUNCH_PLANS", "0")  # (the failure is injected into the launches' Python)
        if zeroing == "separate launch":
            m.setattr(core.fill, "zero_slices", fail)
        else:  # fails at the last xty launch, after the first ones zeroed their gradients' experts
            real, xty_calls = core._lora, []

            def fail_fourth_xty(form, *a, **kw):
                xty_calls.append(form == "xty")
                if sum(xty_calls) == 4:
                    flush_launches()  # the first three xty launches (and their zeroing) run
                    fail()
                return real(form, *a, **kw)

            m.setattr(core, "_lora", fail_fourth_xty)
        try:
            backward_grads(experts, lora, SECOND, 2)
        except RuntimeError:
            pass
    assert failed, "the failure was not injected"
    for p in lora.tensors():
        p.grad = None
    grads = backward_grads(experts, lora, torch.tensor([[0, 1], [1, 0], [0, 1]]), 3)
    for g, e in zip(grads, expected, strict=True):
        assert torch.equal(g, e)
        assert g[2:].abs().sum() == 0


def test_no_reuse_under_torch_distributed(tmp_path):
    """Collectives write gradients in place without a version bump: no reuse while initialised."""
    import torch.distributed as dist  # (the pinned CPU build of torch has it)

    *_, experts, lora = make_layer(r=16)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        backward_grads(experts, lora, FIRST, 1)
        bufs = lora.grad_buffers._bufs
        for p in lora.tensors():
            p.grad = None
        backward_grads(experts, lora, SECOND, 2)
        assert lora.grad_buffers._bufs is bufs and not bufs  # never kept, never handed out
    finally:
        dist.destroy_process_group()


def test_idle_experts_kernel_against_numpy():
    """The compiled bookkeeping of the experts to zero: to_zero = (written, or all for fresh buffers)
    minus the active experts, written becomes active | to_zero, after the active experts, and up to
    fold_max of them are appended to the basis as zero-row groups (1, 0, expert, 0)."""
    import numpy as np

    from kt_jit.kernels.idle import idle_experts

    rng = np.random.default_rng(0)
    for _ in range(200):
        e = int(rng.integers(1, 40))
        experts = np.sort(rng.choice(e, int(rng.integers(0, e + 1)), replace=False))
        basis = np.zeros((experts.size, 4), np.int64)
        basis[:, 0], basis[:, 1], basis[:, 2], basis[:, 3] = 1, rng.integers(0, 99, experts.size), experts, 3
        written, reuse, fold_max = rng.random(e) < 0.4, bool(rng.integers(0, 2)), int(rng.integers(-1, 20))
        active = np.zeros(e, bool)
        active[experts] = True
        want = (written if reuse else np.ones(e, bool)) & ~active
        to_zero, folded = np.empty(e, bool), np.full((experts.size + max(fold_max, 0), 4), -7, np.int64)
        after = rng.random(e) < 0.5  # (every entry is written)
        n = idle_experts(basis, written, reuse, fold_max, to_zero, folded, after)
        assert n == want.sum() and np.array_equal(to_zero, want) and np.array_equal(written, active | want)
        assert np.array_equal(after, active)
        if n <= fold_max:
            rows = np.zeros((n, 4), np.int64)
            rows[:, 0], rows[:, 2] = 1, np.flatnonzero(want)
            assert np.array_equal(folded[:experts.size + n], np.concatenate([basis, rows]))

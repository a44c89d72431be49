"""Launch plans (kt_jit/codegen/plan.py): a captured pass replayed for new operands and routings gives
exactly what running the pass's Python gives; what cannot be replayed is refused with a reason."""

import numpy as np
import pytest
import torch
from conftest import NEEDS_AVX512_BF16
from reference import linear as ref_linear
from reference import rel_err
from test_moe_sft import make_batch, make_layer

import kt_jit
import kt_jit.moe.sft as core
from kt_jit.codegen.plan import Capture, Plan, Span, group_rows
from kt_jit.codegen.worker import LaunchBatch, flush_launches
from kt_jit.kernels.lora import LoraSpec, get_kernel
from kt_jit.moe.weights import MoELoRA

pytestmark = NEEDS_AVX512_BF16

N, K = 32, 64  # xat: Y [m, N] = alpha X [m, K] W_e^T


@pytest.fixture(autouse=True)
def _record_at_first_call(monkeypatch):
    """These tests replay what a configuration's first call recorded (the library waits for its
    second call: test_configurations_are_captured_at_their_second_call)."""
    monkeypatch.setattr(core, "RECORD_AT_CALL", 1)
    core._plans.clear()
    core._calls.clear()


def _xat_pass(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, basis: np.ndarray) -> None:
    """One grouped launch: per basis row (1, first row, expert, count), that expert's rows of x
    through its W into the same rows of y."""
    cols = [(x.data_ptr(), K * 2, 0, 0), (w.data_ptr(), 0, N * K * 2, 0), (y.data_ptr(), N * 4, 0, 0), (0, 0, 0, 1)]
    get_kernel(LoraSpec("xat", N, K)).launch(group_rows(basis, [cols]), K * 2, 0, N * 4, 0.5)


def _operands(rows: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, K, generator=g).bfloat16()
    w = torch.randn(3, N, K, generator=g).bfloat16()
    return x, w, torch.full((rows, N), float("nan"))


def _spans(*tensors):
    return [Span(t.data_ptr(), t.numel() * t.element_size()) for t in tensors]


def test_replay_matches_the_pass_for_new_operands_and_basis():
    x, w, y = _operands(8, 0)
    basis = np.array([[1, 0, 2, 3], [1, 3, 0, 5]], dtype=np.int64)
    cap = Capture()
    with LaunchBatch(cap):
        _xat_pass(x, w, y, basis)
    plan = cap.compile(_spans(x, w, y), [basis])
    assert isinstance(plan, Plan), plan
    x2, w2, y2 = _operands(8, 1)
    basis2 = np.array([[1, 0, 1, 6], [1, 6, 2, 2]], dtype=np.int64)  # other experts, other split
    plan.run([t.data_ptr() for t in (x2, w2, y2)], [basis2])
    for _, first, e, count in basis2:
        rows = slice(first, first + count)
        assert rel_err(y2[rows], 0.5 * ref_linear(x2[rows], w2[e])) < 1e-5


def test_unplannable_passes_say_why():
    x, w, y = _operands(8, 0)
    basis = np.array([[1, 0, 2, 8]], dtype=np.int64)

    def capture(pass_fn, operands):
        cap = Capture()
        with LaunchBatch(cap):
            pass_fn()
        return cap.compile(operands, [basis])

    assert "in no operand" in capture(lambda: _xat_pass(x, w, y, basis), _spans(x, w))  # y not registered
    assert "overlap" in capture(lambda: _xat_pass(x, w, y, basis), _spans(x, w, y, y))

    def flushing():
        _xat_pass(x, w, y, basis)
        flush_launches()
        _xat_pass(x, w, y, basis)

    assert "midway" in capture(flushing, _spans(x, w, y))

    def edited_table():
        cols = [(x.data_ptr(), K * 2, 0, 0), (w.data_ptr(), 0, N * K * 2, 0), (y.data_ptr(), N * 4, 0, 0),
                (0, 0, 0, 1)]
        table = group_rows(basis, [cols])
        table[:, 3] = 4  # (changed after it was built: the plan would rebuild the original)
        get_kernel(LoraSpec("xat", N, K)).launch(table, K * 2, 0, N * 4, 0.5)

    assert "changed" in capture(edited_table, _spans(x, w, y))


def _permuted(ids: torch.Tensor, e: int, seed: int) -> torch.Tensor:
    """The same routing shape (tokens per expert) over other experts."""
    return torch.randperm(e, generator=torch.Generator().manual_seed(seed))[ids]


def _run(layer, batch, dout, x_grad=True, fresh_buffers=True):
    _, _, _, experts, lora = layer
    x, ids, w = batch
    xo = x.clone().requires_grad_(x_grad)
    wo = w.clone().requires_grad_()
    if lora is not None:
        for p in lora.parameters():
            p.grad = None
        if fresh_buffers:  # (so the idle experts to zero, part of the configuration, are the same each call)
            lora.grad_buffers.__init__()
    out = kt_jit.moe_sft(xo, ids, wo, experts, lora)
    out.backward(dout)
    with torch.no_grad():
        infer = kt_jit.moe_sft(x, ids, w, experts, lora)
    grads = [p.grad for p in lora.tensors()] if lora is not None else []
    return [out.detach(), xo.grad, wo.grad, infer, *grads]


@pytest.mark.parametrize("quant", ["bf16", "int8", "int4_kgroup"])
@pytest.mark.parametrize("t", [1, 5])
@pytest.mark.parametrize("with_lora", [True, False])
def test_moe_replays_equal_direct_runs(quant, t, with_lora, monkeypatch):
    """Training forward, backward and no-grad forward: a call replayed from the plan its
    configuration recorded equals, bit for bit, the same call with plans off."""
    layer = make_layer(quant=quant)
    if not with_lora:
        layer = (*layer[:4], None)
    e, h = 8, layer[3].hidden_size
    x, ids, w = make_batch(t, 3)
    dout = torch.randn(t, h, generator=torch.Generator().manual_seed(3))
    core._plans.clear()
    _run(layer, (x, ids, w), dout)  # records
    replays = []
    real = Plan.run
    monkeypatch.setattr(Plan, "run", lambda self, *a: (replays.append(1), real(self, *a)))
    batch2 = (make_batch(t, 3, seed=5)[0], _permuted(ids, e, 6), make_batch(t, 3, seed=7)[2])
    got = _run(layer, batch2, dout)
    assert len(replays) == 3  # forward, backward, no-grad forward
    monkeypatch.setenv("KT_JIT_LAUNCH_PLANS", "0")
    want = _run(layer, batch2, dout)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("quant", ["bf16", "int4_kgroup"])
def test_replay_with_other_rows_per_expert(quant, monkeypatch):
    """Same token count and active experts, other rows per expert (one expert's rows now cross a
    16-row tile): the replay equals a plans-off run."""
    layer = make_layer(quant=quant)
    x, _, w = make_batch(20, 2)
    even = torch.tensor([[t % 8, (t + 1) % 8] for t in range(20)])  # 5 rows per expert
    skewed = torch.tensor([[0, 1 + t % 7] for t in range(17)] + [[1, 2], [3, 4], [5, 6]])  # 17 on expert 0
    dout = torch.randn(20, layer[3].hidden_size, generator=torch.Generator().manual_seed(3))
    core._plans.clear()
    _run(layer, (x, even, w), dout)  # records
    replays = []
    real = Plan.run
    monkeypatch.setattr(Plan, "run", lambda self, *a: (replays.append(1), real(self, *a)))
    got = _run(layer, (x, skewed, w), dout)
    assert len(replays) == 3
    monkeypatch.setenv("KT_JIT_LAUNCH_PLANS", "0")
    want = _run(layer, (x, skewed, w), dout)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


def test_amx_backward_replays_equal_direct_runs(monkeypatch):
    """The AMX kernel path (through the tile emulator here): the backward packs dY into tiles inside
    its launches, so it is planned too, and its replays equal plans-off runs."""
    monkeypatch.setenv("KT_JIT_ISA", "amx_emu")
    monkeypatch.setattr(core, "AMX_BF16_MIN_ROWS", 0)  # (1.25 rows per expert: AVX-512 otherwise)
    layer = make_layer(h=64, i=64)
    x, ids, w = make_batch(5, 2, h=64)
    dout = torch.randn(5, 64, generator=torch.Generator().manual_seed(3))
    core._plans.clear()
    _run(layer, (x, ids, w), dout)  # records
    assert all(isinstance(p, Plan) for p in core._plans.values()) and len(core._plans) == 3
    batch2 = (make_batch(5, 2, h=64, seed=5)[0], _permuted(ids, 8, 6), w)
    got = _run(layer, batch2, dout)
    monkeypatch.setenv("KT_JIT_LAUNCH_PLANS", "0")
    want = _run(layer, batch2, dout)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("fold", [True, False])
def test_moe_replays_with_idle_experts_to_zero_and_no_input_grad(fold, monkeypatch):
    """Reused gradient buffers: idle experts written by the previous step are zeroed inside the
    replayed gradient launches (zero-row groups) or before them; an input needing no gradient."""
    monkeypatch.setattr(core, "FOLD_ZEROS_MAX", 16 if fold else -1)
    layer = make_layer(e=16)
    lora = layer[4]
    assert isinstance(lora, MoELoRA)
    dout = torch.randn(2, layer[3].hidden_size, generator=torch.Generator().manual_seed(3))
    core._plans.clear()
    x, ids, w = make_batch(2, 2, e=16)
    # the same routing shape over other experts, so later steps replay what earlier ones recorded
    batches = [(x, _permuted(ids, 16, s), w) for s in range(6)]
    replays = []
    real = Plan.run
    monkeypatch.setattr(Plan, "run", lambda self, *a: (replays.append(1), real(self, *a)))
    runs = []
    for plans in ("1", "0"):
        monkeypatch.setenv("KT_JIT_LAUNCH_PLANS", plans)
        lora.grad_buffers.__init__()  # the same buffer history for both runs
        runs.append([_run(layer, b, dout, x_grad=False, fresh_buffers=False) for b in batches])
    assert replays
    for got, want in zip(*runs, strict=True):
        assert got[1] is None and want[1] is None
        for a, b in zip(got, want, strict=True):
            assert (a is None and b is None) or torch.equal(a, b)


def test_configurations_are_captured_at_their_second_call(monkeypatch):
    """A configuration seen once costs no capture; its second call records the plan, its third
    replays it."""
    monkeypatch.setattr(core, "RECORD_AT_CALL", 2)
    _, _, _, experts, lora = make_layer()
    captures, replays = [], []
    real_compile, real_run = core.Capture.compile, Plan.run
    monkeypatch.setattr(core.Capture, "compile", lambda self, *a: (captures.append(1), real_compile(self, *a))[1])
    monkeypatch.setattr(Plan, "run", lambda self, *a: (replays.append(1), real_run(self, *a)))
    x, ids, w = make_batch(3, 2)
    with torch.no_grad():
        outs = [kt_jit.moe_sft(x, ids, w, experts, lora) for _ in range(3)]
    assert (len(captures), len(replays)) == (1, 1)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_replays_from_two_threads_at_once(monkeypatch):
    """Two Python threads replaying the same plans at once (each with its own work area and scratch
    arena) give what each call gives alone with plans off."""
    import threading

    experts = make_layer()[3]
    x, ids, w = make_batch(4, 2)
    batches = [(make_batch(4, 2, seed=10 + i)[0], _permuted(ids, 8, i), w) for i in range(8)]
    with torch.no_grad():
        monkeypatch.setenv("KT_JIT_LAUNCH_PLANS", "0")
        want = [kt_jit.moe_sft(*b, experts) for b in batches]
        monkeypatch.setenv("KT_JIT_LAUNCH_PLANS", "1")
        replays = []
        real = Plan.run
        monkeypatch.setattr(Plan, "run", lambda self, *a: (replays.append(1), real(self, *a)))
        got: dict[int, list] = {}

        def worker(t: int) -> None:
            got[t] = [kt_jit.moe_sft(*batches[(i + t) % 8], experts) for i in range(24)]

        threads = [threading.Thread(target=worker, args=(t,)) for t in (0, 1)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    for t in (0, 1):
        for i, out in enumerate(got[t]):
            assert torch.equal(out, want[(i + t) % 8])
    assert len(replays) >= 40  # (all but the calls that found no plan yet)

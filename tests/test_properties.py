"""Property tests (hypothesis, derandomized): random routings, quantization modes, adapters and
dtypes through the public operator agree with the float32 reference, and random sequences of
MoESFTOp calls, malformed ones among them, keep its forward stack and its gradients right."""

import pytest
import torch
from conftest import NEEDS_AVX512_BF16
from reference import rel_err
from test_moe_sft import QUANTS, check_against_reference, make_layer, reference_grads

import kt_jit

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule  # noqa: E402

pytestmark = NEEDS_AVX512_BF16

E, H, I, R = 8, 64, 96, 4
SETTINGS = dict(deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
_layers: dict[tuple[str, bool], tuple] = {}


def _layer(quant: str, lora: bool = True) -> tuple:
    """(gate, up, down, experts, lora) of one small layer per mode, made once (its kernels compile once)."""
    if (quant, lora) not in _layers:
        torch.manual_seed(5)  # (MoELoRA draws A from the global generator: the same layer in any test order)
        gate, up, down, experts, adapter = make_layer(e=E, h=H, i=I, r=R, seed=5, quant=quant)
        _layers[quant, lora] = (gate, up, down, experts, adapter if lora else None)
    return _layers[quant, lora]


@st.composite
def routings(draw, max_tokens: int = 70) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden_states [T, H] bf16/fp16/fp32, topk_ids [T, K], topk_weights [T, K] fp32/bf16): tokens
    spread over the first ``hot`` experts of a permutation (so experts get anywhere from no rows to
    all of them, across the kernels' tile and lane-group sizes), ids repeated within a token or
    not, weights normalised or not."""
    t = draw(st.integers(0, max_tokens))
    k = draw(st.integers(1, 4))
    hot = draw(st.integers(1, E))
    repeats = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    x_dtype = draw(st.sampled_from([torch.bfloat16, torch.float16, torch.float32]))
    x = torch.randn(t, H, generator=g).to(x_dtype)
    experts = torch.randperm(E, generator=g)[:max(hot, 1 if repeats else k)]
    if repeats:
        ids = experts[torch.randint(0, len(experts), (t, k), generator=g)]
    else:
        ids = torch.stack([experts[torch.randperm(len(experts), generator=g)[:k]] for _ in range(t)]) if t else \
            torch.zeros(0, k, dtype=torch.int64)
    w = torch.rand(t, k, generator=g) + 0.05
    if draw(st.booleans()):
        w = w / w.sum(1, keepdim=True)
    return x, ids.contiguous(), w.to(draw(st.sampled_from([torch.float32, torch.bfloat16])))


@settings(max_examples=36, **SETTINGS)
@hypothesis.given(quant=st.sampled_from(QUANTS), lora=st.booleans(), batch=routings(),
                  out_dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_random_routings_match_the_reference(quant, lora, batch, out_dtype):
    """Output, input gradient (in the input's dtype), router gradient and the six LoRA gradients of
    moe_sft against the float32 reference for a random routing, in every quantization mode, with
    and without an adapter; no tokens gives empty results and zero adapter gradients."""
    gate, up, down, experts, adapter = _layer(quant, lora)
    x, ids, w = batch
    t = x.shape[0]
    dout = torch.randn(t, H, generator=torch.Generator().manual_seed(t))
    if adapter is not None and t > 0 and out_dtype == torch.float32 and x.dtype == torch.bfloat16:
        check_against_reference((gate, up, down, experts, adapter), (x, ids, w.float()), dout)
        return
    xo, wo = x.clone().requires_grad_(), w.clone().requires_grad_()
    if adapter is not None:
        for p in adapter.parameters():
            p.grad = None
    out = kt_jit.moe_sft(xo, ids, wo, experts, adapter, out_dtype=out_dtype)
    out.backward(dout.to(out_dtype))
    assert out.shape == (t, H) and out.dtype == out_dtype
    assert xo.grad.shape == x.shape and xo.grad.dtype == x.dtype and wo.grad.dtype == w.dtype
    lora_tensors = adapter.tensors() if adapter is not None else None
    if t == 0:
        assert all(p.grad is None or not p.grad.any() for p in lora_tensors or ())
        return
    # the reference sees the bf16 values the kernels read (x and the router weights rounded)
    ref = reference_grads(x.bfloat16(), ids, w.float(), gate, up, down, adapter, dout.to(out_dtype).float())
    assert rel_err(out.float(), ref[0]) < (0.01 if out_dtype == torch.bfloat16 else 0.005)
    assert rel_err(xo.grad.float(), ref[1]) < 0.01
    assert rel_err(wo.grad.float(), ref[2]) < (0.02 if w.dtype == torch.bfloat16 else 0.01)
    assert len(ref[3]) == (6 if adapter is not None else 0)
    for a, b in zip([p.grad for p in lora_tensors or ()], ref[3], strict=True):
        assert (rel_err(a.float(), b) < 0.01) if b.any() else not a.any()


def _malformed(kind: str, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, seed: int):
    """(hidden_states, topk_ids, topk_weights) broken in one way ``kind``; None where no tokens
    leave nothing to break that way."""
    g = torch.Generator().manual_seed(seed)
    t, k = ids.shape
    if t == 0 and kind in ("id out of range", "not contiguous"):
        return None
    if kind == "id out of range":
        ids = ids.clone()
        bad = torch.randint(E, 2**40, (1,), generator=g) * (1 if seed % 2 else -1)
        ids.view(-1)[torch.randint(0, ids.numel(), (1,), generator=g)] = bad
    elif kind == "ids int32":
        ids = ids.int()
    elif kind == "weights shape":
        w = w[:, :-1] if k > 1 else torch.cat([w, w], 1)
    elif kind == "hidden size":
        x = torch.zeros(t, H + 32, dtype=x.dtype)
    elif kind == "not contiguous":
        x = torch.cat([x, x], 1)[:, ::2]
    elif kind == "integer hidden states":
        x = x.to(torch.int32)
    elif kind == "one-dimensional ids":
        ids = ids.view(-1)
    return x, ids, w


MALFORMED = ["id out of range", "ids int32", "weights shape", "hidden size", "not contiguous",
             "integer hidden states", "one-dimensional ids"]


class OpCalls(RuleBasedStateMachine):
    """Random sequences of MoESFTOp calls (a depth-3 forward stack): forwards saved or not,
    backwards with the right or a malformed grad_output, malformed forwards. A malformed call
    raises ValueError and changes nothing; the stack's depth follows a model of it (full and
    empty stacks raise RuntimeError); every backward's gradients are the reference's for the
    forward it pops (last in, first out)."""

    def __init__(self) -> None:
        super().__init__()
        gate, up, down, experts, lora = _layer("int4")
        self.layer = (gate, up, down)
        self.op = kt_jit.MoESFTOp(experts, lora, max_cache_depth=3)
        self.saved: list[tuple] = []  # (x, ids, w) of the forwards on the stack, oldest first

    @rule(batch=routings(max_tokens=24), save=st.booleans())
    def forward(self, batch, save):
        x, ids, w = batch
        if save and len(self.saved) == 3:
            with pytest.raises(RuntimeError, match="Forward cache full"):
                self.op.forward(x, ids, w)
            return
        out = self.op.forward(x, ids, w, save_for_backward=save)
        assert out.shape == (x.shape[0], H)
        if save:
            self.saved.append((x, ids, w))

    @rule(batch=routings(max_tokens=24), kind=st.sampled_from(MALFORMED), seed=st.integers(0, 1000))
    def malformed_forward(self, batch, kind, seed):
        broken = _malformed(kind, *batch, seed)
        if broken is None:
            return
        with pytest.raises(ValueError):
            self.op.forward(*broken)

    @rule(seed=st.integers(0, 1000), wrong=st.sampled_from(["none", "rows", "columns", "integer", "not a tensor"]))
    def backward(self, seed, wrong):
        if not self.saved:
            with pytest.raises(RuntimeError, match="No forward cache"):
                self.op.backward(torch.zeros(1, H))
            return
        x, ids, w = self.saved[-1]
        dout = torch.randn(x.shape[0], H, generator=torch.Generator().manual_seed(seed))
        bad = {"rows": torch.zeros(x.shape[0] + 1, H), "columns": torch.zeros(x.shape[0], H + 1),
               "integer": dout.long(), "not a tensor": dout.tolist()}.get(wrong)
        if bad is not None:
            with pytest.raises(ValueError, match="grad_output"):
                self.op.backward(bad)
            return
        grads = self.op.backward(dout)
        self.saved.pop()
        if x.shape[0] == 0:
            assert grads["grad_input"].shape == (0, H)
            return
        ref = reference_grads(x.bfloat16(), ids, w.float(), *self.layer, self.op.lora, dout)
        assert rel_err(grads["grad_input"].float(), ref[1]) < 0.01
        assert rel_err(grads["grad_weights"].float(), ref[2]) < 0.02
        for name, b in zip(("gate_lora_a", "gate_lora_b", "up_lora_a", "up_lora_b", "down_lora_a",
                            "down_lora_b"), ref[3], strict=True):
            assert (rel_err(grads[name].float(), b) < 0.01) if b.any() else not grads[name].any(), name

    @precondition(lambda self: len(self.saved) > 0)
    @rule()
    def input_changed_in_place(self):
        """hidden_states changed in place after its forward: a bf16 one (which the forward saved as
        it is) makes the backward refuse, and the forward is consumed; one of another dtype was
        saved as a bf16 copy, so the backward runs on the values the forward saw."""
        x, ids, w = self.saved.pop()
        kept = x.clone()
        x.add_(1.0)
        dout = torch.ones(x.shape[0], H)
        if x.dtype == torch.bfloat16:
            with pytest.raises(RuntimeError, match="modified in place"):
                self.op.backward(dout)
            return
        grads = self.op.backward(dout)
        if x.shape[0]:
            ref = reference_grads(kept.bfloat16(), ids, w.float(), *self.layer, self.op.lora, dout)
            assert rel_err(grads["grad_input"].float(), ref[1]) < 0.01

    @invariant()
    def stack_depth(self):
        assert self.op.cache_depth == len(self.saved)


TestOpCalls = OpCalls.TestCase
TestOpCalls.settings = settings(max_examples=12, stateful_step_count=12, **SETTINGS)

"""KTMoEWrapper (kt-kernel's wrapper interface) against the float32 reference, and its error rules."""

import pytest
import torch
from conftest import NEEDS_AVX512_BF16
from reference import moe as ref_moe
from reference import rel_err
from test_moe_sft import make_batch, make_layer, reference_grads

import kt_jit
from kt_jit.moe.weights import LORA_NAMES, lora_shapes

pytestmark = NEEDS_AVX512_BF16

E, H, I, R, K = 8, 64, 96, 4, 3


def _wrapper(mode="sft", method="AMXBF16_SFT", **kw):
    args = dict(layer_idx=0, num_experts=E, num_experts_per_tok=K, hidden_size=H, moe_intermediate_size=I,
                num_gpu_experts=0, cpuinfer_threads=2, threadpool_count=1, weight_path=None,
                chunked_prefill_size=64, method=method, mode=mode, lora_rank=R, lora_alpha=2.0 * R, group_size=32)
    return kt_jit.KTMoEWrapper(**(args | kw))


def _lora_tensors(seed=3, dtype=torch.bfloat16):
    """The six adapters (seeded; nonzero B) as plain tensors, the way kt-kernel's callers hold them."""
    g = torch.Generator().manual_seed(seed)
    shapes = lora_shapes(E, H, I, R)
    return [(torch.randn(shapes[n], generator=g) * (0.1 if n.endswith("_a") else 0.02)).bfloat16().to(dtype)
            for n in LORA_NAMES]


class _Adapters:
    """reference_grads' view of plain adapter tensors."""

    def __init__(self, tensors):
        self._t, self.scaling = tensors, 2.0

    def tensors(self):
        return [t.float() for t in self._t]


def test_sft_training_loop_matches_the_reference():
    """forward_sft / backward / (optimizer step on the caller's tensors) / update_lora_weights, as
    the seeds' training loop runs them: outputs and gradients of the reference at every step, the
    router gradient in grad_weights; adapters held as bf16 CPU tensors are read in place (a step
    is seen without update_lora_weights), fp32 ones are copies (seen after it)."""
    gate, up, down = make_layer(e=E, h=H, i=I, r=R, seed=1)[:3]
    for dtype in (torch.bfloat16, torch.float32):
        wrapper = _wrapper()
        assert type(wrapper).__name__ == "SFTMoEWrapper" and wrapper.lora_scaling == 2.0
        wrapper.load_weights_from_tensors(gate, up, down, torch.arange(E))
        wrapper.load_weights(torch.arange(E))  # (loaded already: the map is only checked)
        lora = _lora_tensors(dtype=dtype)
        wrapper.init_lora_weights(*lora)
        for step in range(3):
            x, ids, w = make_batch(21 + step, K, e=E, h=H, seed=10 + step)
            dout = torch.randn(x.shape[0], H, generator=torch.Generator().manual_seed(step))
            out = wrapper.forward_sft(x, ids, w, save_for_backward=True)
            assert out.dtype == torch.bfloat16 and wrapper.cache_depth == 1
            ref = reference_grads(x, ids, w, gate, up, down, _Adapters(lora), dout)
            assert rel_err(out.float(), ref[0]) < 0.01
            grad_input, grads = wrapper.backward(dout)
            assert wrapper.cache_depth == 0 and grad_input.shape == x.shape
            assert rel_err(grad_input.float(), ref[1]) < 0.01
            assert rel_err(wrapper.grad_weights, ref[2]) < 0.01
            assert list(grads) == [f"grad_{n}" for n in LORA_NAMES]
            for (name, g), r in zip(grads.items(), ref[3], strict=True):
                assert g.dtype == torch.bfloat16 and rel_err(g.float(), r) < 0.01, name
            with torch.no_grad():  # an optimizer step on the caller's tensors
                for t, g in zip(lora, grads.values(), strict=True):
                    t.sub_(0.05 * g.to(t.dtype))
            if dtype == torch.float32:  # (a copy: the step is seen once update_lora_weights ran)
                stale = wrapper.forward_sft(x, ids, w, save_for_backward=False)
                assert torch.equal(stale, out)
                wrapper.update_lora_weights()


def test_gradient_buffers_and_cache_depth():
    """init_lora_weights with six gradient buffers: each backward writes the LoRA gradients there
    (and returns them); max_cache_depth forwards can be saved and come back last in first out."""
    gate, up, down = make_layer(e=E, h=H, i=I, r=R, seed=1)[:3]
    wrapper = _wrapper(max_cache_depth=2)
    wrapper.load_weights_from_tensors(gate, up, down)
    lora = _lora_tensors()
    buffers = [torch.full_like(t, 7.0) for t in lora]
    wrapper.init_lora_weights(*lora, *buffers)
    batches = [make_batch(t, K, e=E, h=H, seed=t) for t in (9, 14)]
    for x, ids, w in batches:
        wrapper.forward_sft(x, ids, w)
    with pytest.raises(RuntimeError, match="Forward cache full"):
        wrapper.forward_sft(*batches[0])
    for x, ids, w in reversed(batches):
        dout = torch.randn(x.shape[0], H, generator=torch.Generator().manual_seed(5))
        ref = reference_grads(x, ids, w, gate, up, down, _Adapters(lora), dout)
        grad_input, grads = wrapper.backward(dout)
        assert rel_err(grad_input.float(), ref[1]) < 0.01
        for buf, g, r in zip(buffers, grads.values(), ref[3], strict=True):
            assert g is buf and rel_err(buf.float(), r) < 0.01
    with pytest.raises(RuntimeError, match="No forward cache available"):
        wrapper.backward(torch.zeros(9, H))


def test_gradient_buffers_are_written_in_place_at_a_kernel_rank():
    """At a rank the kernels run as it is (16), the backward writes the caller's gradient buffers
    directly: the same values as a wrapper without buffers, every idle expert's slices zero,
    whether the buffers were left alone, changed in place (zero_, fill_) or hold what the last
    step wrote for experts idle now. Buffers sharing memory with each other or the adapters raise."""
    rank = 16
    gate, up, down = make_layer(e=E, h=H, i=I, r=R, seed=1)[:3]
    g = torch.Generator().manual_seed(4)
    lora = [(torch.randn(s, generator=g) * 0.05).bfloat16() for s in lora_shapes(E, H, I, rank).values()]
    plain, bufs_side = _wrapper(lora_rank=rank), _wrapper(lora_rank=rank)
    for wr in (plain, bufs_side):
        wr.load_weights_from_tensors(gate, up, down)
    buffers = [torch.full_like(t, 7.0) for t in lora]
    plain.init_lora_weights(*lora)
    bufs_side.init_lora_weights(*lora, *buffers)
    for step, change in enumerate([None, None, "fill_", None, "zero_", None]):
        x, ids, w = make_batch(2, K, e=E, h=H, seed=30 + step)  # 2 tokens: some of the 8 experts idle
        dout = torch.randn(2, H, generator=torch.Generator().manual_seed(step))
        plain.forward_sft(x, ids, w)
        want = plain.backward(dout)[1]
        bufs_side.forward_sft(x, ids, w)
        got = bufs_side.backward(dout)[1]
        idle = torch.ones(E, dtype=torch.bool)
        idle[ids.flatten()] = False
        for buf, (name, a), b in zip(buffers, want.items(), got.values(), strict=True):
            assert b is buf and torch.equal(a, b), (step, name)
            assert not buf[~idle].eq(0).all() and buf[idle].eq(0).all(), (step, name)
        if change == "fill_":
            buffers[1].fill_(3.0)
        elif change == "zero_":
            buffers[4].zero_()
    # a second wrapper given the same buffers (scratch shared by layers) writes experts idle for the first
    other = _wrapper(lora_rank=rank)
    other.load_weights_from_tensors(gate, up, down)
    other.init_lora_weights(*(t.flip(0) for t in lora), *buffers)
    ids = torch.tensor([[0, 1, 2], [1, 2, 0]])
    x, _, w = make_batch(2, K, e=E, h=H, seed=40)
    other.forward_sft(x, ids + 5, w)
    other.backward(torch.ones(2, H))
    for wr in (plain, bufs_side):
        wr.forward_sft(x, ids, w)
    want, got = plain.backward(torch.ones(2, H))[1], bufs_side.backward(torch.ones(2, H))[1]
    for buf, (name, a), b in zip(buffers, want.items(), got.values(), strict=True):
        assert b is buf and torch.equal(a, b) and buf[3:].eq(0).all(), name
    with torch.inference_mode():
        frozen = [torch.zeros_like(t) for t in lora]
    with pytest.raises(ValueError, match="grad_gate_lora_a was created under torch.inference_mode"):
        bufs_side.init_lora_weights(*lora, *frozen)
    with pytest.raises(ValueError, match="(grad_gate_lora_b and gate_lora_b|gate_lora_b and grad_gate_lora_b) share"):
        bufs_side.init_lora_weights(*lora, buffers[0], lora[1], *buffers[2:])
    with pytest.raises(ValueError, match="grad_.*_lora_a and grad_.*_lora_a share memory"):
        bufs_side.init_lora_weights(*lora, buffers[0], buffers[1], buffers[0], *buffers[3:])


@pytest.mark.parametrize("method", ["AMXINT8", "AMXINT4", "MOE_INT4", "BF16"])
def test_inference_forward_and_submit_sync(method):
    """Inference methods quantize as kt-kernel's do (the reference runs on the dequantized
    weights); submit_forward / sync_forward give forward's output; fp32 inputs give fp32 outputs."""
    quant = {"AMXINT8": "int8", "AMXINT4": "int4", "MOE_INT4": "int4", "BF16": "bf16"}[method]
    gate, up, down, experts = make_layer(e=E, h=H, i=I, r=R, seed=1, quant=quant)[:4]
    wrapper = _wrapper(mode="inference", method=method)
    raw = make_layer(e=E, h=H, i=I, r=R, seed=1)[:3]
    wrapper.load_weights_from_tensors(*raw, torch.arange(E))
    assert wrapper.experts.quant == quant
    x, ids, w = make_batch(30, K, e=E, h=H, seed=2)
    out = wrapper.forward(x, ids, w)
    assert out.dtype == torch.bfloat16 and rel_err(out.float(), ref_moe(x, ids, w, gate, up, down)) < 0.01
    staged = [t.clone() for t in (x, ids, w)]  # (a caller's staging buffers, refilled right after submit)
    wrapper.submit_forward(*staged)
    for t in staged:
        t.zero_()
    with pytest.raises(RuntimeError, match="in flight"):
        wrapper.submit_forward(x, ids, w)
    assert torch.equal(wrapper.sync_forward(x), out)
    with pytest.raises(RuntimeError, match="no forward was submitted"):
        wrapper.sync_forward(x)
    out32 = wrapper.forward(x.float(), ids.int(), w)
    assert out32.dtype == torch.float32 and rel_err(out32, ref_moe(x, ids, w, gate, up, down)) < 0.005


def test_load_weights_from_a_checkpoint_with_an_expert_map(tmp_path):
    """load_weights reads the layer's experts from weight_path (a safetensors checkpoint, per-expert
    keys, Qwen/DeepSeek and Mixtral names), and a physical_to_logical_map puts logical expert
    map[p] in slot p (also through load_weights_from_tensors)."""
    from safetensors.torch import save_file

    gate, up, down = make_layer(e=E, h=H, i=I, r=R, seed=1)[:3]
    mapping = torch.tensor([3, 0, 7, 7, 1, 2, 5, 4])  # (a permutation with one expert twice, 6 missing)
    x, ids, w = make_batch(25, K, e=E, h=H, seed=4)
    want = ref_moe(x, ids, w, gate[mapping], up[mapping], down[mapping])
    for layer, names in (("mlp", ("gate_proj", "up_proj", "down_proj")), ("block_sparse_moe", ("w1", "w3", "w2"))):
        tensors = {f"model.layers.2.{layer}.experts.{e}.{n}.weight": t[e].contiguous()
                   for e in range(E) for n, t in zip(names, (gate, up, down), strict=True)}
        save_file(tensors, tmp_path / f"{layer}.safetensors")
        path = str(tmp_path / f"{layer}.safetensors")
        wrapper = _wrapper(mode="inference", method="BF16", layer_idx=2, weight_path=path)
        wrapper.load_weights(mapping)
        assert rel_err(wrapper.forward(x, ids, w).float(), want) < 0.01
    from_tensors = _wrapper(mode="inference", method="BF16")
    from_tensors.load_weights_from_tensors(gate, up, down, mapping)
    assert rel_err(from_tensors.forward(x, ids, w).float(), want) < 0.01
    # the seeds' order: tensors first, then load_weights(map), which applies the map (again and again)
    staged = _wrapper(mode="inference", method="BF16")
    staged.load_weights_from_tensors(gate, up, down)
    for m, (g, u, d) in ((mapping, (gate[mapping], up[mapping], down[mapping])), (None, (gate, up, down))):
        staged.load_weights(m)
        assert rel_err(staged.forward(x, ids, w).float(), ref_moe(x, ids, w, g, u, d)) < 0.01
    missing = _wrapper(mode="inference", method="BF16", layer_idx=5, weight_path=str(tmp_path / "mlp.safetensors"))
    with pytest.raises(ValueError, match="layer 5's experts are not in"):
        missing.load_weights()
    for bad, why in ((torch.arange(E - 1), "has 7 entries"), (torch.arange(E) + 1, r"outside \[0, 8\)"),
                     (torch.arange(E).float(), "1-D integer tensor"), (torch.arange(E) < 1, "1-D integer tensor")):
        with pytest.raises(ValueError, match=why):
            _wrapper(mode="inference", method="BF16").load_weights_from_tensors(gate, up, down, bad)


def test_load_weights_from_a_packed_model(tmp_path):
    """weight_path may be a model kt_jit's save_pretrained wrote: the layer's packed experts are
    used as they are (their mode must be the method's)."""
    transformers = pytest.importorskip("transformers")
    from kt_jit.integrations.hf import patch_experts

    torch.manual_seed(0)
    cfg = transformers.Qwen3MoeConfig(vocab_size=96, hidden_size=H, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, head_dim=16, intermediate_size=128,
                                      moe_intermediate_size=I, num_experts=E, num_experts_per_tok=K)
    model = transformers.Qwen3MoeForCausalLM(cfg)
    experts = model.model.layers[1].mlp.experts
    gate_up, down = experts.gate_up_proj.detach().bfloat16(), experts.down_proj.detach().bfloat16()
    patch_experts(model, quant="int8", lora=False)
    model.save_pretrained(tmp_path)
    wrapper = _wrapper(mode="inference", method="AMXINT8", layer_idx=1, weight_path=str(tmp_path))
    wrapper.load_weights(torch.arange(E))
    packed = model.model.layers[1].mlp.experts.experts
    assert all(torch.equal(wrapper.experts.tensors[k], v) for k, v in packed.tensors.items())
    x, ids, w = make_batch(12, K, e=E, h=H, seed=6)
    g, u, d = packed.dequantize()
    assert rel_err(wrapper.forward(x, ids, w).float(), ref_moe(x, ids, w, g, u, d)) < 0.01
    assert gate_up.shape == (E, 2 * I, H) and down.shape == (E, H, I)
    with pytest.raises(ValueError, match="packed as 'int8'; method AMXINT4 needs 'int4'"):
        _wrapper(mode="inference", method="AMXINT4", layer_idx=1, weight_path=str(tmp_path)).load_weights()


def test_error_rules():
    """The seeds' error rules: mode and method checks, methods of the other mode, call order
    (weights, adapters, forward cache), sizes, and what kt_jit does not do (GPU experts,
    deferral)."""
    gate, up, down = make_layer(e=E, h=H, i=I, r=R, seed=1)[:3]
    with pytest.raises(ValueError, match="Unknown mode: 'train'"):
        _wrapper(mode="train")
    with pytest.raises(ValueError, match="Method 'AMXINT4' is not supported in sft mode; it is an inference method"):
        _wrapper(mode="sft", method="AMXINT4")
    with pytest.raises(ValueError, match="Method 'AMXBF16_SFT' is not supported in inference mode"):
        _wrapper(mode="inference", method="AMXBF16_SFT")
    with pytest.raises(ValueError, match="no native-precision or GGUF kernels"):
        _wrapper(mode="inference", method="LLAMAFILE")
    with pytest.raises(ValueError, match="num_gpu_experts must be 0"):
        _wrapper(num_gpu_experts=2)
    with pytest.raises(ValueError, match="gpu_experts_mask all False"):
        _wrapper(gpu_experts_mask=torch.ones(E, dtype=torch.bool))
    with pytest.raises(TypeError, match="lora_rnak"):
        _wrapper(lora_rnak=8)
    with pytest.raises(ValueError, match="lora_dropout=0.1 is not supported"):
        _wrapper(lora_dropout=0.1)
    with pytest.raises(ValueError, match="does not defer experts"):
        _wrapper(mode="inference", method="AMXINT4", max_deferred_experts_per_token=2)
    with pytest.raises(ValueError, match="cannot exceed num_experts"):
        _wrapper(num_experts_per_tok=E + 1)
    with pytest.raises(ValueError, match="lora_rank must be a positive integer"):
        _wrapper(lora_rank=0)
    assert _wrapper(method="AMXINT4_KGroup_SFT").quant == "int4_1kgroup"
    assert _wrapper(method="AMXINT4_KGroup_SFT", zero_point=False).quant == "int4_kgroup"
    sft, inference = _wrapper(), _wrapper(mode="inference", method="AMXINT4")
    x, ids, w = make_batch(5, K, e=E, h=H)
    for call in ("forward", "submit_forward", "sync_forward"):
        with pytest.raises(RuntimeError, match=f"{call}\\(\\) is not available in SFT mode"):
            getattr(sft, call)(x, ids, w)
    for call in ("forward_sft", "backward", "init_lora_weights", "update_lora_weights"):
        with pytest.raises(RuntimeError, match=f"{call}\\(\\) is not available in inference mode"):
            getattr(inference, call)(x)
    for wrapper in (sft, inference):
        with pytest.raises(RuntimeError, match="select_deferred_experts\\(\\) is not available"):
            wrapper.select_deferred_experts(ids, w, 1)
    with pytest.raises(RuntimeError, match="Weights not loaded"):
        sft.forward_sft(x, ids, w)
    with pytest.raises(RuntimeError, match="Weights not loaded"):
        inference.forward(x, ids, w)
    with pytest.raises(RuntimeError, match="weight_path is not set"):
        sft.load_weights(torch.arange(E))
    sft.load_weights_from_tensors(gate, up, down)
    with pytest.raises(RuntimeError, match="LoRA weights not initialized"):
        sft.forward_sft(x, ids, w)
    with pytest.raises(RuntimeError, match="LoRA weights not initialized"):
        sft.update_lora_weights()
    assert sft.forward_sft(x, ids, w, save_for_backward=False).shape == (5, H)  # (no adapters: the base)
    with pytest.raises(RuntimeError, match="No forward cache available"):
        sft.backward(torch.zeros(5, H))
    lora = _lora_tensors()
    with pytest.raises(ValueError, match=r"down_lora_b shape mismatch: expected \(8, 64, 4\)"):
        sft.init_lora_weights(*lora[:5], lora[5][:, :, :2])
    with pytest.raises(ValueError, match="6 adapter tensors and optionally 6 gradient buffers"):
        sft.init_lora_weights(*lora, lora[0])
    sft.init_lora_weights(*lora)
    with pytest.raises(RuntimeError, match=r"qlen \(65\) exceeds chunked_prefill_size \(64\)"):
        sft.forward_sft(*make_batch(65, K, e=E, h=H))
    with pytest.raises(ValueError, match="expert_ids has 2 experts per token"):
        sft.forward_sft(*make_batch(5, 2, e=E, h=H))
    with pytest.raises(ValueError, match="expert ids in"):
        sft.forward_sft(x, ids + E, w)
    for save in (False, True):  # (a saved forward converts its inputs: only those the op takes)
        with pytest.raises(ValueError, match="hidden_states must be bfloat16/float16/float32, got torch.float64"):
            sft.forward_sft(x.double(), ids, w, save_for_backward=save)
        with pytest.raises(ValueError, match="topk_weights must be a float tensor, got torch.bool"):
            sft.forward_sft(x, ids, w > 0, save_for_backward=save)
    assert sft.cache_depth == 0
    # a saved forward keeps its inputs (the caller may refill them) and blocks a reload until its backward
    x2, ids2, w2 = (t.clone() for t in (x, ids, w))
    sft.forward_sft(x2, ids2, w2)
    experts, op = sft.experts, sft._op
    for t in (x2, w2):
        t.zero_()
    with pytest.raises(RuntimeError, match="cannot be \\(re\\)loaded with forwards saved"):
        sft.load_weights_from_tensors(up, gate, down)
    with pytest.raises(RuntimeError, match="cannot be \\(re\\)loaded with forwards saved"):
        sft.load_weights(torch.arange(E))
    assert sft.experts is experts and sft._op is op and sft.cache_depth == 1
    dout = torch.randn(5, H, generator=torch.Generator().manual_seed(1))
    ref = reference_grads(x, ids, w, gate, up, down, _Adapters(lora), dout)
    assert rel_err(sft.backward(dout)[0].float(), ref[1]) < 0.01

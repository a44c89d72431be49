"""Hugging Face transformers integration: tiny randomly initialised MoE models (no download) whose
experts are swapped for kt_jit's, checked against the same model with the float32 oracle as its
experts (kt_jit.reference.moe, sharing the adapters)."""

import copy

import pytest
import torch
from conftest import NEEDS_AVX512_BF16, file_mappings, fp8_blocks
from reference import moe as ref_moe
from reference import rel_err
from torch import nn

transformers = pytest.importorskip("transformers")

import kt_jit  # noqa: E402
from kt_jit.integrations.hf import KTJitExperts, moe_lora_parameters, patch_experts  # noqa: E402

pytestmark = NEEDS_AVX512_BF16

SMALL = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, max_position_embeddings=64)


def _model(arch: str) -> nn.Module:
    """A two-layer model of ``arch`` with weights rounded to bf16 (so packing them is exact)."""
    torch.manual_seed(0)
    if arch == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(intermediate_size=128, moe_intermediate_size=64, num_experts=8,
                                          num_experts_per_tok=2, norm_topk_prob=True, **SMALL)
        model = transformers.Qwen3MoeForCausalLM(cfg)
    elif arch == "mixtral":
        cfg = transformers.MixtralConfig(intermediate_size=96, num_local_experts=6, num_experts_per_tok=2, **SMALL)
        model = transformers.MixtralForCausalLM(cfg)
    else:
        raise AssertionError(arch)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
    return model


class _OracleExperts(nn.Module):
    """The float32 oracle behind the transformers experts call, with given adapters."""

    def __init__(self, hf: nn.Module, lora: list[nn.Parameter], scaling: float) -> None:
        super().__init__()
        i = hf.down_proj.shape[2]
        gu = hf.gate_up_proj.detach()
        self.gate, self.up, self.down = gu[:, :i], gu[:, i:], hf.down_proj.detach()
        self.lora = nn.ParameterList(lora)
        self.scaling = scaling

    def forward(self, x, top_k_index, top_k_weights):
        return ref_moe(x, top_k_index, top_k_weights, self.gate, self.up, self.down, tuple(self.lora),
                       self.scaling).to(x.dtype)


def _pair(arch: str, rank: int = 16):
    """(kt_jit-patched model, oracle model) with identical weights and nonzero adapters."""
    model = _model(arch)
    oracle = copy.deepcopy(model)
    replaced = patch_experts(model, rank=rank, alpha=2.0 * rank)
    g = torch.Generator().manual_seed(1)
    for name, ours in replaced.items():
        with torch.no_grad():
            for p in ours.lora.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        theirs = oracle.get_submodule(name)
        params = [nn.Parameter(p.detach().float().clone()) for p in ours.lora.tensors()]
        parent, _, attr = name.rpartition(".")
        setattr(oracle.get_submodule(parent), attr, _OracleExperts(theirs, params, ours.lora.scaling))
    return model, oracle, replaced


def _loss(model, ids):
    return model(ids, labels=ids).loss


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_patched_model_matches_oracle(arch):
    """Logits, the loss gradient of every LoRA tensor, of the routers and of the embeddings."""
    model, oracle, replaced = _pair(arch)
    assert all(isinstance(m, KTJitExperts) for m in replaced.values()) and len(replaced) == 2
    ids = torch.randint(0, 96, (3, 11), generator=torch.Generator().manual_seed(2))
    assert rel_err(model(ids).logits, oracle(ids).logits) < 5e-3
    _loss(model, ids).backward()
    _loss(oracle, ids).backward()
    for name, ours in replaced.items():
        theirs = oracle.get_submodule(name).lora
        for a, b in zip(ours.lora.parameters(), theirs, strict=True):
            assert rel_err(a.grad, b.grad) < 1e-2, name
    theirs = dict(oracle.named_parameters())
    for name, p in model.named_parameters():
        if name in theirs and p.grad is not None and ("gate" in name or "embed" in name):
            assert rel_err(p.grad, theirs[name].grad) < 1e-2, name


def test_gradient_checkpointing_keeps_the_moe_activations(monkeypatch):
    """model.activation_checkpointing_enable with kt_jit.moe_checkpoint_context: gradients equal the
    uncheckpointed model's bit for bit and each layer's MoE forward runs once (plain non-reentrant
    checkpointing runs it twice)."""
    import kt_jit.moe.sft as core

    model, _, replaced = _pair("qwen3_moe")
    model.train()
    ids = torch.randint(0, 96, (3, 11), generator=torch.Generator().manual_seed(2))
    calls = []
    real = core.forward
    monkeypatch.setattr(core, "forward", lambda *a, **k: calls.append(1) or real(*a, **k))

    def grads(**kwargs):
        model.zero_grad(set_to_none=True)
        if kwargs:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.activation_checkpointing_disable()
        calls.clear()
        _loss(model, ids).backward()
        return len(calls), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    n_plain, want = grads()
    n_ckpt, _ = grads(use_reentrant=False)
    n_kept, got = grads(use_reentrant=False, context_fn=kt_jit.moe_checkpoint_context)
    assert (n_plain, n_ckpt, n_kept) == (len(replaced), 2 * len(replaced), len(replaced))
    assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_original_experts_are_released_and_state_dict_holds_adapters():
    model = _model("qwen3_moe")
    patch_experts(model, rank=8)
    keys = model.state_dict().keys()
    assert not any("gate_up_proj" in k or k.endswith("experts.down_proj") for k in keys)
    assert sum(k.endswith("experts.lora.down_lora_b") for k in keys) == 2
    assert len(moe_lora_parameters(model)) == 12


def test_lora_fine_tuning_reduces_loss():
    model = _model("qwen3_moe")
    patch_experts(model, rank=8)
    model.requires_grad_(False)
    params = moe_lora_parameters(model)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-2)
    ids = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(3))
    losses = []
    for _ in range(15):
        loss = _loss(model, ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(p.grad is not None for p in params)


def test_inference_saves_nothing_and_matches(monkeypatch):
    import kt_jit.moe.sft as core

    model, _, replaced = _pair("qwen3_moe")
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(4))
    saves = []
    real = core.forward
    monkeypatch.setattr(core, "forward", lambda *a, **k: (saves.append(k["save"]), real(*a, **k))[1])
    with torch.no_grad():
        fast = model(ids).logits
    assert saves == [False, False]
    assert torch.equal(fast, model(ids).logits.detach())
    assert saves[2:] == [True, True]
    # the adapter is read at every call: replacing it (or removing it) takes effect in both paths
    for m in replaced.values():
        m.lora = None
    with torch.no_grad():
        plain = model(ids).logits
    assert not torch.equal(plain, fast)
    assert torch.equal(plain, model(ids).logits.detach())


def test_zero_tokens_transposed_layout_and_plain_silu():
    """Layouts and calls some transformers models use: is_transposed weights ([E, H, 2I] and
    [E, I, H]), the activation as the function F.silu, and a call with no tokens."""
    g = torch.Generator().manual_seed(6)
    e, h, i = 4, 64, 32
    mod = _BiasedExperts(h, i, bias=False)
    with torch.no_grad():
        mod.gate_up_proj = nn.Parameter(torch.randn(e, h, 2 * i, generator=g).bfloat16().float() * 0.1)
        mod.down_proj = nn.Parameter(torch.randn(e, i, h, generator=g).bfloat16().float() * 0.1)
    mod.is_transposed = True
    del mod.act_fn  # (a registered submodule; Lfm2-MoE keeps the plain function)
    mod.act_fn = torch.nn.functional.silu
    ours = KTJitExperts.from_hf(mod, lora=False)
    x = torch.randn(7, h, generator=g)
    idx = torch.randint(0, e, (7, 2), generator=g)
    w = torch.rand(7, 2, generator=g)
    gu = mod.gate_up_proj.detach().transpose(1, 2)
    want = ref_moe(x, idx, w, gu[:, :i], gu[:, i:], mod.down_proj.detach().transpose(1, 2))
    assert rel_err(ours(x, idx, w), want) < 5e-3
    empty = ours(torch.zeros(0, h), torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2))
    assert empty.shape == (0, h)


def test_patching_releases_each_layer_before_the_next_and_the_model_copies(monkeypatch):
    import gc
    import weakref

    from kt_jit.moe.weights import MoEExperts

    model = _model("qwen3_moe")
    originals = [weakref.ref(layer.mlp.experts) for layer in model.model.layers]
    alive_at_pack = []
    real = MoEExperts.from_tensors.__func__

    def spy(cls, *a, **k):
        gc.collect()
        alive_at_pack.append([r() is not None for r in originals])
        return real(cls, *a, **k)

    monkeypatch.setattr(MoEExperts, "from_tensors", classmethod(spy))
    patch_experts(model, rank=8)
    assert alive_at_pack == [[True, True], [False, True]]
    twin = copy.deepcopy(model)  # (EMA copies, torch.save of the whole model)
    ids = torch.randint(0, 96, (1, 6), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert torch.equal(twin(ids).logits, model(ids).logits)


def test_bf16_model_and_quantized_experts():
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(5))
    ref = _model("qwen3_moe").to(torch.bfloat16)
    want = ref(ids).logits.float()
    ours = copy.deepcopy(ref)
    patch_experts(ours, lora=False)
    got = ours(ids).logits
    assert got.dtype == torch.bfloat16 and rel_err(got, want) < 2e-2
    int8 = copy.deepcopy(ref)
    patch_experts(int8, quant="int8", lora=False)
    assert rel_err(int8(ids).logits, want) < 5e-2


class _BiasedExperts(nn.Module):
    def __init__(self, h=64, i=64, bias=True):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.zeros(4, 2 * i, h))
        self.down_proj = nn.Parameter(torch.zeros(4, h, i))
        self.act_fn = nn.SiLU()
        self.has_bias = bias


def test_unsupported_models_are_refused_before_any_change():
    with pytest.raises(ValueError, match="no routed-experts module"):
        patch_experts(nn.Sequential(nn.Linear(4, 4)))
    model = nn.ModuleDict({"ok": _BiasedExperts(bias=False), "bad": _BiasedExperts()})
    with pytest.raises(ValueError, match="bad .*biases"):
        patch_experts(model)
    assert not isinstance(model["ok"], KTJitExperts)
    with pytest.raises(ValueError, match="multiples of 32"):
        patch_experts(nn.ModuleDict({"odd": _BiasedExperts(h=48, bias=False)}))
    act = _BiasedExperts(bias=False)
    act.act_fn = nn.GELU()
    with pytest.raises(ValueError, match="activation is GELU"):
        KTJitExperts.from_hf(act)
    down_bias = _BiasedExperts(bias=False)
    down_bias.down_proj_bias = nn.Parameter(torch.zeros(4, 64))
    with pytest.raises(ValueError, match="biases"):
        KTJitExperts.from_hf(down_bias)
    fp8 = _BiasedExperts(bias=False)
    fp8.gate_up_proj = nn.Parameter(torch.zeros(4, 128, 64, dtype=torch.float8_e4m3fn), requires_grad=False)
    with pytest.raises(ValueError, match="dequantize"):
        KTJitExperts.from_hf(fp8)
    # arguments packing would refuse are refused before the first layer is replaced
    two = nn.ModuleDict({"a": _BiasedExperts(bias=False), "b": _BiasedExperts(bias=False)})
    with pytest.raises(ValueError, match="group_size=48"):
        patch_experts(two, quant="int4_kgroup", group_size=48)
    with pytest.raises(ValueError, match="quant='int3'"):
        patch_experts(two, quant="int3")
    with pytest.raises(ValueError, match="rank must be >= 1"):
        patch_experts(two, rank=0)
    assert not any(isinstance(m, KTJitExperts) for m in two.values())


def test_experts_from_a_saved_transformers_checkpoint(tmp_path):
    """MoEExperts.from_checkpoint reads what save_pretrained writes (per-expert keys, shards)."""
    from kt_jit import MoEExperts

    model = _model("qwen3_moe").to(torch.bfloat16)
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    for layer in (0, 1):
        hf = model.model.layers[layer].mlp.experts
        i = hf.down_proj.shape[2]
        want = MoEExperts.from_tensors(hf.gate_up_proj[:, :i], hf.gate_up_proj[:, i:], hf.down_proj)
        got = MoEExperts.from_checkpoint(tmp_path, f"model.layers.{layer}.mlp")
        assert torch.equal(got.tensors["gate_up"], want.tensors["gate_up"])
        assert torch.equal(got.tensors["down"], want.tensors["down"])


def test_from_pretrained_packs_experts_while_loading(tmp_path):
    """kt_jit's transformers quantizer: the same model as from_pretrained + patch_experts, with
    the experts packed as each layer's parameters arrive (no bf16 experts kept)."""
    from kt_jit.integrations.hf_loading import from_pretrained

    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(8))
    for arch, quant in (("qwen3_moe", "bf16"), ("qwen3_moe", "int8"), ("mixtral", "int4_kgroup")):
        _model(arch).to(torch.bfloat16).save_pretrained(tmp_path / arch)  # (mixtral: w1/w3/w2 keys)
        ours = from_pretrained(tmp_path / arch, quant=quant, rank=8, group_size=32)
        assert not any(n.endswith(("gate_up_proj", "down_proj")) for n, _ in ours.named_parameters())
        twin = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / arch, dtype=torch.bfloat16)
        patch_experts(twin, quant=quant, rank=8, group_size=32)
        experts = [layer.mlp.experts for layer in ours.model.layers]
        assert all(isinstance(m, KTJitExperts) and m.experts.quant == quant and m.lora.rank == 8 for m in experts)
        for a, b in zip(experts, (layer.mlp.experts for layer in twin.model.layers), strict=True):
            assert a.experts.tensors.keys() == b.experts.tensors.keys()
            assert all(torch.equal(a.experts.tensors[k], b.experts.tensors[k]) for k in a.experts.tensors)
        with torch.no_grad():
            assert torch.equal(ours(ids).logits, twin(ids).logits)  # (fresh adapters add nothing)
    # per-expert keys are packed per expert (no merged copy of a layer); a checkpoint that stores the
    # experts fused, as transformers holds them, is packed as each fused parameter arrives
    from safetensors.torch import save_file

    path = tmp_path / "qwen3_moe"
    (tmp_path / "fused").mkdir()
    save_file(_model("qwen3_moe").to(torch.bfloat16).state_dict(), tmp_path / "fused" / "model.safetensors",
              metadata={"format": "pt"})
    (tmp_path / "fused" / "config.json").write_text((path / "config.json").read_text())
    per_expert, fused = (from_pretrained(p, quant="int8", rank=8) for p in (path, tmp_path / "fused"))
    for a, b in zip(per_expert.model.layers, fused.model.layers, strict=True):
        assert all(torch.equal(t, b.mlp.experts.experts.tensors[k]) for k, t in a.mlp.experts.experts.tensors.items())
    with pytest.raises(ValueError, match="group_size=48"):
        from_pretrained(path, quant="int4_kgroup", group_size=48)
    with pytest.raises(ValueError, match="device_map"):
        from_pretrained(path, device_map={"": "cuda"})
    # a checkpoint whose experts disagree with the config is refused without loading a stand-in
    import json

    cfg = json.loads((path / "config.json").read_text())
    cfg["moe_intermediate_size"] = 32
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="does not match the model: .*experts"):
        from_pretrained(path)


def test_from_pretrained_refuses_models_without_usable_experts(tmp_path):
    from kt_jit.integrations.hf_loading import from_pretrained

    cfg = transformers.LlamaConfig(intermediate_size=128, **SMALL)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no routed-experts module"):
        from_pretrained(tmp_path)


def _fp8_checkpoint(model: nn.Module, path, block: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Save ``model`` as an FP8 checkpoint with ``block`` scales (every projection matrix, the
    experts' included, in e4m3 with a weight_scale_inv; embeddings, norms and the router as they are),
    and next to it, in ``path / "exact"``, the fp32 weights it stands for. Returns those."""
    import json

    from safetensors.torch import save_file

    model.save_pretrained(path / "plain")
    fp8, exact = {}, {}
    plain = transformers.modeling_utils.load_state_dict(str(path / "plain" / "model.safetensors"))
    for key, w in plain.items():
        if key.endswith(".weight") and ("proj" in key or ".experts." in key) and w.dim() == 2:  # (Mixtral: w1/w3/w2)
            fp8[key], fp8[key + "_scale_inv"], exact[key] = fp8_blocks(w, block)
        else:
            fp8[key] = exact[key] = w
    # layer 0's o_proj stored in two halves, each with its own scales, for a model converter that joins them
    o_proj = "model.layers.0.self_attn.o_proj.weight"
    half = fp8.pop(o_proj).shape[0] // 2
    del fp8[o_proj + "_scale_inv"]
    halves = []
    for name, rows in (("o_top", slice(0, half)), ("o_bottom", slice(half, None))):
        key = o_proj.replace("o_proj", name)
        fp8[key], fp8[key + "_scale_inv"], value = fp8_blocks(plain[o_proj][rows], block)
        halves.append(value)
    exact[o_proj] = torch.cat(halves)
    config = json.loads((path / "plain" / "config.json").read_text())
    for name, tensors, quantization in (("fp8", fp8, {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme":
                                                      "dynamic", "weight_block_size": list(block)}),
                                        ("exact", exact, None)):
        (path / name).mkdir()
        if quantization:  # (sharded, a weight and its scale in different files: read in any order)
            keys, index = sorted(tensors), {}
            for n in range(3):
                file = f"model-{n:05d}-of-00003.safetensors"
                save_file({k: tensors[k] for k in keys[n::3]}, path / name / file, metadata={"format": "pt"})
                index |= dict.fromkeys(keys[n::3], file)
            (path / name / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
        else:
            save_file(tensors, path / name / "model.safetensors", metadata={"format": "pt"})
        (path / name / "config.json").write_text(json.dumps(config | ({"quantization_config": quantization}
                                                                       if quantization else {})))
    return exact


def _deepseek_v3() -> nn.Module:
    """A two-layer DeepSeek-V3 (MLA attention, a dense first layer, shared and grouped-routed experts)."""
    torch.manual_seed(0)
    cfg = transformers.DeepseekV3Config(
        vocab_size=96, hidden_size=64, intermediate_size=128, moe_intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
        n_group=2, topk_group=1, first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=16,
        qk_nope_head_dim=16, v_head_dim=16, max_position_embeddings=64)
    return transformers.DeepseekV3ForCausalLM(cfg)


@pytest.mark.parametrize("arch,block,quant", [("qwen3_moe", (32, 48), "bf16"),
                                              ("deepseek_v3", (48, 32), "int4_1kgroup"), ("mixtral", (32, 32), "int8")])
def test_from_pretrained_reads_fp8_checkpoints(arch, block, quant, tmp_path, monkeypatch):
    """An FP8 checkpoint with block scales (DeepSeek-V3's format) loads through from_pretrained
    without accelerate: every non-expert weight equals the fp32 checkpoint of the values it stands
    for loaded in bf16, the experts pack to what from_tensors gives for those values (blocks cut
    short at the edges; 48-wide blocks go through fp32, 32-wide ones through the JIT packer), and
    the model computes what that twin computes. Bad scales, and checkpoints
    quantized another way, are refused with the key named."""
    import json

    from kt_jit import MoEExperts
    from kt_jit.integrations.hf import unpatch_experts
    from kt_jit.integrations.hf_loading import from_pretrained

    model = _deepseek_v3() if arch == "deepseek_v3" else _model(arch)
    exact = _fp8_checkpoint(model.to(torch.bfloat16), tmp_path, block)
    # a model converter of other weights (here: joining o_proj's halves) gets them dequantized first
    from transformers import conversion_mapping as cm
    from transformers.core_model_loading import Concatenate, WeightConverter

    join = WeightConverter(["self_attn.o_top.weight", "self_attn.o_bottom.weight"], "self_attn.o_proj.weight",
                           [Concatenate(dim=0)])
    kind = model.config.model_type
    monkeypatch.setitem(cm._checkpoint_conversion_mapping_cache, kind, [*cm.get_checkpoint_conversion_mapping(kind),
                                                                         join])
    # (a keyword naming a config field reaches the config, as when transformers reads it itself)
    ours = from_pretrained(tmp_path / "fp8", quant=quant, group_size=32, rank=8, output_router_logits=True)
    twin = from_pretrained(tmp_path / "exact", quant=quant, group_size=32, rank=8, output_router_logits=True)
    assert ours.config.output_router_logits and ours.dtype == torch.bfloat16
    ours_state, twin_state = ours.state_dict(), twin.state_dict()
    assert ours_state.keys() == twin_state.keys()
    assert all(torch.equal(ours_state[k], twin_state[k]) for k in ours_state if ".lora." not in k)
    for name, module in ours.named_modules():
        if isinstance(module, KTJitExperts):
            e, names = module.experts.num_experts, ("gate_proj", "up_proj", "down_proj")
            stored = name.replace(".mlp.", ".block_sparse_moe.") if arch == "mixtral" else name
            gate, up, down = (torch.stack([exact[f"{stored}.{j}.{p}.weight"] for j in range(e)])
                              for p in (("w1", "w3", "w2") if arch == "mixtral" else names))
            want = MoEExperts.from_tensors(gate, up, down, quant=quant, group_size=32).tensors
            assert all(torch.equal(module.experts.tensors[k], want[k]) for k in want), name
            twin.get_submodule(name).lora = module.lora
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        logits = ours(ids).logits
        assert torch.equal(logits, twin(ids).logits) if quant == "bf16" else rel_err(logits, twin(ids).logits) < 2e-2
    # saved packed (the other weights in bf16, o_proj split into its halves again) and read back as it was
    from kt_jit.integrations.hf_saving import save_pretrained

    save_pretrained(ours, tmp_path / "packed")
    back = from_pretrained(tmp_path / "packed", rank=8)
    back_state = back.state_dict()
    assert back_state.keys() == ours_state.keys()
    assert all(torch.equal(back_state[k], ours_state[k]) for k in ours_state if ".lora." not in k)
    for name, module in back.named_modules():
        if isinstance(module, KTJitExperts):
            assert all(torch.equal(t, ours.get_submodule(name).experts.tensors[k])
                       for k, t in module.experts.tensors.items()), name
            module.lora = ours.get_submodule(name).lora
    with torch.no_grad():
        assert torch.equal(back(ids).logits, logits)
    unpatch_experts(ours)  # a plain bf16 transformers model again
    assert getattr(ours.config, "quantization_config", None) is None

    config = json.loads((tmp_path / "fp8" / "config.json").read_text())
    tensors = {}
    for shard in sorted((tmp_path / "fp8").glob("model-*.safetensors")):  # (from here on: one file)
        tensors |= transformers.modeling_utils.load_state_dict(str(shard))
        shard.unlink()
    (tmp_path / "fp8" / "model.safetensors.index.json").unlink()
    from safetensors.torch import save_file

    layer = "model.layers.1"
    up = "block_sparse_moe.experts.3.w3" if arch == "mixtral" else "mlp.experts.3.up_proj"
    for key, why in ((f"{layer}.{up}.weight_scale_inv", r"experts.3.(up_proj|w3).weight_scale_inv has "
                      r"shape \[1, 1\], expected"),
                     (f"{layer}.self_attn.o_proj.weight_scale_inv", "o_proj.weight_scale_inv has shape")):
        save_file(tensors | {key: torch.ones(1, 1)}, tmp_path / "fp8" / "model.safetensors")
        with pytest.raises(ValueError, match=why):
            from_pretrained(tmp_path / "fp8", quant=quant, group_size=32)
    (tmp_path / "fp8" / "config.json").write_text(json.dumps(config | {"quantization_config": {"quant_method": "gptq",
                                                                                               "bits": 4}}))
    with pytest.raises(ValueError, match="quantized with 'gptq'"):
        from_pretrained(tmp_path / "fp8")
    (tmp_path / "fp8" / "config.json").write_text(json.dumps(config | {"quantization_config": {
        "quant_method": "fp8", "weight_block_size": None}}))
    with pytest.raises(ValueError, match="per-tensor FP8 scales"):
        from_pretrained(tmp_path / "fp8")


def test_save_pretrained_writes_the_packed_experts(tmp_path):
    """kt_jit's save_pretrained: transformers' checkpoint of the other weights and the adapters (no
    experts weights) plus one aligned MoEExperts file per layer; from_pretrained maps those files (no
    packing), reads the adapters back (bf16 and trainable in an fp32 model too; fresh ones when
    another rank or none is asked for) and computes what the saved model computes. Misuse is refused."""
    import json
    import os

    from kt_jit.integrations.hf_loading import from_pretrained
    from kt_jit.integrations.hf_saving import save_pretrained

    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(8))
    path = tmp_path / "qwen3_moe"
    _model("qwen3_moe").to(torch.bfloat16).save_pretrained(path)
    loaded = from_pretrained(path, quant="int4_kgroup", group_size=32, rank=8)
    _model("mixtral").to(torch.bfloat16).save_pretrained(tmp_path / "mixtral")
    patched = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "mixtral", dtype=torch.bfloat16)
    patch_experts(patched, quant="int8", rank=8)
    g = torch.Generator().manual_seed(9)
    for model in (loaded, patched):  # (trained adapters: nonzero B)
        with torch.no_grad():
            for p in moe_lora_parameters(model):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    for model, saved in ((loaded, tmp_path / "a"), (patched, tmp_path / "b")):
        config_before = getattr(model.config, "quantization_config", None)
        save_pretrained(model, saved, max_shard_size="40KB")
        assert getattr(model.config, "quantization_config", None) is config_before
        index = json.loads((saved / "model.safetensors.index.json").read_text())["weight_map"]
        assert len(set(index.values())) > 1 and not any(k.endswith(("gate_up_proj", "down_proj")) for k in index)
        back = from_pretrained(saved, dtype=torch.float32)  # (the adapters stay bf16)
        modules = {n: m for n, m in back.named_modules() if isinstance(m, KTJitExperts)}
        assert len(modules) == 2
        for name, module in modules.items():
            source = model.get_submodule(name)
            assert module.experts.quant == source.experts.quant
            mapped = file_mappings(saved / "kt_jit_experts" / f"{name}.safetensors")
            for k, t in module.experts.tensors.items():
                assert torch.equal(t, source.experts.tensors[k]), (name, k)
                assert t.data_ptr() % 64 == 0 and any(lo <= t.data_ptr() < hi for lo, hi in mapped), (name, k)
            for a, b in zip(module.lora.tensors(), source.lora.tensors(), strict=True):
                assert torch.equal(a, b) and a.dtype == torch.bfloat16 and a.requires_grad
            assert module.lora.alpha == source.lora.alpha
        back = from_pretrained(saved)
        with torch.no_grad():
            assert torch.equal(back(ids).logits, model(ids).logits)
        back(ids, labels=ids).loss.backward()  # (a fine-tune resumes: the adapters get gradients)
        assert all(p.grad is not None and p.grad.any() for p in moe_lora_parameters(back))
    bare = from_pretrained(tmp_path / "a", lora=False)
    assert all(m.lora is None for m in bare.modules() if isinstance(m, KTJitExperts))
    again = from_pretrained(tmp_path / "a", quant="int4_kgroup", group_size=32, rank=4)
    assert all(m.lora.rank == 4 and not m.lora.gate_lora_b.any() for m in again.modules()
               if isinstance(m, KTJitExperts))
    # the model without its head (names without "model.")
    base = from_pretrained(tmp_path / "a", model_class=transformers.AutoModel)
    assert [n for n, m in base.named_modules() if isinstance(m, KTJitExperts) and m.lora.rank == 8] == [
        "layers.0.mlp.experts", "layers.1.mlp.experts"]
    # saved again over a save (one file, then shards), through model.save_pretrained: nothing of the
    # earlier save is left to load; the unchanged experts files are hard links to the first save's
    layer0 = "kt_jit_experts/model.layers.0.mlp.experts.safetensors"
    loaded.save_pretrained(tmp_path / "e")
    loaded.save_pretrained(tmp_path / "e", max_shard_size="40KB")
    assert not (tmp_path / "e" / "model.safetensors").exists()
    assert os.path.samefile(tmp_path / "e" / layer0, tmp_path / "a" / layer0)
    with torch.no_grad():
        assert torch.equal(from_pretrained(tmp_path / "e")(ids).logits, loaded(ids).logits)
    # an experts file of another save (an interrupted save, files mixed up) is refused
    (tmp_path / "e" / layer0).unlink()
    loaded.model.layers[0].mlp.experts.experts.save(tmp_path / "e" / layer0, metadata={"kt_jit_save_id": "other"})
    with pytest.raises(ValueError, match="another save"):
        from_pretrained(tmp_path / "e")

    with pytest.raises(ValueError, match="packed as 'int4_kgroup', not 'int8'"):
        from_pretrained(tmp_path / "a", quant="int8")
    with pytest.raises(ValueError, match="groups of 32, not 128"):
        from_pretrained(tmp_path / "a", group_size=128)
    with pytest.raises(ValueError, match="load it with kt_jit.integrations.hf_loading.from_pretrained"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    with pytest.raises(ValueError, match="no KTJitExperts"):
        save_pretrained(_model("qwen3_moe"), tmp_path / "c")
    with pytest.raises(ValueError, match="holds another checkpoint"):  # (its bf16 experts would be lost)
        save_pretrained(loaded, path)
    with pytest.raises(ValueError, match="push_to_hub"):
        save_pretrained(loaded, tmp_path / "c", push_to_hub=True)
    loaded.save_pretrained(tmp_path / "c", is_main_process=False)  # (another rank: writes nothing)
    assert not (tmp_path / "c").exists()

    # a patched model pickles, and its save_pretrained follows the copy
    import pickle

    copied = pickle.loads(pickle.dumps(patched))
    copied.model.layers[0].mlp.experts.lora.up_lora_b.data.zero_()
    copied.save_pretrained(tmp_path / "h")
    assert not from_pretrained(tmp_path / "h").model.layers[0].mlp.experts.lora.up_lora_b.any()
    # adapters of another rank and alpha in one layer (e.g. from a PEFT adapter's rank_pattern)
    from kt_jit import MoELoRA

    ex = loaded.model.layers[1].mlp.experts.experts
    odd = MoELoRA(ex.num_experts, ex.hidden_size, ex.intermediate_size, rank=4, alpha=3.0)
    with torch.no_grad():
        for t in odd.parameters():
            t.copy_(torch.randn(t.shape, generator=g) * 0.1)
    loaded.model.layers[1].mlp.experts.lora = odd
    loaded.save_pretrained(tmp_path / "k")
    mixed = from_pretrained(tmp_path / "k")
    assert [(m.lora.rank, m.lora.alpha) for m in mixed.modules() if isinstance(m, KTJitExperts)] == [
        (8, 32.0), (4, 3.0)]
    with torch.no_grad():
        assert torch.equal(mixed(ids).logits, loaded(ids).logits)
    # a layer without an adapter stays without one
    loaded.model.layers[1].mlp.experts.lora = None
    loaded.save_pretrained(tmp_path / "f")
    again = from_pretrained(tmp_path / "f")
    assert again.model.layers[1].mlp.experts.lora is None
    assert torch.equal(again.model.layers[0].mlp.experts.lora.up_lora_b,
                       loaded.model.layers[0].mlp.experts.lora.up_lora_b)
    # saved from a Hub-cache-like layout (each file a symlink to a blob): the new files are real files
    hub = tmp_path / "hub"
    (hub / "blobs").mkdir(parents=True)
    (hub / "snapshot" / "kt_jit_experts").mkdir(parents=True)
    blobs = {}
    for n, f in enumerate(f for f in (tmp_path / "a").rglob("*") if f.is_file()):
        link = hub / "snapshot" / f.relative_to(tmp_path / "a")
        blobs[link] = hub / "blobs" / str(n)
        blobs[link].write_bytes(f.read_bytes())
        link.symlink_to(os.path.relpath(blobs[link], link.parent))
    from_pretrained(hub / "snapshot").save_pretrained(tmp_path / "g")
    assert not (tmp_path / "g" / layer0).is_symlink()
    assert os.path.samefile(tmp_path / "g" / layer0, blobs[hub / "snapshot" / layer0])
    with torch.no_grad():
        assert torch.equal(from_pretrained(tmp_path / "g")(ids).logits, from_pretrained(tmp_path / "a")(ids).logits)
    # a checkpoint whose config names adapters it does not hold is refused (not loaded uninitialised)
    from safetensors.torch import load_file, save_file

    state = load_file(tmp_path / "f" / "model.safetensors")
    save_file({k: v for k, v in state.items() if "layers.0.mlp.experts.lora" not in k},
              tmp_path / "f" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="layers.0.mlp.experts: the checkpoint has no"):
        from_pretrained(tmp_path / "f")

    peft = pytest.importorskip("peft")
    wrapped = peft.get_peft_model(loaded, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    for holder in (wrapped, wrapped.get_base_model()):  # (PEFT's layers are in the base model too)
        with pytest.raises(ValueError, match="PEFT layers"):
            save_pretrained(holder, tmp_path / "d")
    (tmp_path / "a" / "kt_jit_experts" / "model.layers.1.mlp.experts.safetensors").unlink()
    with pytest.raises(OSError, match="model.layers.1.mlp.experts.safetensors"):
        from_pretrained(tmp_path / "a")


def _tiny_trainer(model: nn.Module, out, steps: int):
    """transformers' Trainer on 8 fixed random sequences, a checkpoint under ``out`` every step."""
    g = torch.Generator().manual_seed(3)
    data = [{"input_ids": (x := torch.randint(0, 96, (8,), generator=g)), "labels": x} for _ in range(8)]
    args = transformers.TrainingArguments(out, max_steps=steps, save_steps=1, learning_rate=1e-2,
                                          per_device_train_batch_size=4, report_to=[], use_cpu=True, disable_tqdm=True)
    return transformers.Trainer(model=model, args=args, train_dataset=data)


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_trainer_checkpoints_a_kt_jit_model(arch, tmp_path):
    """transformers' Trainer on a model loaded through hf_loading: its checkpoints are packed
    checkpoints (model.save_pretrained is kt_jit's), the second one's experts files hard links to
    the first one's; a checkpoint loads back as the trained model, and a Trainer resumes from it
    (the model's own key names: Mixtral's checkpoint names differ)."""
    import os

    from kt_jit.integrations.hf_loading import from_pretrained

    _model(arch).to(torch.bfloat16).save_pretrained(tmp_path / "src")

    def trainer(steps: int):
        model = from_pretrained(tmp_path / "src", quant="int8", rank=8)
        for n, p in model.named_parameters():
            p.requires_grad_(".lora." in n)
        return _tiny_trainer(model, tmp_path / "out", steps)

    first = trainer(2)
    first.train()
    layer0 = "kt_jit_experts/model.layers.0.mlp.experts.safetensors"
    assert os.path.samefile(tmp_path / "out" / "checkpoint-1" / layer0, tmp_path / "out" / "checkpoint-2" / layer0)
    trained = first.model
    back = from_pretrained(tmp_path / "out" / "checkpoint-2")
    assert all(torch.equal(a, b) for a, b in zip(moe_lora_parameters(back), moe_lora_parameters(trained),
                                                 strict=True))
    assert all(m.lora.down_lora_b.any() for m in back.modules() if isinstance(m, KTJitExperts))  # (B left zero)
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, trained(ids).logits)
    resumed = trainer(3)
    resumed._load_from_checkpoint(str(tmp_path / "out" / "checkpoint-2"))  # (what train(resume_from_...) does)
    assert all(torch.equal(a, b) for a, b in zip(moe_lora_parameters(resumed.model), moe_lora_parameters(trained),
                                                 strict=True))
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    assert (tmp_path / "out" / "checkpoint-3" / layer0).exists()


@pytest.mark.filterwarnings("ignore:The following (alpha|rank)_pattern keys did not match:RuntimeWarning")
def test_trainer_with_peft_keeps_the_experts_adapters(tmp_path):
    """PEFT on the attention of a kt_jit model, trained by transformers' Trainer: with
    track_experts_adapters each checkpoint is one PEFT adapter holding PEFT's and the experts'
    adapters (PEFT on the original model computes what the trained model computes), and a Trainer
    resuming from it gets both back in place."""
    peft = pytest.importorskip("peft")
    from kt_jit.integrations.hf_loading import from_pretrained
    from kt_jit.integrations.peft_adapter import track_experts_adapters

    _model("qwen3_moe").to(torch.bfloat16).save_pretrained(tmp_path / "src")

    def trainer(steps: int):
        model = peft.get_peft_model(from_pretrained(tmp_path / "src", rank=8),
                                    peft.LoraConfig(r=2, target_modules=["q_proj"]))
        for p in moe_lora_parameters(model):
            p.requires_grad_(True)
        track_experts_adapters(model)
        return _tiny_trainer(model, tmp_path / "out", steps)

    first = trainer(2)
    first.train()
    checkpoint = tmp_path / "out" / "checkpoint-2"
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(8))
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "src", dtype=torch.bfloat16)
    with torch.no_grad():
        served = peft.PeftModel.from_pretrained(plain, checkpoint)
        assert rel_err(served(ids).logits.float(), first.model(ids).logits.float()) < 1e-2
    resumed = trainer(3)
    resumed._load_from_checkpoint(str(checkpoint))  # (what train(resume_from_checkpoint=...) does)
    trained, back = first.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(back[k], v) for k, v in trained.items() if "lora" in k)
    assert all(m.lora.down_lora_b.any() for m in resumed.model.modules() if isinstance(m, KTJitExperts))
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert (tmp_path / "out" / "checkpoint-3" / "adapter_model.safetensors").exists()
    with pytest.raises(ValueError, match="not a PEFT model"):
        track_experts_adapters(plain)


def test_unpatch_merges_the_adapters_back_into_a_transformers_model(tmp_path):
    """After fine-tuning, unpatch_experts gives a plain transformers model: without merging it is
    the original model (exactly here: its weights are bf16 values); with merging its logits match
    the patched model's, and it saves and loads with save_pretrained / from_pretrained (also when
    loaded through hf_loading)."""
    from kt_jit.integrations.hf import unpatch_experts
    from kt_jit.integrations.hf_loading import from_pretrained

    original = _model("qwen3_moe")
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        want = original(ids).logits
    plain = copy.deepcopy(original)
    patch_experts(plain)
    restored = unpatch_experts(plain, merge_lora=False)
    assert all(type(m).__name__ == "Qwen3MoeExperts" for m in restored.values())
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, want)
    model, _, replaced = _pair("qwen3_moe")  # nonzero adapters
    with torch.no_grad():
        tuned = model(ids).logits
        unpatch_experts(model)
        merged = model(ids).logits
    assert rel_err(merged, tuned) < 1e-2 and rel_err(merged, want) > 1e-2
    model.save_pretrained(tmp_path / "merged")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        assert torch.equal(again(ids).logits, merged)
    # a model loaded with the experts packed on load unpatches to its checkpoint's dtype
    _model("qwen3_moe").to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    loaded = from_pretrained(tmp_path / "bf16")
    unpatch_experts(loaded)
    assert loaded.model.layers[0].mlp.experts.gate_up_proj.dtype == torch.bfloat16
    loaded.save_pretrained(tmp_path / "bf16_merged")  # no kt_jit quantization config left behind
    assert "quantization_config" not in (tmp_path / "bf16_merged" / "config.json").read_text()
    with pytest.raises(ValueError, match="no KTJitExperts"):
        unpatch_experts(loaded)


def test_to_hf_rounds_to_bf16_keeps_layout_flags_and_is_all_or_nothing():
    """Weights that were not bf16 values come back rounded to bf16 (what the kernels used); a
    transposed module comes back transposed, with its dtype, requires_grad and training mode; a
    model with a module that cannot be restored is left unchanged."""
    from kt_jit.integrations.hf import unpatch_experts

    g = torch.Generator().manual_seed(10)
    e, h, i = 4, 64, 32
    mod = _BiasedExperts(h, i, bias=False)
    mod.gate_up_proj = nn.Parameter(torch.randn(e, h, 2 * i, generator=g), requires_grad=False)
    mod.down_proj = nn.Parameter(torch.randn(e, i, h, generator=g), requires_grad=False)
    mod.is_transposed = True
    mod.eval()
    ours = KTJitExperts.from_hf(mod, rank=8)
    back = ours.to_hf(merge_lora=False)
    assert type(back) is type(mod) and back.is_transposed and not back.training
    assert back.gate_up_proj.dtype == torch.float32 and not back.gate_up_proj.requires_grad
    assert torch.equal(back.gate_up_proj, mod.gate_up_proj.bfloat16().float())
    assert torch.equal(back.down_proj, mod.down_proj.bfloat16().float())
    with torch.no_grad():
        ours.lora.gate_lora_b.normal_(generator=g)
    merged = ours.to_hf()
    gate_a, gate_b = ours.lora.gate_lora_a.float(), ours.lora.gate_lora_b.float()
    want = mod.gate_up_proj[:, :, :i].bfloat16().float() + ours.lora.scaling * (gate_b @ gate_a).transpose(1, 2)
    assert torch.allclose(merged.gate_up_proj[:, :, :i], want, atol=1e-5)
    assert torch.equal(merged.gate_up_proj[:, :, i:], back.gate_up_proj[:, :, i:])  # up's adapter is zero
    two = nn.ModuleDict({"a": KTJitExperts.from_hf(_BiasedExperts(bias=False)), "b": KTJitExperts(ours.experts)})
    with pytest.raises(ValueError, match="not made from transformers modules"):
        unpatch_experts(two)
    assert all(isinstance(m, KTJitExperts) for m in two.values())


EXPERTS_TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def _peft_trained(peft, original: nn.Module, config=None) -> nn.Module:
    """PEFT's LoRA (``config``; by default on the attention's q_proj and on the experts, layer 1's
    down_proj with a rank and alpha of its own) on a copy of ``original`` as if trained: random
    bf16 values."""
    config = config or peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                       rank_pattern={"layers.1.mlp.experts.down_proj": 6},
                                       alpha_pattern={"layers.1.mlp.experts.down_proj": 3},
                                       target_parameters=EXPERTS_TARGETS)
    trained = peft.get_peft_model(copy.deepcopy(original), config)
    g = torch.Generator().manual_seed(12)
    with torch.no_grad():
        for n, p in trained.named_parameters():
            if "lora_" in n:
                p.copy_((torch.randn(p.shape, generator=g) * 0.1).bfloat16().float())
    return trained


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
# (PEFT 0.21 warns of pattern keys on target_parameters even where it applies them)
@pytest.mark.filterwarnings("ignore:The following (alpha|rank)_pattern keys did not match:RuntimeWarning")
def test_peft_adapter_export_and_import(arch, tmp_path):
    """save_peft_adapter writes kt_jit's experts adapters as a PEFT LoRA adapter of the original
    model: PeftModel.from_pretrained + merge_and_unload gives the weights unpatch_experts merges
    (a layer without an adapter left alone), and the same logits as the patched model; a model
    PEFT wraps saves one adapter with PEFT's parts, which PEFT computes as the model did.
    load_peft_adapter reads that adapter back (rank 2r) and the experts part of one trained with
    PEFT itself (gate and up sharing A, rank and alpha patterns; its attention LoRA left to PEFT
    with a warning), giving PEFT's merged weights."""
    peft = pytest.importorskip("peft")
    from kt_jit.integrations.hf import unpatch_experts
    from kt_jit.integrations.peft_adapter import load_peft_adapter, save_peft_adapter

    def assert_same_experts(one, two, atol):
        for a, b in zip(one.model.layers, two.model.layers, strict=True):
            for p in ("gate_up_proj", "down_proj"):
                assert torch.allclose(getattr(a.mlp.experts, p), getattr(b.mlp.experts, p), rtol=0, atol=atol)

    original = _model(arch)
    model, _, replaced = _pair(arch, rank=4)  # nonzero adapters, alpha 2r
    model.model.layers[1].mlp.experts.lora = None
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(11))
    save_peft_adapter(model, tmp_path / "ours")
    with torch.no_grad():
        ours_logits = model(ids).logits
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(original), tmp_path / "ours")
        assert rel_err(theirs(ids).logits, ours_logits) < 1e-2
    # PEFT on the attention (random B, rslora, a rank of its own) and kt_jit on the experts: one adapter
    wrapped = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
        r=2, lora_alpha=3, use_rslora=True, target_modules=["q_proj"], init_lora_weights=False))
    save_peft_adapter(wrapped, tmp_path / "wrapped")
    with torch.no_grad():
        wrapped_logits = wrapped(ids).logits
        both = peft.PeftModel.from_pretrained(copy.deepcopy(original), tmp_path / "wrapped")
        assert rel_err(both(ids).logits, wrapped_logits) < 1e-2
        assert rel_err(ours_logits, wrapped_logits) > 5e-2  # (the attention adapter matters)
    merged_ours = copy.deepcopy(model)
    unpatch_experts(merged_ours)
    assert_same_experts(theirs.merge_and_unload(), merged_ours, 1e-6)
    # back into a freshly patched model: kt_jit's own adapter (rank r, the same tensors) where the
    # file has one; in place into an adapter of that rank (an optimizer keeps its parameters)
    again = copy.deepcopy(original)
    patch_experts(again, rank=16)
    loaded = load_peft_adapter(again, tmp_path / "ours")
    assert list(loaded) == ["model.layers.0.mlp.experts"] and loaded["model.layers.0.mlp.experts"].rank == 4
    assert again.model.layers[0].mlp.experts.lora is loaded["model.layers.0.mlp.experts"]
    saved = model.model.layers[0].mlp.experts.lora
    assert all(torch.equal(a, b) for a, b in zip(loaded["model.layers.0.mlp.experts"].tensors(), saved.tensors(),
                                                 strict=True))
    target = copy.deepcopy(original)
    patch_experts(target, rank=4)
    params = list(target.model.layers[0].mlp.experts.lora.tensors())
    load_peft_adapter(target, tmp_path / "ours", in_place=True)
    assert all(a is b and torch.equal(a, c) for a, b, c in zip(
        target.model.layers[0].mlp.experts.lora.tensors(), params, saved.tensors(), strict=True))
    unpatch_experts(again)  # (layer 1 keeps its fresh adapter, whose B is zero)
    assert_same_experts(again, merged_ours, 1e-6)
    # an adapter trained with PEFT (random bf16 values; one layer's down_proj with another rank and
    # alpha; attention LoRA too)
    trained = _peft_trained(peft, original)
    trained.save_pretrained(tmp_path / "peft")
    ours = copy.deepcopy(original)
    patch_experts(ours, lora=False)
    with pytest.warns(UserWarning, match="only the experts' adapters were loaded; 4 other tensors .*q_proj.lora_A"):
        load_peft_adapter(ours, tmp_path / "peft")
    unpatch_experts(ours)
    assert_same_experts(trained.merge_and_unload(), ours, 1e-5)
    # refused: DoRA, one parameter of a module only, nothing of this model, shapes of another model
    import json

    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    fresh = copy.deepcopy(original)
    patch_experts(fresh)
    for change, why in (({"use_dora": True}, "without DoRA"),
                        ({"target_parameters": ["mlp.experts.gate_up_proj"]}, "but not the module's other"),
                        ({"target_parameters": ["moe.gate_up_proj", "moe.down_proj"]}, "of a KTJitExperts module"),
                        ({"r": 5}, "expected")):
        (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps(cfg | change))
        with pytest.raises(ValueError, match=why):
            load_peft_adapter(fresh, tmp_path / "peft")
    with pytest.raises(ValueError, match="no KTJitExperts"):
        save_peft_adapter(original, tmp_path / "none")


@pytest.mark.filterwarnings("ignore:The following (alpha|rank)_pattern keys did not match:RuntimeWarning")
def test_peft_model_from_adapter_applies_both_parts(tmp_path):
    """peft_model_from_adapter on a freshly patched model: an adapter PEFT trained on the original
    model (attention and experts) computes what PEFT computes there, frozen, without a warning;
    the result saves one combined adapter, which loads again trainable (gradients reach PEFT's and
    the experts' adapters); an experts-only adapter gives the model itself; an adapter on the Hub
    (here its cache) is found by its repository id, and one in a folder of a repository or a
    directory by its subfolder."""
    import warnings

    peft = pytest.importorskip("peft")
    from kt_jit.integrations.peft_adapter import peft_model_from_adapter, save_peft_adapter

    original = _model("qwen3_moe")
    trained = _peft_trained(peft, original)
    trained.save_pretrained(tmp_path / "peft")
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        expected = trained(ids).logits

    def patched() -> nn.Module:
        model = copy.deepcopy(original)
        patch_experts(model, lora=False)
        return model

    with warnings.catch_warnings():
        for category in (UserWarning, RuntimeWarning):
            warnings.simplefilter("error", category)
        served = peft_model_from_adapter(patched(), tmp_path / "peft")
    assert isinstance(served, peft.PeftModel) and not any(p.requires_grad for p in served.parameters())
    with torch.no_grad():
        assert rel_err(served(ids).logits, expected) < 1e-2
    served.save_pretrained(tmp_path / "again")  # (tracked: PEFT's part and the experts')
    with torch.no_grad():
        assert rel_err(peft.PeftModel.from_pretrained(copy.deepcopy(original), tmp_path / "again")(ids).logits,
                       expected) < 1e-2
    tuned = peft_model_from_adapter(patched(), tmp_path / "again", is_trainable=True)
    _loss(tuned, ids).backward()
    adapters = {n: p for n, p in tuned.named_parameters() if "lora" in n}
    assert all(p.requires_grad == ("lora" in n) for n, p in tuned.named_parameters())
    assert adapters["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"].grad.any()
    assert all(p.grad.any() for p in moe_lora_parameters(tuned))
    with torch.no_grad():
        assert rel_err(tuned(ids).logits, expected) < 1e-2
    model, _, _ = _pair("qwen3_moe", rank=4)
    save_peft_adapter(model, tmp_path / "experts")
    fresh = patched()
    assert peft_model_from_adapter(fresh, tmp_path / "experts") is fresh
    assert not fresh.training and not any(p.requires_grad for p in fresh.parameters())  # (as PEFT leaves it)
    assert all(torch.equal(a, b) for a, b in zip(moe_lora_parameters(fresh), moe_lora_parameters(model), strict=True))
    # a Hub repository id, from the Hub cache (as huggingface_hub lays it out; no network)
    import shutil

    snapshot = tmp_path / "hub" / "models--kt--tiny-adapter" / "snapshots" / ("0" * 40)
    shutil.copytree(tmp_path / "peft", snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    shutil.copytree(tmp_path / "peft", snapshot / "checkpoint-7")
    hub = peft_model_from_adapter(patched(), "kt/tiny-adapter", cache_dir=tmp_path / "hub", local_files_only=True)
    in_folder = peft_model_from_adapter(patched(), "kt/tiny-adapter", subfolder="checkpoint-7",
                                        cache_dir=tmp_path / "hub", local_files_only=True)
    local_folder = peft_model_from_adapter(patched(), snapshot, subfolder="checkpoint-7")
    with torch.no_grad():
        for m in (hub, in_folder, local_folder):
            assert rel_err(m(ids).logits, expected) < 1e-2
    with pytest.raises(ValueError, match="holds no checkpoint-8/adapter_config.json"):
        peft_model_from_adapter(patched(), "kt/tiny-adapter", subfolder="checkpoint-8", cache_dir=tmp_path / "hub",
                                local_files_only=True)
    with pytest.raises(ValueError, match="holds no adapter_config.json"):
        peft_model_from_adapter(patched(), tmp_path)
    with pytest.raises(ValueError, match="neither a local directory nor a Hub adapter"):
        peft_model_from_adapter(patched(), "kt/missing", cache_dir=tmp_path / "hub", local_files_only=True)
    with pytest.raises(ValueError, match="a PEFT model already"):
        peft_model_from_adapter(served, tmp_path / "peft")


@pytest.mark.filterwarnings("ignore:The following (alpha|rank)_pattern keys did not match:RuntimeWarning")
@pytest.mark.parametrize("case", ["shared_pattern", "modules_to_save", "shadowing_pattern"])
def test_peft_model_from_adapter_follows_peft_configs(case, tmp_path):
    """Adapters whose configs PEFT reads in its own ways: a pattern naming the experts and the
    attention too (kept for the attention), modules_to_save and no other targets, and (the save)
    a PEFT pattern that would match the experts' parameters (the experts' entries come first: PEFT
    takes the first match). Each computes what PEFT computes on the original model."""
    peft = pytest.importorskip("peft")
    from kt_jit.integrations.peft_adapter import peft_model_from_adapter, track_experts_adapters

    original = _model("qwen3_moe")
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(14))
    patched = copy.deepcopy(original)
    patch_experts(patched, rank=4, alpha=3.0)
    if case == "shadowing_pattern":
        wrapped = track_experts_adapters(peft.get_peft_model(patched, peft.LoraConfig(
            r=4, lora_alpha=32, target_modules=["q_proj"], alpha_pattern={r"layers\.1\..*": 4},
            init_lora_weights=False)))
        with torch.no_grad():
            for p in moe_lora_parameters(wrapped):
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(15)) * 0.1)
            expected = wrapped(ids).logits
        wrapped.save_pretrained(tmp_path / "adapter")
        served = peft.PeftModel.from_pretrained(copy.deepcopy(original), tmp_path / "adapter")
    else:
        layer1 = r"model\.layers\.1\..*"
        config = (peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], rank_pattern={layer1: 6},
                                  alpha_pattern={layer1: 32}, target_parameters=EXPERTS_TARGETS)
                  if case == "shared_pattern" else
                  peft.LoraConfig(r=4, lora_alpha=8, target_modules=[], modules_to_save=["lm_head"],
                                  target_parameters=EXPERTS_TARGETS))
        trained = _peft_trained(peft, original, config)
        if case == "modules_to_save":
            with torch.no_grad():
                trained.base_model.model.lm_head.modules_to_save["default"].weight.mul_(-1.0)
        trained.save_pretrained(tmp_path / "adapter")
        with torch.no_grad():
            expected = trained(ids).logits
        served = peft_model_from_adapter(patched, tmp_path / "adapter")
    with torch.no_grad():
        assert rel_err(served(ids).logits, expected) < 1e-2


def _per_expert_adapter(model: nn.Module, path, experts: str, attention: str | None, extra: tuple[str, ...] = (),
                        rank: int = 4, alpha: float = 8.0, changes: dict | None = None,
                        router: bool = False) -> dict[str, torch.Tensor]:
    """A LoRA adapter as PEFT wrote them for transformers 4 (per-expert ``<experts>.<e>.<proj>``
    modules, names as ``experts``' maps gate/up/down: "gate_proj,up_proj,down_proj" or "w1,w3,w2"),
    random bf16 values, on every experts module of ``model`` (``<layer>.mlp.experts`` there; Mixtral's
    ``block_sparse_moe`` in the file), ``attention`` (a projection name), the ``extra`` nn.Linear
    modules (full names) and with ``router`` the router (``gate``, an nn.Linear on transformers 4)
    too. ``changes``: {module name: rank} for modules with another rank (in rank_pattern and
    alpha_pattern, alpha 3) or None for one left out. Returns the tensors."""
    import json

    from safetensors.torch import save_file

    names = experts.split(",")
    g = torch.Generator().manual_seed(21)
    shapes: dict[str, tuple[int, int]] = {}
    for name, m in model.named_modules():
        if name.endswith("mlp.experts") and hasattr(m, "gate_up_proj"):
            e, two_i, h = m.gate_up_proj.shape
            v4 = name.replace("mlp.experts", "block_sparse_moe.experts") if names[0] == "w1" else name
            for j in range(e):
                for proj, out, k in zip(names, (two_i // 2, two_i // 2, h), (h, h, two_i // 2), strict=True):
                    shapes[f"{v4}.{j}.{proj}"] = (out, k)
            if router:
                shapes[v4.replace(".experts", ".gate")] = (e, h)
        elif isinstance(m, nn.Linear) and (name.endswith(f".{attention}") or name in extra):
            shapes[name] = (m.out_features, m.in_features)
    changes = changes or {}
    tensors = {}
    for name, (out, k) in shapes.items():
        if name in changes and changes[name] is None:
            continue
        r = changes.get(name, rank)
        tensors[f"base_model.model.{name}.lora_A.weight"] = (torch.randn(r, k, generator=g) * 0.1).bfloat16()
        tensors[f"base_model.model.{name}.lora_B.weight"] = (torch.randn(out, r, generator=g) * 0.1).bfloat16()
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / "adapter_model.safetensors", metadata={"format": "pt"})
    patterns = {name: r for name, r in changes.items() if r is not None}
    targets = sorted({n.rsplit(".", 1)[-1] for n in shapes})
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha, "target_modules": targets,
        "rank_pattern": patterns, "alpha_pattern": dict.fromkeys(patterns, 3.0), "lora_dropout": 0.0,
        "bias": "none"}))
    return tensors


def _merged(model: nn.Module, tensors: dict[str, torch.Tensor], rank: int = 4, alpha: float = 8.0,
            changes: dict | None = None) -> nn.Module:
    """A copy of the transformers 5 ``model`` with a per-expert adapter (``tensors``, see
    :func:`_per_expert_adapter`) merged into its weights in float32."""
    merged = copy.deepcopy(model)
    parts = {"gate_proj": 0, "w1": 0, "up_proj": 1, "w3": 1, "down_proj": 2, "w2": 2}
    with torch.no_grad():
        for key, a in tensors.items():
            if not key.endswith(".lora_A.weight"):
                continue
            name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            r = (changes or {}).get(name, rank)
            scale = (3.0 if r != rank or name in (changes or {}) else alpha) / r
            delta = scale * tensors[key.replace("lora_A", "lora_B")].float() @ a.float()
            module, _, proj = name.rpartition(".")
            if proj in parts and module.rpartition(".")[2].isdigit():
                experts, _, e = module.replace("block_sparse_moe", "mlp").rpartition(".")
                ex = merged.get_submodule(experts)
                i = ex.down_proj.shape[2]
                target = (ex.gate_up_proj[int(e), :i], ex.gate_up_proj[int(e), i:], ex.down_proj[int(e)])[parts[proj]]
                target += delta
            else:
                merged.get_submodule(name.replace("block_sparse_moe", "mlp")).weight += delta
    return merged


@pytest.mark.filterwarnings("ignore:The following (alpha|rank)_pattern keys did not match:RuntimeWarning")
@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "deepseek_v3"])
def test_transformers_4_per_expert_adapters(arch, tmp_path):
    """Adapters PEFT wrote for transformers 4 (one LoRA per expert and projection) load into kt_jit's
    experts adapters: the patched model computes the adapter merged into the original weights
    (also with an expert of another rank and alpha, and an expert's projection without one), which
    is what PEFT on the original model computes for Qwen3-MoE and Mixtral. peft_model_from_adapter
    gives PEFT the rest under its transformers 5 names (the router's LoRA on its weight, Mixtral's
    block_sparse_moe as mlp): for DeepSeek-V3 the shared experts' and the dense layer's gate/up/down
    LoRA too (PEFT's own conversion on the original model drops those: a target ``gate_proj``
    becomes the fused experts parameter), also after the result is saved and applied again."""
    import warnings

    peft = pytest.importorskip("peft")
    from kt_jit.integrations.peft_adapter import load_peft_adapter, peft_model_from_adapter

    original = _model(arch) if arch != "deepseek_v3" else _deepseek_v3()
    names = "w1,w3,w2" if arch == "mixtral" else "gate_proj,up_proj,down_proj"
    extra = ()
    if arch == "deepseek_v3":  # (the shared experts and the dense first layer: nn.Linear gate/up/down)
        extra = tuple(n for n, m in original.named_modules() if isinstance(m, nn.Linear)
                      and n.rpartition(".")[2] in names.split(",") and ".experts." not in n)
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(23))
    attention = "o_proj" if arch == "deepseek_v3" else "q_proj"
    tensors = _per_expert_adapter(original, tmp_path / "v4", names, attention, extra,
                                  router=arch != "deepseek_v3")  # (DeepSeek's router was no nn.Linear)
    with torch.no_grad():
        expected = _merged(original, tensors)(ids).logits
        assert rel_err(original(ids).logits, expected) > 5e-2
    def applied(path) -> nn.Module:
        """peft_model_from_adapter on a freshly patched copy of ``original``, without a warning."""
        patched = copy.deepcopy(original)
        patch_experts(patched, lora=False)
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            return peft_model_from_adapter(patched, path)

    served = applied(tmp_path / "v4")
    with torch.no_grad():
        assert rel_err(served(ids).logits, expected) < 1e-2
        if arch != "deepseek_v3":
            theirs = peft.PeftModel.from_pretrained(copy.deepcopy(original), tmp_path / "v4")
            assert rel_err(theirs(ids).logits, expected) < 1e-3
    # saved (one adapter, transformers 5 names) and applied again: the same model
    served.save_pretrained(tmp_path / "again")
    again = applied(tmp_path / "again")
    with torch.no_grad():
        assert rel_err(again(ids).logits, served(ids).logits) < 1e-6
    # an expert of another rank and alpha, one projection of another expert without a LoRA;
    # the experts' part alone (the attention's left with a warning)
    layer = "model.layers.1.block_sparse_moe" if arch == "mixtral" else "model.layers.1.mlp"
    changes = {f"{layer}.experts.2.{names.split(',')[2]}": 6, f"{layer}.experts.3.{names.split(',')[0]}": None}
    tensors = _per_expert_adapter(original, tmp_path / "mixed", names, attention, changes=changes)
    ours = copy.deepcopy(original)
    patch_experts(ours, rank=2)
    with pytest.warns(UserWarning, match="only the experts' adapters were loaded"):
        loaded = load_peft_adapter(ours, tmp_path / "mixed")
    assert loaded["model.layers.1.mlp.experts"].rank == 6
    no_attention = {k: v for k, v in tensors.items() if f".{attention}." not in k}
    with torch.no_grad():
        assert rel_err(ours(ids).logits, _merged(original, no_attention, changes=changes)(ids).logits) < 1e-2


def test_transformers_4_per_expert_adapters_refused(tmp_path):
    """Per-expert adapters that do not fit the model are refused with what is wrong, before any
    adapter changes: an expert the module does not have, a LoRA of the wrong shape, lora_A without
    lora_B, a LoRA bias, and a module given in both forms."""
    import json

    from safetensors.torch import save_file

    from kt_jit.integrations.peft_adapter import load_peft_adapter

    original = _model("qwen3_moe")
    tensors = _per_expert_adapter(original, tmp_path / "v4", "gate_proj,up_proj,down_proj", "q_proj")
    ours = copy.deepcopy(original)
    patch_experts(ours, rank=2)
    before = [lora.tensors() for lora in (m.lora for m in ours.modules() if isinstance(m, KTJitExperts))]
    key = "base_model.model.model.layers.0.mlp.experts.{}.gate_proj.lora_{}.weight"
    both = "base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight"
    for change, why in (({key.format(8, "A"): tensors[key.format(0, "A")].clone(),
                          key.format(8, "B"): tensors[key.format(0, "B")].clone()}, "is expert 8; .* has 8 experts"),
                        ({key.format(1, "A"): tensors[key.format(1, "A")][:, :32].clone()}, r"expected \(4, 64\)"),
                        ({key.format(1, "B"): None}, "lora_A/lora_B.weight missing"),
                        ({key.format(1, "B").replace("weight", "bias"): torch.zeros(64)}, "no place for"),
                        ({both: tensors[key.format(0, "A")].clone()}, "both as target_parameters")):
        broken = {k: v for k, v in (tensors | change).items() if v is not None}
        save_file(broken, tmp_path / "v4" / "adapter_model.safetensors")
        if both in change:
            cfg = json.loads((tmp_path / "v4" / "adapter_config.json").read_text())
            (tmp_path / "v4" / "adapter_config.json").write_text(json.dumps(
                cfg | {"target_parameters": EXPERTS_TARGETS}))
        with pytest.raises(ValueError, match=why):
            load_peft_adapter(ours, tmp_path / "v4")
    after = [lora.tensors() for lora in (m.lora for m in ours.modules() if isinstance(m, KTJitExperts))]
    assert all(a is b for x, y in zip(before, after, strict=True) for a, b in zip(x, y, strict=True))

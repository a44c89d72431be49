"""Benchmark a Hugging Face transformers MoE model with its experts on kt_jit against the same model
as transformers runs it (its default experts implementation), in the same run.

Model: Qwen3-30B-A3B's layer dimensions (H 2048, 128 experts of I 768, top-8, 32 heads / 4 KV
heads of 128), ``--layers`` decoder layers (default 2; 1 with ``--quick``), a 4096-token vocabulary,
random bf16 weights. Per sequence length T (one sequence): a training step (forward + backward of
the LM loss) and an inference forward under ``torch.no_grad()``. Trainable in both models: the
routers and the attention query projections (so every MoE layer's input needs its gradient, as
when PEFT adapts the attention); kt_jit's model also trains its expert LoRA adapters (rank 16),
work the transformers model does not do. ``vs_torch`` = transformers' time / kt_jit's.

    python tools/bench_hf.py [--quick] [--json PATH] [--layers N] [--quant MODE]

``--quant`` packs kt_jit's experts in that mode (default bf16); transformers keeps bf16.
"""

from __future__ import annotations

import argparse
import copy
import gc
import time

import torch
from bench_moe import timed
from benchlib import finish

from kt_jit.integrations.hf import moe_lora_parameters, patch_experts
from kt_jit.kernels.probe import bf16_peak_flops, read_bandwidth
from kt_jit.runtime.threads import default_num_threads


def build(layers: int, quant: str = "bf16"):
    """(transformers model, kt_jit-patched copy), both bf16, only routers and adapters trainable."""
    import transformers

    cfg = transformers.Qwen3MoeConfig(vocab_size=4096, hidden_size=2048, intermediate_size=6144,
                                      moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
                                      num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=4,
                                      head_dim=128, max_position_embeddings=512, norm_topk_prob=True)
    torch.manual_seed(0)
    with torch.device("cpu"):
        hf = transformers.Qwen3MoeForCausalLM(cfg).to(torch.bfloat16)
    hf.requires_grad_(False)
    ours = copy.deepcopy(hf)
    t0 = time.perf_counter()
    patch_experts(ours, rank=16, alpha=32.0, quant=quant)
    pack_s = time.perf_counter() - t0
    for model in (hf, ours):
        for name, p in model.named_parameters():
            if name.endswith(("mlp.gate.weight", "self_attn.q_proj.weight")):
                p.requires_grad_(True)
    for p in moe_lora_parameters(ours):
        p.requires_grad_(True)
    return hf, ours, pack_s, getattr(hf.config, "_experts_implementation", "eager")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 layer, T = 1 and 128")
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--quant", default="bf16", help="kt_jit's expert storage (transformers keeps bf16)")
    args = ap.parse_args()
    threads = default_num_threads()
    torch.set_num_threads(threads)
    layers = args.layers or (1 if args.quick else 2)
    seqs = [1, 128] if args.quick else [1, 16, 128, 512]
    bw, peak = read_bandwidth(1 << 30), bf16_peak_flops()
    hf, ours, pack_s, impl = build(layers, args.quant)
    print(f"kt_jit ({args.quant} experts) vs transformers ({impl} experts, bf16): Qwen3-30B-A3B dims, {layers} "
          f"layer(s), threads={threads}; patch_experts {pack_s:.1f} s")
    print(f"{'T':>5} {'pass':>9} {'kt_jit ms':>10} {'transformers ms':>16} {'vs_torch':>9}")
    rows = []
    g = torch.Generator().manual_seed(1)
    for t in seqs:
        ids = torch.randint(0, 4096, (1, t), generator=g)

        def train(model, ids=ids):
            model.zero_grad(set_to_none=True)
            model(ids, labels=ids).loss.backward()

        def infer(model, ids=ids):
            with torch.no_grad():
                model(ids)

        for kind, fn in (("train", train), ("inference", infer)):
            med = timed({"ours": lambda fn=fn: fn(ours), "hf": lambda fn=fn: fn(hf)}, 3 if args.quick else 5,
                        0.5 if args.quick else 2.0)
            ratio = med["hf"] / med["ours"]
            print(f"{t:>5} {kind:>9} {med['ours'] * 1e3:>10.1f} {med['hf'] * 1e3:>16.1f} {ratio:>8.2f}x", flush=True)
            rows.append({"name": f"hf qwen3-30b-a3b L{layers} {args.quant} T={t} {kind}", "ms": med["ours"] * 1e3,
                         "vs_torch": ratio, "torch_ms": med["hf"] * 1e3, "experts_implementation": impl})
        gc.collect()
    rows.append({"name": "patch_experts (pack all layers)", "ms": pack_s * 1e3})
    return finish(rows, args.json, bw, peak, threads)


if __name__ == "__main__":
    raise SystemExit(main())

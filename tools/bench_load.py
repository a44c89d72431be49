"""Loading a transformers MoE checkpoint with its experts packed: peak anonymous memory and wall
time of ``kt_jit.integrations.hf_loading.from_pretrained`` (bf16 and FP8 checkpoints) against
transformers' ``from_pretrained`` followed by ``patch_experts`` (bf16 only: transformers' own FP8
loading needs accelerate and dequantizes the whole model).

    python tools/bench_load.py [--quick] [--layers 6] [--quant int4_kgroup] [--json PATH]

The checkpoint has Qwen3-30B-A3B's layer sizes (H 2048, I 768, 128 experts, top-8; a 1,024-token
vocabulary) and ``--layers`` layers (``--quick``: 2), random weights, one shard per layer. Each
load runs in a fresh process; its ``RssAnon`` is sampled every 5 ms. Rows: ``name``, ``ms`` (the
load), ``peak_anon_gb``, ``experts_gb`` (the packed experts' size, what must stay resident).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
from bench_pack import fp8_blocks
from benchlib import mark_fp8_checkpoint, write_rows

H, I, E, VOCAB = 2048, 768, 128, 1024

_LOADER = """
import sys, torch, transformers
from kt_jit.integrations.hf import KTJitExperts, patch_experts
from kt_jit.integrations.hf_loading import from_pretrained
path, how, quant = sys.argv[1:4]
transformers.utils.logging.disable_progress_bar()
if how == "kt_jit":
    model = from_pretrained(path, quant=quant, group_size=128)
else:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    patch_experts(model, quant=quant, group_size=128)
print(sum(m.experts.nbytes for m in model.modules() if isinstance(m, KTJitExperts)))
"""


def write_checkpoint(path: str, layers: int, fp8: bool) -> None:
    """A Qwen3-MoE checkpoint as transformers saves it (per-expert keys), one shard per layer."""
    import transformers
    from safetensors.torch import save_file

    cfg = transformers.Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=H, moe_intermediate_size=I, intermediate_size=I,
                                      num_experts=E, num_experts_per_tok=8, num_hidden_layers=layers,
                                      num_attention_heads=32, num_key_value_heads=4, head_dim=128)
    cfg.save_pretrained(path)
    if fp8:
        mark_fp8_checkpoint(path)
    g = torch.Generator().manual_seed(0)
    index: dict[str, str] = {}

    def matrix(n: int, k: int) -> torch.Tensor:
        return (torch.randn(n, k, generator=g) * 0.02).bfloat16()

    shards = [{"model.embed_tokens.weight": matrix(VOCAB, H), "lm_head.weight": matrix(VOCAB, H),
               "model.norm.weight": torch.ones(H, dtype=torch.bfloat16)}]
    for li in range(layers):
        p = f"model.layers.{li}"
        shard = {f"{p}.input_layernorm.weight": torch.ones(H, dtype=torch.bfloat16),
                 f"{p}.post_attention_layernorm.weight": torch.ones(H, dtype=torch.bfloat16),
                 f"{p}.self_attn.q_norm.weight": torch.ones(128, dtype=torch.bfloat16),
                 f"{p}.self_attn.k_norm.weight": torch.ones(128, dtype=torch.bfloat16),
                 f"{p}.mlp.gate.weight": matrix(E, H)}
        projections = {f"{p}.self_attn.q_proj.weight": (4096, H), f"{p}.self_attn.k_proj.weight": (512, H),
                       f"{p}.self_attn.v_proj.weight": (512, H), f"{p}.self_attn.o_proj.weight": (H, 4096)}
        for j in range(E):
            for name, shape in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
                projections[f"{p}.mlp.experts.{j}.{name}.weight"] = shape
        for key, shape in projections.items():
            w = matrix(*shape)
            if fp8:
                q, scale = fp8_blocks(w[None])
                shard[key], shard[key + "_scale_inv"] = q[0], scale[0]
            else:
                shard[key] = w
        shards.append(shard)
    for n, shard in enumerate(shards):
        name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
        index.update(dict.fromkeys(shard, name))
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": index}, f)


def measure(path: str, how: str, quant: str) -> tuple[float, float, int]:
    """(seconds, peak RssAnon in bytes, packed experts' bytes) of one load in a fresh process."""
    t0 = time.perf_counter()
    err = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen([sys.executable, "-c", _LOADER, path, how, quant], stdout=subprocess.PIPE, stderr=err,
                            text=True)
    peak = 0
    while proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/status") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        peak = max(peak, int(line.split()[1]) * 1024)
        except OSError:
            pass
        time.sleep(0.005)
    out = proc.stdout.read()
    if proc.returncode:
        err.seek(0)
        raise RuntimeError(f"loading {path} ({how}) failed with exit code {proc.returncode}:\n{err.read()[-3000:]}")
    return time.perf_counter() - t0, peak, int(out.split()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 layers")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--quant", default="int4_kgroup")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    layers = 2 if args.quick else args.layers
    rows = []
    print(f"{layers} layers of Qwen3-30B-A3B's sizes, experts -> {args.quant}")
    print(f"{'checkpoint':10} {'loader':34} {'s':>7} {'peak anon GB':>13} {'experts GB':>11}")
    with tempfile.TemporaryDirectory() as tmp:
        for source in ("bf16", "fp8"):
            path = os.path.join(tmp, source)
            write_checkpoint(path, layers, source == "fp8")
            loaders = ("kt_jit", "transformers") if source == "bf16" else ("kt_jit",)
            for how in loaders:
                measure(path, how, args.quant)  # (page cache warm, kernels compiled)
                secs, peak, packed = measure(path, how, args.quant)
                label = "hf_loading.from_pretrained" if how == "kt_jit" else "from_pretrained + patch_experts"
                rows.append({"name": f"{source} {label} -> {args.quant}", "ms": secs * 1e3,
                             "peak_anon_gb": peak / 1e9, "experts_gb": packed / 1e9})
                print(f"{source:10} {label:34} {secs:7.1f} {peak / 1e9:13.2f} {packed / 1e9:11.2f}")
    return write_rows(rows, args.json)


if __name__ == "__main__":
    raise SystemExit(main())

"""Loading a transformers MoE checkpoint with its experts packed: peak anonymous memory and wall
time of ``kt_jit.integrations.hf_loading.from_pretrained`` (bf16 and FP8 checkpoints, and the
checkpoint ``kt_jit.integrations.hf_saving.save_pretrained`` writes, whose packed experts are
memory-mapped) against transformers' ``from_pretrained`` followed by ``patch_experts`` (bf16 only:
transformers' own FP8 loading needs accelerate and dequantizes the whole model).

    python tools/bench_load.py [--quick] [--layers 6] [--quant int4_kgroup] [--json PATH]

The checkpoint has Qwen3-30B-A3B's layer sizes (H 2048, I 768, 128 experts, top-8; a 1,024-token
vocabulary) and ``--layers`` layers (``--quick``: 2), random weights, one shard per layer. Each
load runs in a fresh process; its ``RssAnon`` is sampled every 5 ms (memory-mapped experts are
page cache, ``RssFile``, not counted). Rows: ``name``, ``ms`` (the process: imports, load and one
forward), ``load_ms`` (the ``from_pretrained`` call, and ``patch_experts``), ``peak_anon_gb``,
``experts_gb`` (the packed experts' size, what must stay resident),
``first_forward_ms`` (a 16-token no-grad forward right after the load: mapped experts are read
then, from the page cache here).
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
import sys, time, torch, transformers
from kt_jit.integrations.hf import KTJitExperts, patch_experts
from kt_jit.integrations.hf_loading import from_pretrained
path, how, quant = sys.argv[1:4]
transformers.utils.logging.disable_progress_bar()
t_load = time.perf_counter()
if how == "kt_jit":
    model = from_pretrained(path, quant=quant, group_size=128)
else:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    patch_experts(model, quant=quant, group_size=128)
load_ms = (time.perf_counter() - t_load) * 1e3
if len(sys.argv) > 4:  # (write the packed checkpoint)
    from kt_jit.integrations.hf_saving import save_pretrained
    save_pretrained(model, sys.argv[4])
t0 = time.perf_counter()
with torch.no_grad():
    model(torch.arange(16)[None] % model.config.vocab_size)
print(load_ms, (time.perf_counter() - t0) * 1e3)
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


def measure(path: str, how: str, quant: str, save_to: str | None = None) -> tuple[float, float, int, float, float]:
    """(seconds, peak RssAnon in bytes, packed experts' bytes, the load's ms, first forward's ms) of
    one load in a fresh process (which then writes kt_jit's packed checkpoint to ``save_to`` if given)."""
    t0 = time.perf_counter()
    err = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen([sys.executable, "-c", _LOADER, path, how, quant, *([save_to] if save_to else [])],
                            stdout=subprocess.PIPE, stderr=err, text=True)
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
    load_ms, first_ms, packed = out.split()[-3:]
    return time.perf_counter() - t0, peak, int(packed), float(load_ms), float(first_ms)


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
    print(f"{'checkpoint':10} {'loader':34} {'s':>6} {'load s':>7} {'peak anon GB':>13} {'experts GB':>11} "
          f"{'1st fwd ms':>11}")
    with tempfile.TemporaryDirectory() as tmp:
        packed_path = os.path.join(tmp, "packed")
        for source in ("bf16", "fp8", "packed"):
            path = os.path.join(tmp, source)
            if source != "packed":
                write_checkpoint(path, layers, source == "fp8")
            loaders = ("kt_jit", "transformers") if source == "bf16" else ("kt_jit",)
            for how in loaders:
                # (page cache warm, kernels compiled; the first kt_jit load of bf16 writes the packed one)
                measure(path, how, args.quant, packed_path if (source, how) == ("bf16", "kt_jit") else None)
                secs, peak, packed, load_ms, first_ms = measure(path, how, args.quant)
                label = "hf_loading.from_pretrained" if how == "kt_jit" else "from_pretrained + patch_experts"
                rows.append({"name": f"{source} {label} -> {args.quant}", "ms": secs * 1e3, "load_ms": load_ms,
                             "peak_anon_gb": peak / 1e9, "experts_gb": packed / 1e9, "first_forward_ms": first_ms})
                print(f"{source:10} {label:34} {secs:6.1f} {load_ms / 1e3:7.2f} {peak / 1e9:13.2f} "
                      f"{packed / 1e9:11.2f} {first_ms:11.1f}")
    return write_rows(rows, args.json)


if __name__ == "__main__":
    raise SystemExit(main())

"""Packing and online quantization of expert weights: the JIT packer (kernels/packer.py) against the
torch path it replaced (kernels/quant.py, and for FP8 sources torch's dequantization first), on
DeepSeek-V3-sized experts (H 7168, I 2048), from bf16 and from FP8 (e4m3, 128 x 128 block scales)
sources, for every quantization mode. Also ``MoEExperts.from_checkpoint`` on a safetensors file in
the page cache (what loading a layer costs once the file has been read from disk), and the same
experts in a one-layer model through ``hf_loading.from_pretrained`` (bf16 and FP8 checkpoints).

    python tools/bench_pack.py [--quick] [--experts 8] [--json PATH]

Rows: ``name`` (source/mode/path), ``ms`` per layer of ``--experts`` experts (``MoEExperts``
built, its memory allocated and first touched), ``kernel_ms`` (the packer's launches alone, into
tensors already touched), ``experts_per_s``, ``vs_torch`` (torch path / ``ms``), ``of_floor``
(floor / ``kernel_ms``; floor = bytes read and written / the read bandwidth measured in the same
run).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile

import torch
from benchlib import finish, mark_fp8_checkpoint

import kt_jit
from kt_jit.kernels.probe import ReadProbe, bf16_peak_flops, median_seconds
from kt_jit.moe import weights
from kt_jit.moe.checkpoint import dequantize_fp8_blocks
from kt_jit.runtime.threads import default_num_threads

H, I = 7168, 2048
MODES = ("bf16", "int8", "int4", "int4_1", "int4_kgroup", "int4_1kgroup")
GROUP = 128


def fp8_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [E, N, K]`` as e4m3 with 128 x 128 block scales (DeepSeek-V3's format)."""
    e, n, k = w.shape
    s = w.float().view(e, n // 128, 128, k // 128, 128).abs().amax((2, 4)) / 448.0
    q = (w.float().view(e, n // 128, 128, k // 128, 128) / s[:, :, None, :, None]).to(torch.float8_e4m3fn)
    return q.view(e, n, k), s


def expert_tensors(prefix: str, source: str, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                   f8: dict) -> dict[str, torch.Tensor]:
    """The experts as a checkpoint stores them under ``prefix``: per-expert ``gate_proj/up_proj/
    down_proj`` weights, bf16 (``source`` "bf16") or FP8 with their ``weight_scale_inv`` (from
    ``f8``, :func:`fp8_blocks` of each stacked matrix by name)."""
    tensors = {}
    for j in range(gate.shape[0]):
        for name, t in (("gate_proj", gate), ("up_proj", up), ("down_proj", down)):
            key = f"{prefix}.experts.{j}.{name}.weight"
            if source == "bf16":
                tensors[key] = t[j].contiguous()
            else:
                q, s = f8[name.split("_")[0]]
                tensors[key], tensors[key + "_scale_inv"] = q[j].contiguous(), s[j].contiguous()
    return tensors


def _from_pretrained_rows(tmp: str, e: int, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                          f8: dict, reps: int) -> list[dict]:
    """``kt_jit.integrations.hf_loading.from_pretrained`` of a one-layer Qwen3-MoE with these experts
    (plus a small attention block and vocabulary), from bf16 and from FP8 checkpoints in the page
    cache: what transformers' loading adds to ``from_checkpoint``. Skipped without transformers."""
    try:
        import transformers
    except ImportError:
        print("from_pretrained rows skipped: transformers is not installed")
        return []

    from safetensors.torch import save_file

    from kt_jit.integrations.hf_loading import from_pretrained

    cfg = transformers.Qwen3MoeConfig(vocab_size=256, hidden_size=H, moe_intermediate_size=I, intermediate_size=I,
                                      num_experts=e, num_experts_per_tok=min(e, 2), num_hidden_layers=1,
                                      num_attention_heads=8, num_key_value_heads=2, head_dim=128)
    g = torch.Generator().manual_seed(1)
    others = {"model.embed_tokens.weight": (256, H), "lm_head.weight": (256, H), "model.norm.weight": (H,),
              "model.layers.0.input_layernorm.weight": (H,), "model.layers.0.post_attention_layernorm.weight": (H,),
              "model.layers.0.self_attn.q_norm.weight": (128,), "model.layers.0.self_attn.k_norm.weight": (128,),
              "model.layers.0.mlp.gate.weight": (e, H)}
    attention = {"q_proj": (1024, H), "k_proj": (256, H), "v_proj": (256, H), "o_proj": (H, 1024)}
    rows = []
    for source in ("bf16", "fp8"):
        tensors = {k: (torch.randn(shape, generator=g) * 0.02).bfloat16() for k, shape in others.items()}
        for name, shape in attention.items():
            w = (torch.randn(shape, generator=g) * 0.02).bfloat16()
            key = f"model.layers.0.self_attn.{name}.weight"
            if source == "bf16":
                tensors[key] = w
            else:
                q, s = fp8_blocks(w[None])
                tensors[key], tensors[key + "_scale_inv"] = q[0], s[0]
        tensors |= expert_tensors("model.layers.0.mlp", source, gate, up, down, f8)
        path = os.path.join(tmp, "hf_" + source)
        cfg.save_pretrained(path)
        if source == "fp8":
            mark_fp8_checkpoint(path)
        save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        del tensors
        transformers.utils.logging.disable_progress_bar()
        for quant in ("bf16", "int4_kgroup"):
            from_pretrained(path, quant=quant, group_size=GROUP)  # (page cache, compile)
            ours = median_seconds(lambda: from_pretrained(path, quant=quant, group_size=GROUP), reps)  # noqa: B023
            rows.append({"name": f"from_pretrained {source} -> {quant}", "ms": ours * 1e3, "experts_per_s": e / ours})
            print(f"{'hf ' + source:6} {quant:13} {ours * 1e3:8.1f} {'':9} {'':9} {'':8} {e / ours:10.1f}")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="4 experts, one repeat of the torch path")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    e = 4 if args.quick else args.experts
    reps, torch_reps = (3, 1) if args.quick else (5, 2)
    g = torch.Generator().manual_seed(0)
    gate, up = ((torch.randn(e, I, H, generator=g) * 0.02).bfloat16() for _ in range(2))
    down = (torch.randn(e, H, I, generator=g) * 0.02).bfloat16()
    f8 = {name: fp8_blocks(t) for name, t in (("gate", gate), ("up", up), ("down", down))}
    probe = ReadProbe(1 << 30)
    bws: list[float] = []
    rows: list[dict] = []
    print(f"{e} experts of H {H}, I {I}; {default_num_threads()} threads")
    print(f"{'source':6} {'mode':13} {'JIT ms':>8} {'kernel ms':>9} {'torch ms':>9} {'vs torch':>8} {'experts/s':>10} "
          f"{'of floor':>8}")

    def torch_path(source: str, quant: str) -> None:
        if source == "fp8":
            parts = [dequantize_fp8_blocks(q, s, (128, 128)) for q, s in f8.values()]
        else:
            parts = [gate, up, down]
        weights._pack(torch.cat(parts[:2], dim=1), quant, GROUP)
        weights._pack(parts[2], quant, GROUP)

    def jit_path(source: str, quant: str) -> kt_jit.MoEExperts:
        if source == "fp8":
            def chunk(sl: slice):
                return tuple([kt_jit.kernels.packer.Fp8Weight(q[j], s[j], (128, 128)) for j in range(sl.start, sl.stop)]
                             for q, s in f8.values())
            return kt_jit.MoEExperts._pack_chunks(e, H, I, chunk, quant, GROUP)
        return kt_jit.MoEExperts.from_tensors(gate, up, down, quant=quant, group_size=GROUP)

    def kernels_only(source: str, quant: str, packed: kt_jit.MoEExperts) -> None:
        """The packer's launches into ``packed``'s tensors (allocated and faulted in already)."""
        gs = GROUP if weights.QUANT_MODES[quant][1] else 0
        t = packed.tensors
        if source == "fp8":
            fp8 = [[kt_jit.kernels.packer.Fp8Weight(q[j], s[j], (128, 128)) for j in range(e)] for q, s in f8.values()]
            gu, dn = [[g, u] for g, u in zip(fp8[0], fp8[1], strict=True)], [[d] for d in fp8[2]]
        else:
            gu, dn = [[gate[j], up[j]] for j in range(e)], [[down[j]] for j in range(e)]
        for name, experts in (("gate_up", gu), ("down", dn)):
            kt_jit.kernels.packer.pack_into(t[name], t.get(f"{name}_scale"), t.get(f"{name}_zero"), 0, experts, gs)

    for source in ("bf16", "fp8"):
        src_bytes = 3 * e * H * I * (2 if source == "bf16" else 1)
        for quant in MODES:
            packed = jit_path(source, quant)  # (compiles)
            bws.append(probe())
            ours = median_seconds(lambda: jit_path(source, quant), reps)  # noqa: B023
            bws.append(probe())
            kern = median_seconds(lambda p=packed: kernels_only(source, quant, p), reps)  # noqa: B023
            bws.append(probe())
            ref = median_seconds(lambda: torch_path(source, quant), torch_reps)  # noqa: B023
            bw = statistics.median(bws[-3:])
            floor = (src_bytes + packed.nbytes) / bw
            packed = None  # (freed before the next mode's)
            row = {"name": f"{source} -> {quant}", "ms": ours * 1e3, "kernel_ms": kern * 1e3, "torch_ms": ref * 1e3,
                   "vs_torch": ref / ours, "experts_per_s": e / ours, "of_floor": floor / kern, "bw_gbs": bw / 1e9}
            rows.append(row)
            print(f"{source:6} {quant:13} {ours * 1e3:8.1f} {kern * 1e3:9.1f} {ref * 1e3:9.0f} {ref / ours:8.1f} "
                  f"{e / ours:10.1f} {floor / kern:8.2f}")

    # from_checkpoint on files in the page cache: per-expert keys, bf16 and FP8 with scales
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        for source in ("bf16", "fp8"):
            tensors = expert_tensors("m", source, gate, up, down, f8)
            path = os.path.join(tmp, source)
            os.makedirs(path)
            save_file(tensors, os.path.join(path, "model.safetensors"))
            del tensors
            for quant in ("bf16", "int8", "int4_kgroup"):
                kt_jit.MoEExperts.from_checkpoint(path, "m", quant=quant, group_size=GROUP)  # (page cache, compile)
                ours = median_seconds(
                    lambda: kt_jit.MoEExperts.from_checkpoint(path, "m", quant=quant, group_size=GROUP),  # noqa: B023
                    reps)
                rows.append({"name": f"checkpoint {source} -> {quant}", "ms": ours * 1e3, "experts_per_s": e / ours})
                print(f"{'ckpt ' + source:6} {quant:13} {ours * 1e3:8.1f} {'':9} {'':9} {'':8} {e / ours:10.1f}")
        rows += _from_pretrained_rows(tmp, e, gate, up, down, f8, reps)
    bw = statistics.median(bws)
    print(f"read bandwidth {bw / 1e9:.1f} GB/s (median of the probes)")
    return finish(rows, args.json, bw, bf16_peak_flops(), default_num_threads())


if __name__ == "__main__":
    raise SystemExit(main())

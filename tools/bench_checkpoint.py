"""A gradient-checkpointed training step of one MoE layer with ``kt_jit.moe_checkpoint_context``
(the MoE's activations kept through the checkpoint, no second MoE forward in the backward) against
plain non-reentrant checkpointing and against no checkpointing, on one layer of a real model's
size (bf16 experts, rank-16 adapters).

    python tools/bench_checkpoint.py [--quick] [--shape qwen3-30b-a3b] [--qlens 16,128,512] [--json PATH]

The checkpointed region is a layer's MoE half: an RMS norm, ``moe_sft``, the residual add. Each
step runs on one of 8 routings in turn, its caches flushed first; the variants alternate order
round by round (tools/bench_moe.py ``timed``). ``--json`` rows: ``name`` (shape/qlen/variant),
``ms`` (median step), ``vs_checkpoint`` (plain checkpointing's time over this variant's, from the
same rounds) and ``kept_mb`` (what the variant keeps from the forward to the backward beyond
the region's input: the MoE's saved activations, and with the context its output).
"""

from __future__ import annotations

import torch
from bench_moe import RANK, Layer, layer_bench_args, step_batches, time_steps
from benchlib import write_rows

import kt_jit


def _region(layer: Layer):
    def fn(h, ids, w):
        a = h * torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(h.dtype)
        return h.float() + kt_jit.moe_sft(a, ids, w, layer.experts, layer.lora)

    return fn


def _step(fn, layer: Layer | None, variant: str):
    def run(x, ids, w, dout) -> None:
        for p in layer.lora.parameters() if layer is not None else ():  # (optimizer.zero_grad())
            p.grad = None
        h = x.clone().requires_grad_()
        if variant == "none":
            out = fn(h, ids, w)
        elif variant == "checkpoint":
            out = torch.utils.checkpoint.checkpoint(fn, h, ids, w, use_reentrant=False)
        else:
            out = torch.utils.checkpoint.checkpoint(fn, h, ids, w, use_reentrant=False,
                                                    context_fn=kt_jit.moe_checkpoint_context)
        out.backward(dout)

    return run


def _kept_mb(fn, variant: str, x, ids, w) -> float:
    """MB the forward leaves for the backward in saved MoE activations (with the context, and its
    output, which it keeps for a recompute that might reach it)."""
    import kt_jit.moe.sft as core

    if variant == "checkpoint":
        return 0.0
    seen = []
    real = core.forward

    def spy(*a, **k):
        out, saved = real(*a, **k)
        seen.append(saved.block.nbytes + (out.nbytes if variant == "context" else 0))
        return out, saved

    core.forward = spy
    try:
        _step(fn, None, variant)(x, ids, w, torch.zeros(x.shape[0], x.shape[1]))
    finally:
        core.forward = real
    return seen[0] / 1e6


def main() -> int:
    args, (e, h, i, k), qlens = layer_bench_args(__doc__, "16,128,512", [16, 128])
    layer = Layer(e, h, i, RANK)
    fn = _region(layer)
    variants = ("none", "checkpoint", "context")
    rows = []
    print(f"{args.shape} bf16, rank {RANK}: a checkpointed MoE layer step (median ms; vs_checkpoint = plain "
          "checkpointing / this)")
    print(f"{'qlen':>5} {'variant':<11} {'ms':>9} {'vs_checkpoint':>14} {'kept MB':>8}")
    for qlen in qlens:
        batches = step_batches(qlen, k, e, h)
        swaps = (("checkpoint", "none"), ("checkpoint", "context"))
        med, paired = time_steps({v: _step(fn, layer, v) for v in variants}, batches, swaps, args.quick,
                                 6 if args.quick else 12)
        for v in variants:
            ratio = 1.0 if v == "checkpoint" else paired["checkpoint", v]
            kept = _kept_mb(fn, v, *batches[0][:3])
            print(f"{qlen:>5} {v:<11} {med[v] * 1e3:>9.2f} {ratio:>14.3f} {kept:>8.1f}")
            rows.append({"name": f"{args.shape}/bf16/qlen{qlen}/{v}", "ms": med[v] * 1e3, "vs_checkpoint": ratio,
                         "kept_mb": kept})
    return write_rows(rows, args.json)


if __name__ == "__main__":
    raise SystemExit(main())

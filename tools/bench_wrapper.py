"""What ``KTMoEWrapper`` (KTransformers' wrapper interface) costs on top of kt_jit's operator it calls:
a training step (``forward_sft`` + ``backward`` against ``MoESFTOp.forward`` + ``.backward``; "step+bufs": with
gradient buffers given to ``init_lora_weights``) and an
inference forward (``KTMoEWrapper(mode="inference").forward`` against ``moe_sft`` under no_grad), on
one layer of a real model's size, bf16 with rank-16 adapters. The seeds ask for the wrapper to be
within 5% of the direct calls.

    python tools/bench_wrapper.py [--quick] [--shape qwen3-30b-a3b] [--qlens 1,16,128] [--json PATH]

Each pass runs on one of 8 routings in turn, its caches flushed first; the two sides of a pair
alternate order round by round (tools/bench_moe.py ``timed``). ``--json`` rows: ``name``
(shape/qlen/pass), ``ms`` (median), ``vs_direct`` (the direct call's time over the wrapper's, from
the same rounds).
"""

from __future__ import annotations

import torch
from bench_moe import RANK, Layer, layer_bench_args, step_batches, time_steps
from benchlib import write_rows

import kt_jit


def main() -> int:
    args, (e, h, i, k), qlens = layer_bench_args(__doc__, "1,16,128", [1, 16])
    layer = Layer(e, h, i, RANK)
    op = kt_jit.MoESFTOp(layer.experts, layer.lora)
    common = dict(layer_idx=0, num_experts=e, num_experts_per_tok=k, hidden_size=h, moe_intermediate_size=i,
                  num_gpu_experts=0, cpuinfer_threads=2, threadpool_count=1, weight_path=None,
                  chunked_prefill_size=max(qlens), lora_rank=RANK, lora_alpha=2.0 * RANK)

    def sft_wrapper(*grad_buffers):
        wrapper = kt_jit.KTMoEWrapper(mode="sft", method="AMXBF16_SFT", **common)
        wrapper.load_weights_from_tensors(layer.gate, layer.up, layer.down)
        # (bf16 CPU adapters: read in place, as the op reads them)
        wrapper.init_lora_weights(*layer.lora.tensors(), *grad_buffers)
        return wrapper

    def train_step(forward, backward):
        def step(x, ids, w, dout):
            forward(x, ids, w)
            backward(dout)
        return step

    sft = sft_wrapper()
    # kt-kernel's other form: gradient buffers the caller owns, which every backward overwrites
    sft_bufs = sft_wrapper(*(torch.zeros_like(t) for t in layer.lora.tensors()))
    infer = kt_jit.KTMoEWrapper(mode="inference", method="BF16", **common)
    infer.load_weights_from_tensors(layer.gate, layer.up, layer.down)
    op_step = train_step(op.forward, op.backward)
    wrapper_step = train_step(sft.forward_sft, sft.backward)
    wrapper_bufs_step = train_step(sft_bufs.forward_sft, sft_bufs.backward)

    def direct_infer(x, ids, w, dout):
        with torch.no_grad():
            kt_jit.moe_sft(x, ids, w, layer.experts, out_dtype=torch.bfloat16)

    rows = []
    print(f"{args.shape} bf16, rank {RANK}: the wrapper against the direct calls (median ms; "
          "vs_direct = direct / wrapper)")
    print(f"{'qlen':>5} {'pass':<10} {'direct ms':>10} {'wrapper ms':>11} {'vs_direct':>10}")
    for qlen in qlens:
        batches = step_batches(qlen, k, e, h)
        steps = {"step direct": op_step, "step wrapper": wrapper_step, "step+bufs wrapper": wrapper_bufs_step,
                 "infer direct": direct_infer, "infer wrapper": lambda x, ids, w, dout: infer.forward(x, ids, w)}
        pairs = (("step direct", "step wrapper"), ("step direct", "step+bufs wrapper"),
                 ("infer direct", "infer wrapper"))
        med, paired = time_steps(steps, batches, pairs, args.quick, 8 if args.quick else 20)
        for pass_name in ("step", "step+bufs", "infer"):
            side = pass_name.split("+")[0]
            direct, wrapper = med[f"{side} direct"], med[f"{pass_name} wrapper"]
            ratio = paired[f"{side} direct", f"{pass_name} wrapper"]  # (direct's time over the wrapper's)
            print(f"{qlen:>5} {pass_name:<10} {direct * 1e3:>10.3f} {wrapper * 1e3:>11.3f} {ratio:>10.3f}")
            rows.append({"name": f"{args.shape}/bf16/qlen{qlen}/{pass_name} wrapper", "ms": wrapper * 1e3,
                         "direct_ms": direct * 1e3, "vs_direct": ratio})
    return write_rows(rows, args.json)


if __name__ == "__main__":
    raise SystemExit(main())

"""Measure the per-CPU schedule values (kernels/gemm.HostTuning) on this host and print the
KT_JIT_TUNING setting that wins.

kt_jit picks a few blocking values of the transposed GEMMs by the CPU's L1 data cache size (two
CPUs measured: Zen 4 and Zen 5). On another CPU other values may be faster; this script finds out.
For each value it times the MoE backward (LoRA rank 16, random top-k routing as in bench_moe.py)
at the token counts whose groups that value shapes, with every candidate in one process: the
candidates take turns round by round (in alternating order), each under its own KT_JIT_TUNING (which
keys its kernels and launch plans), and each gets the median of its passes. A candidate replaces
the default only when the median of its per-round time ratios beats it by more than ``--margin``.

    python tools/tune.py [--quick] [--json PATH] [--shape qwen3-30b-a3b] [--rounds N] [--margin 0.02]

Then run with the printed setting, e.g. ``KT_JIT_TUNING=stream_group_blocks=16 python train.py``.
Timings on a shared machine are noisy: rerun before trusting a small win (``--quick`` is a smoke
run: its 4 rounds have shown wins of 5-10% on a noisy VM that 12 rounds did not confirm).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from bench_moe import RANK, SHAPES
from benchlib import finish

import kt_jit
from kt_jit.kernels import gemm
from kt_jit.kernels.probe import bf16_peak_flops, read_bandwidth
from kt_jit.runtime.threads import default_num_threads

# value -> (candidates, token counts whose groups it shapes: 1-4 rows per expert for the lane-partial
# slice, 5-24 for the streamed form's blocks, 16 and more for the tokens-in-lanes form)
CANDIDATES = {
    "lane_partial_slice": ((256, 512, 1024), (1, 16)),
    "stream_group_blocks": ((4, 8, 16), (128,)),
    "lanes_min_rows": ((0, 12, 16), (512,)),
}
QUICK_QLENS = {"lane_partial_slice": (16,), "stream_group_blocks": (128,), "lanes_min_rows": (512,)}


def _layer(shape: str, seed: int = 0):
    e, h, i, _ = SHAPES[shape]
    g = torch.Generator().manual_seed(seed)
    experts = kt_jit.MoEExperts.from_tensors(*((torch.randn(*s, generator=g) * 0.02).bfloat16()
                                               for s in ((e, i, h), (e, i, h), (e, h, i))))
    lora = kt_jit.MoELoRA(e, h, i, rank=RANK)
    with torch.no_grad():
        for p in lora.parameters():
            p.normal_(0.0, 0.02, generator=g)
    return experts, lora


def _routings(shape: str, qlen: int, count: int = 4, seed: int = 1):
    e, h, _, k = SHAPES[shape]
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(qlen, h, generator=g).bfloat16().requires_grad_(),
             torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(qlen)]),
             torch.rand(qlen, k, generator=g)) for _ in range(count)]


def _backward_ms(experts, lora, batch) -> float:
    x, ids, w = batch
    out = kt_jit.moe_sft(x, ids, w, experts, lora)
    grad = torch.ones_like(out)
    t0 = time.perf_counter()
    out.backward(grad)
    return (time.perf_counter() - t0) * 1e3


def _set_tuning(setting: str) -> None:
    if setting:
        os.environ["KT_JIT_TUNING"] = setting
    else:
        os.environ.pop("KT_JIT_TUNING", None)


def tune_value(name: str, values: tuple[int, ...], qlens: tuple[int, ...], shape: str, experts, lora,
               rounds: int, passes: int) -> list[dict]:
    """Rows (one per candidate and qlen: median backward ms, and ``vs_default`` = the default's
    time / the candidate's, as the median of per-round ratios) for one HostTuning value."""
    default = getattr(gemm.host_tuning(), name)
    values = tuple(sorted({*values, default}))
    rows = []
    for qlen in qlens:
        batches = _routings(shape, qlen)
        times: dict[int, list[float]] = {v: [] for v in values}
        for r in range(rounds + 1):  # round 0 compiles and records the launch plans (not timed)
            for v in values if r % 2 == 0 else values[::-1]:
                _set_tuning(f"{name}={v}")
                ms = [_backward_ms(experts, lora, batches[(r + j) % len(batches)]) for j in range(passes)]
                if r:
                    times[v].append(statistics.median(ms))
        _set_tuning("")
        base = times[default]
        for v in values:
            ratio = statistics.median(b / t for b, t in zip(base, times[v], strict=True))
            rows.append({"name": f"{shape} {name}={v} qlen={qlen}", "ms": statistics.median(times[v]),
                         "vs_default": ratio, "value": name, "candidate": v, "qlen": qlen,
                         "default": v == default})
    return rows


def recommend(rows: list[dict], margin: float) -> dict[str, int]:
    """Per value, the candidate whose worst ``vs_default`` over its token counts beats the default
    by more than ``margin`` (the best such one), if any."""
    best: dict[str, int] = {}
    for name in dict.fromkeys(r["value"] for r in rows):
        mine = [r for r in rows if r["value"] == name]
        worst = {c: min(r["vs_default"] for r in mine if r["candidate"] == c) for c in {r["candidate"] for r in mine}}
        c, gain = max(worst.items(), key=lambda kv: kv[1])
        if gain > 1 + margin and not any(r["default"] for r in mine if r["candidate"] == c):
            best[name] = c
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one token count per value, 4 rounds")
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--shape", default="qwen3-30b-a3b", choices=sorted(SHAPES))
    ap.add_argument("--values", default=",".join(CANDIDATES), help="comma-separated subset of " + ",".join(CANDIDATES))
    ap.add_argument("--rounds", type=int, default=0, help="timed rounds per candidate (default 10, quick 4)")
    ap.add_argument("--passes", type=int, default=3, help="backward passes per candidate and round")
    ap.add_argument("--margin", type=float, default=0.02, help="gain a candidate needs over the default")
    args = ap.parse_args(argv)
    if os.environ.get("KT_JIT_TUNING"):
        print(f"note: KT_JIT_TUNING={os.environ['KT_JIT_TUNING']!r} is set; candidates replace it", file=sys.stderr)
    names = [n.strip() for n in args.values.split(",") if n.strip()]
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown:
        ap.error(f"unknown value(s) {unknown}; choose from {list(CANDIDATES)}")
    rounds = args.rounds or (4 if args.quick else 10)
    threads = default_num_threads()
    _set_tuning("")
    print(f"kt_jit tune: {args.shape}, isa={kt_jit.active_isa()} threads={threads}, defaults {gemm.host_tuning()}")
    experts, lora = _layer(args.shape)
    rows = []
    print(f"{'value':22s} {'cand':>6s} {'qlen':>5s} {'bwd ms':>9s} {'vs_default':>10s}")
    for name in names:
        values, qlens = CANDIDATES[name]
        for row in tune_value(name, values, QUICK_QLENS[name] if args.quick else qlens, args.shape, experts, lora,
                              rounds, args.passes):
            rows.append(row)
            mark = " (default)" if row["default"] else ""
            print(f"{name:22s} {row['candidate']:6d} {row['qlen']:5d} {row['ms']:9.2f} {row['vs_default']:10.3f}{mark}")
    best = recommend(rows, args.margin)
    setting = ",".join(f"{k}={v}" for k, v in best.items())
    print(f"\nrecommended: KT_JIT_TUNING={setting}" if setting else "\nrecommended: the defaults (nothing beat them "
          f"by more than {args.margin:.0%})")
    if args.quick:
        print(f"(--quick: {rounds} rounds, one token count per value; a smoke run, not a measurement: on a noisy "
              "VM 4 rounds have shown 5-10% wins that 12 did not confirm)")
    return finish(rows, args.json, read_bandwidth(), bf16_peak_flops(), threads)


if __name__ == "__main__":
    raise SystemExit(main())

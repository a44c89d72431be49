"""Host-side cost of one MoE call: the time between kernel launches (Python, NumPy, torch, ctypes)
against the kernels' own time, per pass (training forward, backward, no-grad forward), at small qlen.

At decode sizes the host side of a call is a large part of it: each of its small steps runs from
cold caches right after a weight stream (see docs/benchmarks.md, seventh session). Passes go
through the public API (``kt_jit.moe_sft`` and ``.backward()``), each on a fresh routing (16
batches cycled, so no pass finds the previous one's experts in L3); kernel time is the time spent
in parallel launches, immediate or deferred (a pass prepares its launches, then runs them back to
back from one native call, or replays the pass's launch plan in one: that call counts as kernel
time; the routing kernel, a direct call, counts as host time).

    python tools/bench_host.py [--quick] [--shapes qwen3-30b-a3b] [--quants bf16,int4_kgroup]
                               [--qlens 1,16] [--json PATH]

``--json`` rows: ``name`` (shape/quant/qlen/pass), ``ms`` (the whole call), ``host_ms``,
``kernel_ms``, ``host_share``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from bench_moe import RANK, SHAPES, Layer, batch
from benchlib import finish

import kt_jit
import kt_jit.codegen.plan
import kt_jit.codegen.worker
from kt_jit.kernels.probe import bf16_peak_flops, read_bandwidth
from kt_jit.runtime.threads import default_num_threads

PASSES = ("fwd", "bwd", "infer")


class LaunchTimer:
    """Sums the time spent running kernels while installed: wraps the immediate launcher and the
    runner of deferred launch batches in kt_jit.codegen.worker, and the replay of launch plans
    (``Plan.run``: building a plan's tables and argument blocks natively is counted with its
    kernels, a few microseconds)."""

    NAMES = ("launch", "_run_launches")

    def __init__(self) -> None:
        self.seconds = 0.0
        mod = kt_jit.codegen.worker
        self._orig = {n: getattr(mod, n) for n in self.NAMES}
        self._orig_plan_run = kt_jit.codegen.plan.Plan.run

        def timed(run):
            def wrapper(*args, **kwargs):
                t0 = time.perf_counter()
                run(*args, **kwargs)
                self.seconds += time.perf_counter() - t0
            return wrapper

        for n, f in self._orig.items():
            setattr(mod, n, timed(f))
        kt_jit.codegen.plan.Plan.run = timed(self._orig_plan_run)

    def remove(self) -> None:
        for n, f in self._orig.items():
            setattr(kt_jit.codegen.worker, n, f)
        kt_jit.codegen.plan.Plan.run = self._orig_plan_run


def measure(layer: Layer, t: int, k: int, passes: int, timer: LaunchTimer) -> dict[str, tuple[float, float]]:
    """Median (total, kernel) seconds of each pass over ``passes`` calls (after 10 warm-up calls)."""
    batches = [batch(t, k, layer.e, layer.h, seed=s) for s in range(16)]
    dout = torch.randn(t, layer.h, generator=torch.Generator().manual_seed(99))
    params = layer.lora.tensors()
    got: dict[str, list[tuple[float, float]]] = {p: [] for p in PASSES}
    for i in range(passes + 10):
        x, ids, w = batches[(2 * i) % 16]
        for p in params:
            p.grad = None
        xr = x.clone().requires_grad_()
        sample = {}
        timer.seconds = 0.0
        t0 = time.perf_counter()
        out = kt_jit.moe_sft(xr, ids, w, layer.experts, layer.lora)
        sample["fwd"] = (time.perf_counter() - t0, timer.seconds)
        timer.seconds = 0.0
        t0 = time.perf_counter()
        out.backward(dout)
        sample["bwd"] = (time.perf_counter() - t0, timer.seconds)
        x2, ids2, w2 = batches[(2 * i + 1) % 16]
        with torch.no_grad():
            timer.seconds = 0.0
            t0 = time.perf_counter()
            kt_jit.moe_sft(x2, ids2, w2, layer.experts)
            sample["infer"] = (time.perf_counter() - t0, timer.seconds)
        if i >= 10:
            for p in PASSES:
                got[p].append(sample[p])
    return {p: (statistics.median(s for s, _ in v), statistics.median(kt for _, kt in v)) for p, v in got.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer passes (under a minute)")
    ap.add_argument("--shapes", default="qwen3-30b-a3b", help=f"comma-separated, from {list(SHAPES)}")
    ap.add_argument("--quants", default="bf16,int4_kgroup")
    ap.add_argument("--qlens", default="1,16")
    ap.add_argument("--json", default=None, help="write the rows to this file")
    args = ap.parse_args()
    torch.set_num_threads(default_num_threads())
    passes = 40 if args.quick else 200
    bw, peak = read_bandwidth(), bf16_peak_flops()
    print(f"kt_jit host-side cost per call: isa={kt_jit.active_isa()} threads={default_num_threads()} | "
          f"read bandwidth {bw / 1e9:.1f} GB/s (measured now); medians of {passes} calls")
    print(f"{'shape':16s} {'quant':13s} {'qlen':>4s} {'pass':6s} {'call ms':>8s} {'host ms':>8s} "
          f"{'kernels ms':>10s} {'host share':>10s}")
    rows: list[dict] = []
    timer = LaunchTimer()
    try:
        for shape in args.shapes.split(","):
            e, h, i, k = SHAPES[shape]
            layer = Layer(e, h, i, RANK)
            for quant in args.quants.split(","):
                layer.quantize(quant)
                for t in (int(q) for q in args.qlens.split(",")):
                    for p, (total, kern) in measure(layer, t, k, passes, timer).items():
                        host = total - kern
                        print(f"{shape:16s} {quant:13s} {t:4d} {p:6s} {total * 1e3:8.3f} {host * 1e3:8.3f} "
                              f"{kern * 1e3:10.3f} {host / total:10.0%}")
                        rows.append({"name": f"{shape}/{quant}/q{t}/{p}", "ms": total * 1e3, "host_ms": host * 1e3,
                                     "kernel_ms": kern * 1e3, "host_share": host / total})
    finally:
        timer.remove()
    return finish(rows, args.json, bw, peak, default_num_threads())


if __name__ == "__main__":
    raise SystemExit(main())

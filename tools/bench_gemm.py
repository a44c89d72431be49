"""Benchmark the packed BF16 expert GEMMs against torch on the same machine, in the same run.

For M in {1, 16, 32, 128, 512} and (N, K) in {(768, 2048), (2048, 768), (2048, 7168), (7168, 2048)}:
forward ``Y = X W^T`` (kt_jit.linear vs torch F.linear, bf16) and transposed ``dX = dY W``
(kt_jit.linear_t vs torch ``dY @ W``, bf16). Weights are streamed from DRAM: each timed call uses
the next of enough weight copies to fill >= 1 GiB, so no call finds its weight in cache (both
libraries' copies on huge pages where the OS gives them, as kt_jit's MoE experts are).

Floors are measured in the same run with the JIT probes: read bandwidth (memory-bound floor =
weight bytes / bandwidth; a 256 MB read after each timed batch of the row, median: this VM's
bandwidth switches between modes within minutes; ``probe`` column, ``bw_gbs``) and bf16
dot-product peak (compute-bound floor = FLOPs / peak); a row's floor is the larger of the two,
``of_floor = floor / ours`` (1.0 = at the roofline).

    python tools/bench_gemm.py [--quick] [--json PATH] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from benchlib import finish

import kt_jit
from kt_jit.kernels.probe import ReadProbe, bf16_peak_flops, read_bandwidth
from kt_jit.runtime.buffers import resident_empty
from kt_jit.runtime.threads import default_num_threads, launch

SHAPES = [(768, 2048), (2048, 768), (2048, 7168), (7168, 2048)]
MS = [1, 16, 32, 128, 512]


class Stream:
    """Cycles through weight copies so consecutive calls never hit a cached weight. Both libraries'
    copies live in one resident (huge-page backed) block each, as an MoE layer's experts do."""

    def __init__(self, n: int, k: int, total_bytes: int) -> None:
        copies = max(2, -(-total_bytes // (n * k * 2)))
        g = torch.Generator().manual_seed(0)
        plain = resident_empty((copies, n, k), torch.bfloat16)
        for w in plain:
            w.copy_(torch.randn(n, k, generator=g) * 0.05)
        packed = resident_empty((copies, *kt_jit.pack_bf16(plain[0]).shape), torch.bfloat16)
        for w, p in zip(plain, packed, strict=True):
            p.copy_(kt_jit.pack_bf16(w))
        self.w, self.packed = list(plain), list(packed)
        self.i = 0

    def next(self) -> int:
        self.i = (self.i + 1) % len(self.w)
        return self.i


def time_per_call(call, stream: Stream, batch_seconds: float, repeats: int,
                  probe: ReadProbe | None = None) -> tuple[float, float]:
    """Median seconds per call over ``repeats`` batches of consecutive (cold-weight) calls, and the
    median bandwidth ``probe`` read right after each batch (bytes/s; 0 without a probe)."""
    call(stream.next())
    t0 = time.perf_counter()
    call(stream.next())
    one = max(time.perf_counter() - t0, 1e-6)
    batch = max(1, min(len(stream.w), int(batch_seconds / one)))
    per_call, reads = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(batch):
            call(stream.next())
        per_call.append((time.perf_counter() - t0) / batch)
        if probe is not None:
            reads.append(probe())
    return statistics.median(per_call), statistics.median(reads) if reads else 0.0


def compile_and_load_times() -> dict[str, float]:
    """Cold compile of each GEMM kernel (forward, transposed; LLVM already initialised) and their
    loads from the disk cache, in fresh processes."""
    code = (
        "import time, json, torch, kt_jit\n"
        "from kt_jit.kernels.gemm import kernel_for\n"
        "kernel_for('fwd', 64, 64)\n"  # initialises LLVM and the JIT
        "out = {}\n"
        "for op in ('fwd', 'bwd'):\n"
        "    t = time.perf_counter(); kernel_for(op, 2048, 7168); out[op] = time.perf_counter() - t\n"
        "print(json.dumps({'seconds': out, 'stats': kt_jit.cache_info()}))\n"
    )
    with tempfile.TemporaryDirectory() as d:
        env = dict(os.environ, KT_JIT_CACHE_DIR=d)
        runs = []
        for _ in range(2):
            out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                 check=True)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    assert runs[0]["stats"]["compiles"] == 3 and runs[1]["stats"]["compiles"] == 0
    return {f"{what}_{op}_ms": run["seconds"][op] * 1e3
            for what, run in (("cold_compile", runs[0]), ("disk_load", runs[1])) for op in ("fwd", "bwd")}


def launch_overhead_us(threads: int) -> float:
    """Median cost of one parallel launch of a kernel with no work items."""
    import ctypes

    from kt_jit.kernels.probe import READ_ARGS, _read_kernel

    addr = _read_kernel()
    args = READ_ARGS.make(0, src=0, sink=0)

    def once():
        args.counter = 0
        launch(addr, ctypes.addressof(args), threads)

    for _ in range(100):
        once()
    times = []
    for _ in range(2000):
        t0 = time.perf_counter()
        once()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="two shapes, fewer repeats (< 2 minutes)")
    ap.add_argument("--json", metavar="PATH", help="write the rows as JSON")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    threads = args.threads or default_num_threads()
    os.environ["KT_JIT_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    shapes = [(2048, 768), (2048, 7168)] if args.quick else SHAPES
    repeats = 3 if args.quick else 5
    total = (1 << 29) if args.quick else (1 << 30)

    isa = kt_jit.active_isa()
    bw = read_bandwidth(1 << 30)
    probe = ReadProbe(256 << 20)  # read after every timed batch: each row's floor uses its own readings
    peak = bf16_peak_flops(isa)
    print(f"kt_jit GEMM benchmark: isa={isa} threads={threads} | read bandwidth {bw / 1e9:.1f} GB/s, "
          f"bf16 peak {peak / 1e12:.2f} TFLOPS (both measured now)")
    rows: list[dict] = []
    hdr = (f"{'op':4} {'N':>5} {'K':>5} {'M':>4} | {'ms':>8} {'GB/s':>6} {'TFLOPS':>6} {'probe':>6} {'of_floor':>8} | "
           f"{'torch ms':>8} {'vs_torch':>8}")
    print(hdr)
    print("-" * len(hdr))
    for n, k in shapes:
        stream = Stream(n, k, total)
        for m in MS:
            g = torch.Generator().manual_seed(m)
            x = torch.randn(m, k, generator=g).bfloat16()
            dy = torch.randn(m, n, generator=g).bfloat16()
            y = torch.empty(m, n)
            dx = torch.empty(m, k)
            batch = 0.05 if args.quick else 0.1
            cases = {
                "fwd": (lambda i, s=stream, x=x, y=y: kt_jit.linear(x, s.packed[i], out=y),
                        lambda i, s=stream, x=x: F.linear(x, s.w[i])),
                "bwd": (lambda i, s=stream, dy=dy, dx=dx: kt_jit.linear_t(dy, s.packed[i], out=dx),
                        lambda i, s=stream, dy=dy: torch.matmul(dy, s.w[i])),
            }
            for op, (ours_fn, torch_fn) in cases.items():
                ours, row_bw = time_per_call(ours_fn, stream, batch, repeats, probe)
                ref, _ = time_per_call(torch_fn, stream, batch, repeats)
                bw = max(bw, row_bw)
                nbytes, flops = n * k * 2, 2 * m * n * k
                floor = max(nbytes / row_bw, flops / peak)
                row = {"name": f"{op} N={n} K={k} M={m}", "ms": ours * 1e3, "vs_torch": ref / ours,
                       "of_floor": floor / ours, "torch_ms": ref * 1e3, "weight_gbps": nbytes / ours / 1e9,
                       "tflops": flops / ours / 1e12, "bw_gbs": row_bw / 1e9,
                       "bound": "memory" if nbytes / row_bw >= flops / peak else "compute"}
                rows.append(row)
                print(f"{op:4} {n:5d} {k:5d} {m:4d} | {row['ms']:8.3f} {row['weight_gbps']:6.1f} "
                      f"{row['tflops']:6.3f} {row['bw_gbs']:6.1f} {row['of_floor']:8.2f} | {row['torch_ms']:8.3f} "
                      f"{row['vs_torch']:8.2f}", flush=True)

    overhead = launch_overhead_us(threads)
    rows.append({"name": f"launch overhead ({threads} threads, empty kernel)", "ms": overhead / 1e3})
    print(f"launch overhead: {overhead:.2f} us per parallel launch ({threads} threads)")
    times = compile_and_load_times()
    for op, what in (("fwd", "forward"), ("bwd", "transposed")):
        rows.append({"name": f"cold compile, {what} GEMM kernel", "ms": times[f"cold_compile_{op}_ms"]})
        rows.append({"name": f"load from disk cache, {what} GEMM kernel", "ms": times[f"disk_load_{op}_ms"]})
        print(f"{what} GEMM: cold compile {times[f'cold_compile_{op}_ms']:.1f} ms, "
              f"load from disk cache {times[f'disk_load_{op}_ms']:.2f} ms")
    return finish(rows, args.json, bw, peak, threads)


if __name__ == "__main__":
    raise SystemExit(main())

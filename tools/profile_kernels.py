"""Where an MoE pass spends its time, per kernel and per instruction, from a sampling profile.

Runs the training forward (``--pass fwd``) or forward and backward (``step``) of a bench_moe shape
in a loop while Linux ``perf record -e cpu-clock`` samples this process (software sampling: works
in VMs without hardware counters). Kernels are named through KT_JIT_PERF_MAP (codegen/perfmap.py).
Prints each kernel's share of the samples and its thread-milliseconds per pass (the backward's
kernels are those named ``gemm_bwd``, ``lora_xb``, ``lora_xty``, ...); ``--annotate PREFIX`` also
prints the most-sampled instructions of the kernel whose name starts with PREFIX (disassembled
from this process's memory with objdump).

Sampled instruction pointers skid: a sample usually lands on the instruction after the one that
stalled (e.g. right after a load that missed).

    python tools/profile_kernels.py --quant int4 --qlen 16 --annotate gemm_bwd
"""

from __future__ import annotations

import argparse
import bisect
import collections
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import torch
from bench_moe import RANK, SHAPES, Layer, batch

import kt_jit
from kt_jit.codegen import perfmap

FREQ = 4999  # samples per second per thread (an odd rate: no lock-step with periodic work)


def run_passes(layer: Layer, kind: str, t: int, k: int, seconds: float, lora: bool = True) -> int:
    """Repeat the pass for ``seconds`` (routings cycled, LoRA gradients dropped as zero_grad does);
    returns how many ran."""
    batches = [batch(t, k, layer.e, layer.h, seed=1 + j) for j in range(8)]
    dout = torch.randn(t, layer.h)
    params = list(layer.lora.tensors())
    end, n = time.perf_counter() + seconds, 0
    while time.perf_counter() < end or n == 0:
        x, ids, w = batches[n % len(batches)]
        for p in params:
            p.grad = None
        y = kt_jit.moe_sft(x.clone().requires_grad_(kind != "fwd"), ids, w, layer.experts, layer.lora if lora else None)
        if kind != "fwd":
            y.backward(dout)
        n += 1
    return n


def sample(fn, out: str) -> list[tuple[int, str]]:
    """(instruction pointer, file it lies in) of each sample taken from this process while ``fn()`` runs."""
    rec = subprocess.Popen(["perf", "record", "-q", "-e", "cpu-clock", "-F", str(FREQ), "-p", str(os.getpid()),
                            "-o", out], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(0.5)  # (perf attaches to every thread of the process)
    if rec.poll() is not None:
        raise SystemExit(f"perf record failed: {rec.stderr.read().decode().strip()} (perf_event_paranoid "
                         "at most 2 lets a user profile their own processes)")
    try:
        fn()
    finally:
        rec.send_signal(signal.SIGINT)
        rec.wait()
    script = subprocess.run(["perf", "script", "-i", out, "-F", "ip,dso"], capture_output=True, text=True, check=True)
    samples = []
    for line in script.stdout.splitlines():
        ip, _, dso = line.strip().partition(" ")
        samples.append((int(ip, 16), os.path.basename(dso.strip("()")) or "?"))
    return samples


def attribute(samples: list[tuple[int, str]], kernels: list[tuple[int, int, str]]) -> tuple[collections.Counter, dict]:
    """Samples per kernel name (others: "(outside kernels: <file>)", e.g. libgomp.so.1 for threads
    waiting for work, libpython/libtorch for host code) and, per kernel, samples per code offset."""
    per, offsets = collections.Counter(), collections.defaultdict(collections.Counter)
    starts = [s for s, _, _ in kernels]
    for ip, dso in samples:
        i = bisect.bisect_right(starts, ip) - 1
        if i >= 0 and ip < kernels[i][0] + kernels[i][1]:
            per[kernels[i][2]] += 1
            offsets[kernels[i][2]][ip - kernels[i][0]] += 1
        else:
            per[f"(outside kernels: {dso})"] += 1
    return per, offsets


def annotate(name: str, start: int, size: int, hits: collections.Counter, top: int) -> None:
    """The ``top`` most-sampled instructions of the kernel at ``start``, in address order."""
    total = sum(hits.values())
    print(f"\n{name}: {total} samples; the {top} most sampled instructions (offset, share, instruction)")
    text = {}
    if shutil.which("objdump"):
        with tempfile.NamedTemporaryFile(suffix=".bin") as f:
            f.write(ctypes.string_at(start, size))
            f.flush()
            dis = subprocess.run(["objdump", "-D", "-b", "binary", "-m", "i386:x86-64", "--no-show-raw-insn", f.name],
                                 capture_output=True, text=True).stdout
        for line in dis.splitlines():
            off, sep, rest = line.strip().partition(":")
            if sep:
                try:
                    text[int(off, 16)] = rest.strip()
                except ValueError:
                    pass
    else:
        print("(objdump not found: offsets only)")
    for off in sorted(o for o, _ in hits.most_common(top)):
        print(f"  {off:6x} {hits[off] / total:6.1%}  {text.get(off, '')}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="qwen3-30b-a3b", choices=sorted(SHAPES))
    ap.add_argument("--quant", default="bf16")
    ap.add_argument("--qlen", type=int, default=16)
    ap.add_argument("--pass", dest="kind", default="step", choices=("fwd", "step"))
    ap.add_argument("--no-lora", action="store_true", help="passes without the LoRA adapters")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--top", type=int, default=20, help="kernels listed (and instructions annotated)")
    ap.add_argument("--annotate", metavar="PREFIX", help="annotate the kernel whose name starts with this")
    ap.add_argument("--quick", action="store_true", help="a short run (3 s of samples)")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args()
    os.environ["KT_JIT_PERF_MAP"] = "1"  # (before the first kernel loads)
    if not shutil.which("perf"):
        print("profile_kernels: needs Linux perf (e.g. apt install linux-tools-generic)", file=sys.stderr)
        return 2
    seconds = 3.0 if args.quick else args.seconds
    e, h, i, k = SHAPES[args.shape]
    layer = Layer(e, h, i, RANK)
    if args.quant != "bf16":
        layer.quantize(args.quant)
    lora = not args.no_lora
    run_passes(layer, args.kind, args.qlen, k, 0.0, lora)  # compile, record launch plans
    run_passes(layer, args.kind, args.qlen, k, 1.0, lora)
    runs = [0]
    with tempfile.TemporaryDirectory() as tmp:
        samples = sample(lambda: runs.__setitem__(0, run_passes(layer, args.kind, args.qlen, k, seconds, lora)),
                     os.path.join(tmp, "perf.data"))
    kernels = perfmap.read_map()
    perfmap.map_path().unlink(missing_ok=True)
    per, offsets = attribute(samples, kernels)
    total = len(samples)
    in_kernels = total - sum(n for name, n in per.items() if name.startswith("(outside"))
    what = f"{args.shape} {args.quant} qlen {args.qlen} {args.kind}{'' if lora else ' (no LoRA)'}"
    print(f"{what}: {runs[0]} passes, {total} samples at "
          f"{FREQ}/s per thread, {in_kernels / max(total, 1):.0%} of them in kernels")
    print(f"{'kernel':<96} {'share':>6} {'thread ms/pass':>15}")
    rows = []
    for name, n in per.most_common(args.top):
        ms = n / FREQ / runs[0] * 1e3
        print(f"{name[:96]:<96} {n / total:6.1%} {ms:15.3f}")
        rows.append({"name": name, "ms": ms, "share": n / total, "samples": n})
    if args.annotate:
        hit = [(per[name], start, size, name) for start, size, name in kernels if name.startswith(args.annotate)]
        if not hit:
            print(f"\nno kernel named {args.annotate}...", file=sys.stderr)
            return 1
        _, start, size, name = max(hit)
        annotate(name, start, size, offsets[name], args.top)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Where an MoE pass spends its time, per kernel and per instruction, from a sampling profile.

Runs the training forward (``--pass fwd``) or forward and backward (``step``) of a bench_moe shape
in a loop while Linux ``perf record -e cpu-clock`` samples this process (software sampling: works
in VMs without hardware counters). Kernels are named through KT_JIT_PERF_MAP (codegen/perfmap.py).
Prints each kernel's share of the sampled time and its thread-milliseconds per pass (the backward's
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
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import torch
from benchlib import write_rows

import kt_jit
from kt_jit.codegen import perfmap

FREQ = 4999  # samples per second per thread asked for (an odd rate: no lock-step with periodic work)


def run_passes(layer, kind: str, t: int, k: int, seconds: float, lora: bool = True) -> int:
    """Repeat the pass for ``seconds`` on ``layer`` (a bench_moe.Layer; routings cycled, LoRA
    gradients dropped as zero_grad does); returns how many ran."""
    from bench_moe import BATCHES, batch  # (imported here: it allocates its L3 flush buffer)

    batches = [batch(t, k, layer.e, layer.h, seed=1 + j) for j in range(BATCHES)]
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


def _perf_failed(what: str, stderr: str) -> SystemExit:
    return SystemExit(f"perf {what} failed: {stderr.strip()} (a user may profile their own processes when "
                      f"/proc/sys/kernel/perf_event_paranoid is at most 2; the sampling rate, {FREQ}/s, must not "
                      "exceed /proc/sys/kernel/perf_event_max_sample_rate)")


def sample(fn, out: str) -> list[tuple[int, str, int]]:
    """(instruction pointer, file it lies in, nanoseconds it stands for) of each sample taken from
    this process while ``fn()`` runs."""
    rec = subprocess.Popen(["perf", "record", "-q", "-e", "cpu-clock", "-F", str(FREQ), "-p", str(os.getpid()),
                            "-o", out], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(0.5)  # (perf attaches to every thread of the process)
    if rec.poll() is not None:
        raise _perf_failed("record", rec.stderr.read().decode())
    try:
        fn()
    finally:
        rec.send_signal(signal.SIGINT)
        _, err = rec.communicate()
    if rec.returncode not in (0, -signal.SIGINT):
        raise _perf_failed("record", err.decode())
    script = subprocess.run(["perf", "script", "-i", out, "-F", "period,ip,dso"], capture_output=True, text=True)
    if script.returncode:
        raise _perf_failed("script", script.stderr)
    samples = []
    for line in script.stdout.splitlines():
        parts = line.split(None, 2)
        try:
            samples.append((int(parts[1], 16), os.path.basename(parts[2].strip().strip("()")), int(parts[0])))
        except (IndexError, ValueError):  # (a line perf did not write as asked: skipped)
            continue
    return samples


def attribute(samples: list[tuple[int, str, int]], kernels: list[tuple[int, int, str]],
              ) -> tuple[collections.Counter, dict]:
    """Nanoseconds per kernel name (others: "(outside kernels: <file>)", e.g. libgomp.so.1 for
    threads waiting for work, libpython/libtorch for host code) and, per kernel, samples per code
    offset. ``kernels``: (start, size, name) sorted by start, as perfmap.read_map gives them."""
    per, offsets = collections.Counter(), collections.defaultdict(collections.Counter)
    starts = [s for s, _, _ in kernels]
    for ip, dso, ns in samples:
        i = bisect.bisect_right(starts, ip) - 1
        if i >= 0 and ip < kernels[i][0] + kernels[i][1]:
            per[kernels[i][2]] += ns
            offsets[kernels[i][2]][ip - kernels[i][0]] += 1
        else:
            per[f"(outside kernels: {dso})"] += ns
    return per, offsets


def annotate(name: str, start: int, size: int, hits: collections.Counter, top: int,
             listing: str | None = None) -> None:
    """The ``top`` most-sampled instructions of the kernel at ``start``, in address order;
    ``listing``: also write its whole disassembly there, each instruction with its share."""
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
    if listing:
        with open(listing, "w") as f:
            for off in sorted(set(text) | set(hits)):
                f.write(f"{off:6x} {hits[off] / max(total, 1):6.2%}  {text.get(off, '')}\n")
        print(f"(the whole listing: {listing})")


def main() -> int:
    from bench_moe import SHAPES

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="qwen3-30b-a3b", choices=sorted(SHAPES))
    ap.add_argument("--quant", default="bf16")
    ap.add_argument("--qlen", type=int, default=16)
    ap.add_argument("--pass", dest="kind", default="step", choices=("fwd", "step"))
    ap.add_argument("--no-lora", action="store_true", help="passes without the LoRA adapters")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--top", type=int, default=20, help="kernels listed (and instructions annotated)")
    ap.add_argument("--annotate", metavar="PREFIX",
                    help="annotate the most-sampled kernel whose name starts with this")
    ap.add_argument("--listing", metavar="PATH", help="with --annotate: write the kernel's whole annotated disassembly")
    ap.add_argument("--quick", action="store_true", help="a short run (3 s of samples)")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args()
    if not shutil.which("perf"):
        print("profile_kernels: needs Linux perf (e.g. apt install linux-tools-generic)", file=sys.stderr)
        return 2
    os.environ["KT_JIT_PERF_MAP"] = "1"  # (before the first kernel loads)
    try:
        return _profile(args)
    finally:
        perfmap.map_path().unlink(missing_ok=True)


def _profile(args: argparse.Namespace) -> int:
    from bench_moe import RANK, SHAPES, Layer

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
    per, offsets = attribute(samples, kernels)
    total_ns = sum(per.values())
    in_kernels = total_ns - sum(ns for name, ns in per.items() if name.startswith("(outside"))
    what = f"{args.shape} {args.quant} qlen {args.qlen} {args.kind}{'' if lora else ' (no LoRA)'}"
    print(f"{what}: {runs[0]} passes, {len(samples)} samples ({total_ns / 1e9:.1f} thread-seconds), "
          f"{in_kernels / max(total_ns, 1):.0%} of them in kernels")
    print(f"{'kernel':<96} {'share':>6} {'thread ms/pass':>15}")
    rows = []
    for name, ns in per.most_common(args.top):
        ms = ns / 1e6 / runs[0]
        print(f"{name[:96]:<96} {ns / total_ns:6.1%} {ms:15.3f}")
        rows.append({"name": name, "ms": ms, "share": ns / total_ns})
    if args.annotate:
        hit = [(per[name], start, size, name) for start, size, name in kernels if name.startswith(args.annotate)]
        if not hit:
            print(f"\nno kernel named {args.annotate}...", file=sys.stderr)
            return 1
        _, start, size, name = max(hit)
        annotate(name, start, size, offsets[name], args.top, args.listing)
    return write_rows(rows, args.json)


if __name__ == "__main__":
    raise SystemExit(main())

"""Benchmark the MoE LoRA operator against the plain PyTorch reference, in the same run.

Shapes: qwen3-30b-a3b (E128 H2048 I768 K8), deepseek-v2-lite (E64 H2048 I1408 K6), dsv3-64e
(E64 H7168 I2048 K8); qlen 1, 16, 128, 512; LoRA rank 16. For each: forward with saved activations
(autograd), forward without saving (MoESFTOp, save_for_backward=False), the same without LoRA
(the pair gives LoRA's cost), and backward, with and without LoRA; the PyTorch reference is
kt_jit.reference.moe in bf16 with autograd (a per-expert F.linear loop). Floors come from the JIT
probes: ``of_floor`` = (bytes of the activated experts' weights / read bandwidth) / time, as the
issues define it (LoRA's bytes are not in it: the passes without LoRA show how far its cost is
from the experts' own), with the bandwidth read by a probe timed round-robin with each qlen's
passes (the median reading; rows carry it as ``bw_gbs``); ``of_roof`` also counts the compute roof
(FLOPs / bf16 peak), which binds first on CPUs without AMX. Also reported: peak RSS, RSS growth
over a training loop (forward, backward, AdamW step), and the streaming-write bandwidth for values
and for zeros (the LoRA gradients' writes and the idle experts' zeroing; the machine row's
``write_gbps`` and ``zero_write_gbps``).

Every quantization mode is timed too (same shapes; ``vs_bf16`` = BF16 time / mode time for the
forward with saved activations and the backward, the bf16 experts' passes timed round-robin with
the mode's own, so a switch of the VM's memory mode cannot skew the ratio).

    python tools/bench_moe.py [--quick] [--json PATH] [--shapes qwen3,...] [--quants int8,...]
                              [--qlens 1,16] [--steps N]
"""

from __future__ import annotations

import argparse
import functools
import gc
import itertools
import math
import resource
import statistics
import time

import torch
from benchlib import finish

import kt_jit
import kt_jit.moe.weights
from kt_jit.kernels.probe import ReadProbe, bf16_peak_flops, read_bandwidth, write_bandwidth
from kt_jit.reference import moe as torch_moe
from kt_jit.runtime.threads import default_num_threads

SHAPES = {
    "qwen3-30b-a3b": (128, 2048, 768, 8),
    "deepseek-v2-lite": (64, 2048, 1408, 6),
    "dsv3-64e": (64, 7168, 2048, 8),
}
QLENS = [1, 16, 128, 512]
RANK = 16


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fns: dict, repeats: int, min_seconds: float = 0.0, warmup: int = 1,
          swaps: tuple[tuple[str, str], ...] = (), paired: dict | None = None,
          work: dict[str, list[float]] | None = None) -> dict:
    """Median seconds of each ``fns[name]()``, measured round-robin (one call of each per round,
    after ``warmup`` calls each) so that drift of this shared machine hits every pass alike; rounds
    continue until ``repeats`` are done and ``min_seconds`` have passed (at most 50 rounds). A
    function that returns a float has timed itself: those seconds (the part of its work that
    counts) are its sample. ``swaps``: pairs of passes that trade places every other round, for
    passes compared with each other (a pass's time depends on the one before it: at qlen 1 the
    forward run right after a training forward measured 5-8% slower than the one after it); with
    swaps the rounds come in pairs, one of each order. ``paired`` (a dict) receives, per swapped
    pair (a, b), a's time over b's in the same round: the geometric mean of the two orders' medians
    of it (drift between rounds cancels, and so does the order). ``work``: per pass, the amount of
    work of each of its calls (warm-up included; the passes append to it), which ``paired`` divides
    each time by: the two passes of a round run different routings (at qlen 16 their active experts
    differ by up to ~10%)."""
    missing = {name for pair in swaps for name in pair} - fns.keys()
    if missing:
        raise ValueError(f"swaps names passes that are not timed: {sorted(missing)}")
    names = list(fns)
    swapped = list(names)
    for a, b in swaps:
        i, j = swapped.index(a), swapped.index(b)
        swapped[i], swapped[j] = b, a
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict = {name: [] for name in fns}
    start, rounds = time.perf_counter(), 0
    while True:
        for name in (names, swapped)[rounds % 2]:
            t0 = time.perf_counter()
            own = fns[name]()
            times[name].append(own if isinstance(own, float) else time.perf_counter() - t0)
        rounds += 1
        if rounds >= 50 or (rounds >= repeats and time.perf_counter() - start >= min_seconds
                            and not (swaps and rounds % 2)):
            break
    for a, b in swaps if paired is not None else ():
        wa, wb = (work[a][-rounds:], work[b][-rounds:]) if work else ([1.0] * rounds,) * 2
        ratios = [(x / u) / (y / v) for x, y, u, v in zip(times[a], times[b], wa, wb, strict=True)]
        paired[a, b] = math.sqrt(statistics.median(ratios[0::2]) * statistics.median(ratios[1::2]))
    return {name: statistics.median(ts) for name, ts in times.items()}


_FLUSH = torch.ones(16 << 20, dtype=torch.float32)  # 64 MB, twice this VM's L3


def flush_l3() -> None:
    """Stream 64 MB through the caches (a float32 sum: no temporary): what a pass's weights left in
    L3 is gone (as in a model, where every other layer runs between a layer's forward and its
    backward)."""
    _FLUSH.sum()


def cycled(fn, batches):
    """A timed pass (for :func:`timed`): ``fn(*batch)`` on the batches in turn, each after
    :func:`flush_l3`, returning its own seconds."""
    state = {"i": 0}

    def run() -> float:
        b = batches[state["i"] % len(batches)]
        state["i"] += 1
        flush_l3()
        t0 = time.perf_counter()
        fn(*b)
        return time.perf_counter() - t0

    return run


def time_steps(steps: dict, batches, swaps: tuple[tuple[str, str], ...], quick: bool, repeats: int):
    """Median seconds of each ``steps[name](*batch)`` cycled over ``batches`` (:func:`cycled`), timed
    round-robin with ``swaps`` (see :func:`timed`) and their paired ratios: (medians, paired)."""
    paired: dict = {}
    med = timed({name: cycled(fn, batches) for name, fn in steps.items()}, repeats=repeats,
                min_seconds=2.0 if quick else 6.0, warmup=2, swaps=swaps, paired=paired)
    return med, paired


def layer_bench_args(doc: str, qlens: str, quick_qlens: list[int]):
    """The command line of a one-layer benchmark (``--quick``, ``--shape``, ``--qlens``, ``--json``):
    (args, (E, H, I, K), qlens)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help=f"qlen {' and '.join(map(str, quick_qlens))}, fewer rounds (under two minutes)")
    ap.add_argument("--shape", default="qwen3-30b-a3b", choices=sorted(SHAPES))
    ap.add_argument("--qlens", default=qlens)
    ap.add_argument("--json")
    args = ap.parse_args()
    return args, SHAPES[args.shape], quick_qlens if args.quick else [int(q) for q in args.qlens.split(",")]


def step_batches(qlen: int, k: int, e: int, h: int) -> list[tuple[torch.Tensor, ...]]:
    """BATCHES training-step inputs (x, ids, w, dout) of ``qlen`` tokens, seeded."""
    return [(*batch(qlen, k, e, h, seed=s), torch.randn(qlen, h, generator=torch.Generator().manual_seed(s)))
            for s in range(BATCHES)]


def backward_seconds(out: torch.Tensor, dout: torch.Tensor) -> float:
    """Seconds of ``out.backward(dout)``, started with cold caches (after :func:`flush_l3`): right
    after its forward, a backward at small qlen finds most of the experts' down weights still in
    L3 (measured at qlen 1 on qwen3: the transposed down GEMM 1.6x faster), which it never does in
    a model with other layers between the two."""
    flush_l3()
    t0 = time.perf_counter()
    out.backward(dout)
    return time.perf_counter() - t0


class Layer:
    def __init__(self, e: int, h: int, i: int, rank: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.gate = (torch.randn(e, i, h, generator=g) / h**0.5).bfloat16()
        self.up = (torch.randn(e, i, h, generator=g) / h**0.5).bfloat16()
        self.down = (torch.randn(e, h, i, generator=g) / i**0.5).bfloat16()
        self.quantize("bf16")
        self.lora = kt_jit.MoELoRA(e, h, i, rank=rank, alpha=2.0 * rank)
        with torch.no_grad():
            for name in ("gate_lora_b", "up_lora_b", "down_lora_b"):
                getattr(self.lora, name).normal_(0, 0.01)
        self.e, self.h, self.i = e, h, i

    def quantize(self, quant: str) -> None:
        """(Re)build the packed experts in ``quant`` (K-group modes: group size 128)."""
        self.experts = None
        gc.collect()
        t0 = time.perf_counter()
        self.experts = kt_jit.MoEExperts.from_tensors(self.gate, self.up, self.down, quant=quant, group_size=128)
        self.pack_seconds = time.perf_counter() - t0
        self.quant = quant


def batch(t: int, k: int, e: int, h: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=g).bfloat16()
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    w = torch.softmax(torch.randn(t, k, generator=g), -1)
    return x, ids, w


BATCHES = 8  # distinct routings cycled through, so no pass finds the previous one's experts in L3
# passes compared with each other (LoRA's cost), timed in both orders (see timed)
LORA_PAIRS = (("fwd (no save)", "fwd (no LoRA)"), ("bwd", "bwd (no LoRA)"))
PROBE_BYTES = 256 << 20  # the interleaved bandwidth probe's read (8x this VM's L3)
WARM_PLANS_MAX_QLEN = 128  # (above, every routing activates nearly all experts: few configurations)


@functools.cache
def _probe() -> ReadProbe:
    return ReadProbe(PROBE_BYTES)


def measure(layer: Layer, op: kt_jit.MoESFTOp, t: int, k: int, repeats: int, torch_repeats: int,
            min_seconds: float, baseline: kt_jit.MoEExperts | None = None):
    """Seconds per pass for kt_jit (and, under "read", the median read bandwidth in bytes/s of a
    probe timed round-robin with the passes) and the PyTorch reference (None when ``torch_repeats``
    is 0) at one qlen, and the mean active expert count. With ``baseline`` (the bf16 experts of the
    same weights), its forward (save) and backward are timed in the same rounds too, as "bf16 fwd
    (save)" and "bf16 bwd": the VM's memory mode switches within minutes, and a mode's speed-up over
    bf16 is only fair from passes timed side by side. Under "lora", LoRA's cost: the forward (no
    save) and the backward with LoRA over without, each from :func:`timed`'s ``paired`` ratios per
    active expert. Every call takes the next of BATCHES batches with their own routing: with one
    fixed batch, a pass at small qlen found part of its experts' weights still in L3 from the
    previous pass (8 qwen3 experts are 75 MB; measured: the forward at qlen 1 ran 1.3-1.5x faster
    than with fresh experts, the backward less so), which a training step, with every other layer
    in between, never does."""
    e, h = layer.e, layer.h
    batches = [batch(t, k, e, h, seed=1 + j) for j in range(BATCHES)]

    active_of = [int(torch.unique(ids).numel()) for _, ids, _ in batches]
    work: dict[str, list[float]] = {name: [] for pair in LORA_PAIRS for name in pair}

    def picker(offset: int, name: str | None = None):
        """Each pass cycles through the same batches from batch ``offset``; ``timed`` calls the
        passes round-robin in the order of ``passes`` (offsets 0, 2, 4, 6, 3, then the bf16
        baseline's 0 and 6 after the probe) or, every other round, with the two pairs compared
        (with and without LoRA) swapped (0, 4, 2, 3, 6): no call follows one with the same routing.
        With ``name``, each call logs its batch's active experts in ``work[name]``."""
        order = itertools.cycle(list(range(offset, BATCHES)) + list(range(offset)))

        def pick():
            j = next(order)
            if name is not None:
                work[name].append(active_of[j])
            return batches[j]
        return pick

    dout = torch.randn(t, h, generator=torch.Generator().manual_seed(2))
    lora_params = list(layer.lora.tensors())
    active = statistics.mean(active_of)

    # fwd (save), fwd (no save), fwd (no LoRA), bwd, bwd (no LoRA) (offset 3: another routing than
    # the passes next to it in either order)
    picks = [picker(p, name) for p, name in zip((0, 2, 4, 6, 3), (None, "fwd (no save)", "fwd (no LoRA)", "bwd",
                                                                 "bwd (no LoRA)"), strict=True)]

    def fwd_save():
        x, ids, w = picks[0]()
        return kt_jit.moe_sft(x.clone().requires_grad_(), ids, w, layer.experts, layer.lora)

    def bwd() -> float:
        x, ids, w = picks[3]()
        for p in lora_params:  # as optimizer.zero_grad(set_to_none=True) leaves them
            p.grad = None
        return backward_seconds(kt_jit.moe_sft(x.clone().requires_grad_(), ids, w, layer.experts, layer.lora), dout)

    def bwd_plain() -> float:  # (the issues' floors count the experts' bytes alone; LoRA's are extra)
        x, ids, w = picks[4]()
        return backward_seconds(kt_jit.moe_sft(x.clone().requires_grad_(), ids, w, layer.experts), dout)

    def no_save():
        op.forward(*picks[1](), save_for_backward=False)

    plain = kt_jit.MoESFTOp(op.experts)  # (LoRA's cost: the no-save pass with LoRA against without)

    def no_lora():
        plain.forward(*picks[2](), save_for_backward=False)

    probe = _probe()
    passes = {"fwd (save)": fwd_save, "fwd (no save)": no_save, "fwd (no LoRA)": no_lora, "bwd": bwd,
              "bwd (no LoRA)": bwd_plain, "read": lambda: 1.0 / probe()}  # (seconds per byte)
    if baseline is not None:
        base_picks = [picker(p) for p in (0, 6)]

        def base_fwd():
            x, ids, w = base_picks[0]()
            kt_jit.moe_sft(x.clone().requires_grad_(), ids, w, baseline, layer.lora)

        def base_bwd() -> float:
            x, ids, w = base_picks[1]()
            for p in lora_params:
                p.grad = None
            return backward_seconds(kt_jit.moe_sft(x.clone().requires_grad_(), ids, w, baseline, layer.lora), dout)

        passes |= {"bf16 fwd (save)": base_fwd, "bf16 bwd": base_bwd}
    # warm-up: every batch twice through every pass, so the timed calls replay launch plans as a
    # training run does after its first steps (a configuration is captured at its second call)
    ratios: dict = {}
    ours = timed(passes, repeats, min_seconds, warmup=2 * BATCHES if t <= WARM_PLANS_MAX_QLEN else 1,
                 swaps=LORA_PAIRS, paired=ratios, work=work)
    ours["lora"] = tuple(ratios[pair] for pair in LORA_PAIRS)  # (forward, backward) with / without LoRA
    ours["read"] = 1.0 / ours["read"]  # the median reading among the passes: their floor's bandwidth
    if torch_repeats == 0:
        return ours, None, active

    def torch_fwd(pick, grad: bool, lora: bool = True):
        x, ids, w = pick()
        xr = x.clone().requires_grad_(grad)
        ps = [p.detach().requires_grad_(grad) for p in lora_params] if lora else None
        return torch_moe(xr, ids, w, layer.gate, layer.up, layer.down, ps, layer.lora.scaling,
                         dtype=torch.bfloat16)

    ref = timed({"fwd (save)": lambda: torch_fwd(picks[0], True), "fwd (no save)": lambda: torch_fwd(picks[1], False),
                 "fwd (no LoRA)": lambda: torch_fwd(picks[2], False, lora=False),
                 "bwd": lambda: backward_seconds(torch_fwd(picks[3], True), dout)}, torch_repeats)
    return ours, ref, active


def bench_shape(name: str, e: int, h: int, i: int, k: int, qlens, quants, bw: float, peak: float, repeats: int,
                torch_repeats: int, min_seconds: float) -> tuple[list[dict], float]:
    """Rows for one shape, and the best bandwidth reading seen. Each qlen's floor uses the median of
    bandwidth readings timed round-robin with its passes: this VM switches between a slow and a
    fast memory mode within minutes, and a run-wide (or a before/after) reading judged slow-mode
    passes against a fast-mode floor whenever it switched during a run."""
    layer = Layer(e, h, i, RANK)
    print(f"\n{name}: E={e} H={h} I={i} K={k} rank={RANK}")
    hdr = (f"{'quant':<13} {'qlen':>4} {'pass':<14} {'ms':>9} {'floor ms':>9} {'of_floor':>8} {'of_roof':>7} "
           f"{'torch ms':>9} {'vs_torch':>8} {'vs_bf16':>7}")
    rows, torch_ref = [], {}
    bf16_experts = layer.experts if layer.quant == "bf16" else None
    for quant in quants:
        if quant != layer.quant:
            layer.quantize(quant)
        print(f"-- {quant}: packed (quantized online) in {layer.pack_seconds:.2f} s, "
              f"{layer.experts.nbytes / 1e9:.2f} GB")
        rows.append({"name": f"{name} {quant} load (online quantization)", "ms": layer.pack_seconds * 1e3,
                     "gb": layer.experts.nbytes / 1e9})
        print(hdr)
        print("-" * len(hdr))
        op = kt_jit.MoESFTOp(layer.experts, layer.lora)
        for t in qlens:
            ours, ref, active = measure(layer, op, t, k, repeats, torch_repeats if quant == quants[0] else 0,
                                       min_seconds, bf16_experts if quant != "bf16" else None)
            local_bw = ours.pop("read")
            lora_fwd, lora_bwd = (r - 1 for r in ours.pop("lora"))
            base = {pas[5:]: ours.pop(pas) for pas in [p for p in ours if p.startswith("bf16 ")]}
            bw = max(bw, local_bw)
            if ref is not None:
                torch_ref[t] = ref
            floor = active * layer.experts.expert_bytes() / local_bw
            roof = max(floor, 2 * t * k * 3 * h * i / peak)
            for pas, sec in ours.items():
                ref_s = torch_ref.get(t, {}).get(pas)
                row = {"name": f"{name} {quant} qlen={t} {pas}", "ms": sec * 1e3, "of_floor": floor / sec,
                       "of_roof": roof / sec, "floor_ms": floor * 1e3, "roof_ms": roof * 1e3, "active_experts": active,
                       "bw_gbs": local_bw / 1e9}
                if ref_s:
                    row.update(vs_torch=ref_s / sec, torch_ms=ref_s * 1e3)
                if pas in base:  # timed in the same rounds
                    row["vs_bf16"] = base[pas] / sec
                elif quant == "bf16":
                    row["vs_bf16"] = 1.0
                rows.append(row)
                print(f"{quant:<13} {t:4d} {pas:<14} {row['ms']:9.2f} {row['floor_ms']:9.2f} {row['of_floor']:8.2f} "
                      f"{row['of_roof']:7.2f} {row.get('torch_ms', float('nan')):9.2f} "
                      f"{row.get('vs_torch', float('nan')):8.2f} {row.get('vs_bf16', float('nan')):7.2f}", flush=True)
            # (both forwards without saving; each round's pair timed back to back, in both orders)
            print(f"     LoRA adds {lora_fwd * 100:.1f}% to the forward (no save, with vs without LoRA), "
                  f"{lora_bwd * 100:.1f}% to the backward (per-round ratios per active expert); backward = "
                  f"{ours['bwd'] / ours['fwd (save)']:.2f}x forward")
            rows.append({"name": f"{name} {quant} qlen={t} lora overhead", "ms": 0.0, "ratio": lora_fwd,
                         "bwd_ratio": lora_bwd})
    return rows, bw


def rss_loop(steps: int, qlen: int) -> dict:
    """RSS before/after ``steps`` training steps on the qwen3 shape (flat = no leak)."""
    e, h, i, k = SHAPES["qwen3-30b-a3b"]
    layer = Layer(e, h, i, RANK)
    opt = torch.optim.AdamW(layer.lora.parameters(), lr=1e-4)
    x, ids, w = batch(qlen, k, e, h)
    target = torch.randn(qlen, h)
    marks = {}
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        loss = (kt_jit.moe_sft(x, ids, w, layer.experts, layer.lora) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step in (10, steps):
            gc.collect()
            marks[step] = rss_mb()
    secs = time.perf_counter() - t0
    return {"steps": steps, "qlen": qlen, "rss_mb_step10": marks[10], "rss_mb_end": marks[steps],
            "growth_mb": marks[steps] - marks[10], "step_ms": secs / steps * 1e3}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="qwen3 only, qlen 1/16/128, 50 training steps")
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--shapes", default=None, help="comma-separated subset of " + ",".join(SHAPES))
    ap.add_argument("--qlens", default=None,
                    help="comma-separated qlens (default: 1,16,128,512; quick: 1,16,128)")
    ap.add_argument("--steps", type=int, default=None, help="training steps of the RSS loop")
    ap.add_argument("--quants", default=None,
                    help="comma-separated quant modes (default: all; quick: bf16,int8,int4_kgroup)")
    args = ap.parse_args()
    if args.steps is not None and args.steps < 10:
        ap.error("--steps must be at least 10 (the RSS loop compares step 10 with the last)")
    threads = default_num_threads()
    torch.set_num_threads(threads)
    names = args.shapes.split(",") if args.shapes else (["qwen3-30b-a3b"] if args.quick else list(SHAPES))
    try:
        qlens = [int(q) for q in args.qlens.split(",")] if args.qlens else ([1, 16, 128] if args.quick else QLENS)
    except ValueError:
        qlens = [0]
    if min(qlens) < 1:
        ap.error(f"--qlens takes comma-separated positive integers, got {args.qlens!r}")
    quants = args.quants.split(",") if args.quants else (
        ["bf16", "int8", "int4_kgroup"] if args.quick else list(kt_jit.moe.weights.QUANT_MODES))
    if quants[0] != "bf16":
        quants = ["bf16"] + [q for q in quants if q != "bf16"]  # bf16 first: the reference for vs_bf16
    steps = args.steps or (50 if args.quick else 1000)
    repeats, torch_repeats = (3, 1) if args.quick else (5, 3)
    min_seconds = 0.3 if args.quick else 1.0  # small passes get more rounds

    bw, peak = read_bandwidth(1 << 30), bf16_peak_flops()
    # what the backward's LoRA gradients are written at (values; zeros, for idle experts' slices,
    # can be much faster: see kernels/probe.py)
    writes = {"write_gbps": write_bandwidth(1 << 30) / 1e9,
              "zero_write_gbps": write_bandwidth(1 << 30, pattern=0) / 1e9}
    print(f"kt_jit MoE benchmark: isa={kt_jit.active_isa()} threads={threads} | read bandwidth "
          f"{bw / 1e9:.1f} GB/s, streaming write {writes['write_gbps']:.1f} GB/s (zeros "
          f"{writes['zero_write_gbps']:.1f}), bf16 peak {peak / 1e12:.2f} TFLOPS (measured now)")
    rows: list[dict] = []
    for name in names:
        e, h, i, k = SHAPES[name]
        shape_rows, bw = bench_shape(name, e, h, i, k, qlens, quants, bw, peak, repeats, torch_repeats,
                                     min_seconds)
        rows += shape_rows
        gc.collect()
    loop = rss_loop(steps, 16)
    print(f"\ntraining loop (qwen3, qlen 16): {loop['steps']} steps, {loop['step_ms']:.1f} ms/step, RSS "
          f"{loop['rss_mb_step10']:.0f} MB at step 10 -> {loop['rss_mb_end']:.0f} MB at the end "
          f"({loop['growth_mb']:+.1f} MB); peak RSS of the whole run {peak_rss_mb():.0f} MB")
    rows.append({"name": f"RSS growth over {loop['steps']} training steps (MB)", "ms": loop["step_ms"], **loop})
    rows.append({"name": "peak RSS (MB)", "ms": 0.0, "peak_rss_mb": peak_rss_mb()})
    return finish(rows, args.json, bw, peak, threads, **writes)


if __name__ == "__main__":
    raise SystemExit(main())

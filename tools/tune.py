"""Measure the per-CPU schedule values (kernels/gemm.HostTuning) on this host and print the
KT_JIT_TUNING setting that wins.

kt_jit picks a few blocking and prefetch values of its AVX-512 GEMMs (mostly the transposed ones) by
the CPU's L1 data cache size (two CPUs measured: Zen 4 and Zen 5). On another CPU other values may be
faster; this script finds out. For each value it times the MoE backward (the forward for the
two forward prefetch distances and ``int4_fwd_blocks``; LoRA rank 16, random top-k routing as in
bench_moe.py; bf16 experts, int8 ones for ``quant_prefetch``, ``quant_far_prefetch`` and on AMX
hosts, whose bf16 layers run the AMX kernels, int4 ones for ``int4_fwd_blocks``) at the token
counts whose groups that value shapes, with every candidate in one process: the candidates take
turns round by round (in alternating order), each under its own KT_JIT_TUNING (which keys its
kernels and launch plans), and each gets the median of its passes. A candidate replaces the
default only when the median of its per-round time ratios beats it by more than ``--margin``.

    python tools/tune.py [--save] [--quick] [--json PATH] [--shape qwen3-30b-a3b] [--rounds N] [--margin 0.02]

With ``--save`` the winners are stored for this CPU kind next to the kernel cache
(``KT_JIT_CACHE_DIR/tuning/<cpu>.json``, see kt_jit/runtime/tuning_store.py; values a ``--values``
run did not measure keep what an earlier run stored) and every later kt_jit process on such a CPU
starts from them (``python -m kt_jit.info`` shows them; ``--forget`` deletes
them; ``KT_JIT_STORED_TUNING=0`` ignores them). Without it, run with the printed setting, e.g.
``KT_JIT_TUNING=stream_group_blocks=16 python train.py``. Candidates are always measured against the
built-in values (a stored setting is ignored while measuring).
Timings on a shared machine are noisy: rerun before trusting a small win (``--quick`` is a smoke
run: its 4 rounds have shown wins of 5-10% on a noisy VM that 12 rounds did not confirm).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from bench_moe import RANK, SHAPES, backward_seconds, batch, flush_l3
from benchlib import finish

import kt_jit
from kt_jit.kernels import gemm
from kt_jit.kernels.probe import bf16_peak_flops, read_bandwidth
from kt_jit.moe.sft import RECORD_AT_CALL
from kt_jit.runtime import knobs, tuning_store
from kt_jit.runtime.threads import default_num_threads

# value -> (candidates, token counts whose groups it shapes: 1-4 rows per expert for the lane-partial
# slice, 1-24 for the streams' prefetch (lane-partial and streamed forms), 1-32 for the quantized
# lane-partial form's L2 prefetch, 5-24 for the streamed form's blocks, 12 and more for the
# tokens-in-lanes form, 25 and more for the panel form's blocks, 1-2 for the int4 forward's items
# (where their width shows most); the experts' weights; the pass timed)
CANDIDATES = {
    "lane_partial_slice": ((256, 512, 1024), (1, 16), "bf16", "bwd"),
    "stream_group_blocks": ((4, 8, 16), (128,), "bf16", "bwd"),
    "lanes_min_rows": ((0, 12, 16), (128, 512), "bf16", "bwd"),
    "stream_prefetch": ((256, 512, 1024, 2048), (1, 16, 128), "bf16", "bwd"),
    "quant_prefetch": ((256, 512, 1024, 2048), (1, 16), "int8", "fwd"),
    "multirow_prefetch": ((256, 512, 1024, 2048), (128, 512), "bf16", "fwd"),
    "panel_blocks": ((4, 8, 16), (512,), "bf16", "bwd"),
    "quant_far_prefetch": ((0, 2048, 4096), (1, 16, 128), "int8", "bwd"),
    "int4_fwd_blocks": ((4, 8), (1, 16), "int4", "fwd"),
}
QUICK_QLENS = {"lane_partial_slice": (16,), "stream_group_blocks": (128,), "lanes_min_rows": (512,),
               "stream_prefetch": (16,), "quant_prefetch": (16,), "multirow_prefetch": (128,),
               "panel_blocks": (512,), "quant_far_prefetch": (16,), "int4_fwd_blocks": (16,)}
# values that shape only bf16 kernels (AMX ones on AMX hosts)
BF16_ONLY = ("lanes_min_rows", "multirow_prefetch", "panel_blocks")


def weights_for(name: str, isa: str) -> str:
    """The experts' weights a value is measured on: bf16 ones run the AMX kernels on AMX hosts,
    where the AVX-512 kernels these values shape serve the quantized modes (int8 stands in)."""
    quant = CANDIDATES[name][2]
    return "int8" if quant == "bf16" and isa != "avx512" else quant


def _layer(shape: str, quant: str = "bf16", seed: int = 0):
    e, h, i, _ = SHAPES[shape]
    g = torch.Generator().manual_seed(seed)
    experts = kt_jit.MoEExperts.from_tensors(*((torch.randn(*s, generator=g) * 0.02).bfloat16()
                                               for s in ((e, i, h), (e, i, h), (e, h, i))), quant=quant)
    lora = kt_jit.MoELoRA(e, h, i, rank=RANK)
    with torch.no_grad():
        for p in lora.parameters():
            p.normal_(0.0, 0.02, generator=g)
    return experts, lora


def _routings(shape: str, qlen: int, count: int = 4, seed: int = 1):
    """``count`` batches (x, topk ids, weights) of ``qlen`` tokens, as bench_moe.py routes them."""
    e, h, _, k = SHAPES[shape]
    return [batch(qlen, k, e, h, seed + i) for i in range(count)]


def _backward_ms(experts, lora, batch) -> float:
    """One training forward, then its backward timed as bench_moe.py times it (caches emptied
    first; fresh gradients: nothing is accumulated into earlier ones)."""
    x, ids, w = batch
    for p in lora.parameters():
        p.grad = None
    out = kt_jit.moe_sft(x.detach().requires_grad_(), ids, w, experts, lora)
    return backward_seconds(out, torch.ones_like(out)) * 1e3


def _forward_ms(experts, lora, batch) -> float:
    """One training forward (activations saved for a backward), timed with cold caches like
    :func:`_backward_ms`."""
    x, ids, w = batch
    flush_l3()
    t0 = time.perf_counter()
    kt_jit.moe_sft(x.detach().requires_grad_(), ids, w, experts, lora)
    return (time.perf_counter() - t0) * 1e3


PASSES = {"fwd": _forward_ms, "bwd": _backward_ms}


def _set_tuning(setting: str) -> None:
    if setting:
        os.environ["KT_JIT_TUNING"] = setting
    else:
        os.environ.pop("KT_JIT_TUNING", None)


def measure(settings: list[str], qlen: int, shape: str, experts, lora, rounds: int,
            passes: int, timed: str = "bwd") -> dict[str, list[float]]:
    """Per KT_JIT_TUNING setting ("" = unset), its median ms of the ``timed`` pass ("fwd" or "bwd")
    in each timed round; the settings take turns, in alternating order, over the same routings."""
    batches = _routings(shape, qlen)
    run = PASSES[timed]
    times: dict[str, list[float]] = {s: [] for s in settings}
    for setting in settings:  # compile, and record every routing's launch plans (not timed)
        _set_tuning(setting)
        for one in batches * RECORD_AT_CALL:
            _backward_ms(experts, lora, one)
    for r in range(rounds):
        for setting in settings if r % 2 == 0 else settings[::-1]:
            _set_tuning(setting)
            times[setting].append(statistics.median(
                run(experts, lora, batches[(r + j) % len(batches)]) for j in range(passes)))
    _set_tuning("")
    return times


def _ratio(base: list[float], times: list[float]) -> float:
    """Median over rounds of base / times (> 1: faster than base)."""
    return statistics.median(b / t for b, t in zip(base, times, strict=True))


def tune_value(name: str, values: tuple[int, ...], qlens: tuple[int, ...], shape: str, experts, lora,
               rounds: int, passes: int, timed: str = "bwd") -> list[dict]:
    """Rows (one per candidate and qlen: median ms of the ``timed`` pass, and ``vs_default`` = the
    default's time / the candidate's, as the median of per-round ratios) for one HostTuning value."""
    default = getattr(gemm.host_tuning(), name)
    values = tuple(sorted({*values, default}))
    rows = []
    for qlen in qlens:
        times = measure([f"{name}={v}" for v in values], qlen, shape, experts, lora, rounds, passes, timed)
        base = times[f"{name}={default}"]
        for v in values:
            mine = times[f"{name}={v}"]
            rows.append({"name": f"{shape} {name}={v} qlen={qlen}", "ms": statistics.median(mine),
                         "vs_default": _ratio(base, mine), "value": name, "candidate": v, "qlen": qlen,
                         "default": v == default, "pass": timed})
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


def save_setting(setting: str, measured: dict, kept: dict[str, int] | None = None) -> Path:
    """Store a recommended KT_JIT_TUNING-style setting ("" = the built-in values) for this CPU kind,
    with ``kept`` (earlier stored values of names this run did not measure) alongside; a setting
    kt_jit would refuse is not stored (ValueError). Returns the file."""
    values = {**(kept or {}), **knobs.parse_tuning(setting)}
    gemm.replaced(gemm.host_tuning(), values)
    return tuning_store.save(values, measured)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one token count per value, 4 rounds")
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--shape", default="qwen3-30b-a3b", choices=sorted(SHAPES))
    ap.add_argument("--values", default=",".join(CANDIDATES), help="comma-separated subset of " + ",".join(CANDIDATES))
    ap.add_argument("--rounds", type=int, default=0, help="timed rounds per candidate (default 10, quick 4)")
    ap.add_argument("--passes", type=int, default=3, help="timed passes per candidate and round")
    ap.add_argument("--margin", type=float, default=0.02, help="gain a candidate needs over the default")
    ap.add_argument("--save", action="store_true", help="store the recommended setting for this CPU kind (replacing "
                    "a stored one; the built-in values when nothing wins), for every later kt_jit process to use")
    ap.add_argument("--forget", action="store_true", help="delete this CPU kind's stored setting and exit")
    args = ap.parse_args(argv)
    if args.forget:
        path = tuning_store.tuning_path()
        print(f"deleted {path}" if tuning_store.forget() else f"nothing stored at {path}")
        return 0
    if args.rounds < 0 or args.passes < 1:
        ap.error("--rounds and --passes must be at least 1")
    if args.save and args.quick:
        ap.error("--save stores what a full run measures; --quick is a smoke run whose winners can be noise")
    if os.environ.get("KT_JIT_TUNING"):
        print(f"note: KT_JIT_TUNING={os.environ['KT_JIT_TUNING']!r} is set; candidates replace it", file=sys.stderr)
    stored = dict(tuning_store.stored_values())
    os.environ["KT_JIT_STORED_TUNING"] = "0"  # candidates against the built-in values
    if stored:
        print(f"note: the stored setting {stored} ({tuning_store.tuning_path()}) is left out while measuring",
              file=sys.stderr)
    names = [n.strip() for n in args.values.split(",") if n.strip()]
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown:
        ap.error(f"unknown value(s) {unknown}; choose from {list(CANDIDATES)}")
    isa = kt_jit.active_isa()
    if isa != "avx512":  # bf16 runs the AMX kernels: the values shape the quantized modes' kernels
        skipped = [n for n in names if n in BF16_ONLY]
        names = [n for n in names if n not in BF16_ONLY]
        print(f"kt_jit runs the {isa} kernels for bf16 here: the values are measured on int8 experts"
              + (f"; {skipped} shape only bf16's AVX-512 kernels (KT_JIT_ISA=avx512 to tune them)" if skipped else ""),
              file=sys.stderr)
        if not names:
            return 2
    rounds = args.rounds or (4 if args.quick else 10)
    threads = default_num_threads()
    _set_tuning("")
    print(f"kt_jit tune: {args.shape}, isa={kt_jit.active_isa()} threads={threads}, defaults {gemm.host_tuning()}")
    layers: dict[str, tuple] = {}  # weights -> (experts, lora), built when first needed

    def layer(quant: str) -> tuple:
        if quant not in layers:
            layers[quant] = _layer(args.shape, quant)
        return layers[quant]

    rows = []
    print(f"{'value':22s} {'cand':>6s} {'qlen':>5s} {'pass':>10s} {'ms':>9s} {'vs_default':>10s}")
    for name in names:
        values, qlens, _, timed = CANDIDATES[name]
        quant = weights_for(name, isa)
        for row in tune_value(name, values, QUICK_QLENS[name] if args.quick else qlens, args.shape, *layer(quant),
                              rounds, args.passes, timed):
            rows.append(row)
            mark = " (default)" if row["default"] else ""
            print(f"{name:22s} {row['candidate']:6d} {row['qlen']:5d} {quant + ' ' + timed:>10s} {row['ms']:9.2f} "
                  f"{row['vs_default']:10.3f}{mark}")
    best = recommend(rows, args.margin)
    setting = ",".join(f"{k}={v}" for k, v in best.items())
    if len(best) > 1:  # each value was measured against the defaults alone: check them together
        checks = sorted({(weights_for(r["value"], isa), CANDIDATES[r["value"]][3], r["qlen"])
                         for r in rows if r["value"] in best})
        for quant, timed, qlen in checks:
            times = measure(["", setting], qlen, args.shape, *layer(quant), rounds, args.passes, timed)
            gain = _ratio(times[""], times[setting])
            rows.append({"name": f"{args.shape} {quant} {timed} {setting} qlen={qlen}",
                         "ms": statistics.median(times[setting]), "vs_default": gain, "value": "combined",
                         "candidate": setting, "qlen": qlen, "default": False, "pass": timed})
            print(f"{'combined':22s} {'':>6s} {qlen:5d} {quant + ' ' + timed:>10s} {rows[-1]['ms']:9.2f} "
                  f"{gain:10.3f}  ({setting})")
        if min(r["vs_default"] for r in rows if r["value"] == "combined") <= 1 + args.margin:
            setting = ""  # (together they do not hold up: keep the defaults)
    print(f"\nrecommended: KT_JIT_TUNING={setting}" if setting else "\nrecommended: the defaults (nothing beat them "
          f"by more than {args.margin:.0%})")
    rows.append({"name": "recommended", "ms": 0.0, "setting": setting, "rounds": rounds, "passes": args.passes,
                 "margin": args.margin, "quick": args.quick, "shape": args.shape})
    if args.save:
        measured = {k: rows[-1][k] for k in ("rounds", "passes", "margin", "quick", "shape")}
        kept = {k: v for k, v in stored.items() if k not in names}  # (earlier runs' other values)
        path = save_setting(setting, dict(measured, threads=threads, isa=isa, values_measured=names), kept)
        print(f"stored {setting or 'the built-in values'} for this CPU kind in {path}"
              + (f" (kept from before: {kept})" if kept else ""))
    if args.quick:
        print(f"(--quick: {rounds} rounds, one token count per value; a smoke run, not a measurement: on a noisy "
              "VM 4 rounds have shown 5-10% wins that 12 did not confirm)")
    return finish(rows, args.json, read_bandwidth(), bf16_peak_flops(), threads)


if __name__ == "__main__":
    raise SystemExit(main())

"""Shared pieces of the tools/bench_*.py scripts (row format of --json, machine row: the measured
bandwidth and peak, and the per-CPU schedule values in effect with where they came from)."""

from __future__ import annotations

import json

import kt_jit


def finish(rows: list[dict], json_path: str | None, bw: float, peak: float, threads: int,
           **measured: float) -> int:
    """Append the machine row (measured read bandwidth, bf16 peak, and any other ``measured``
    figures, e.g. write bandwidths) and write ``--json`` if asked."""
    from kt_jit.kernels.gemm import tuning_report

    rows.append({"name": "machine", "ms": 0.0, "isa": kt_jit.active_isa(), "threads": threads,
                 "read_gbps": bw / 1e9, "peak_tflops": peak / 1e12, **measured, "tuning": tuning_report()})
    if json_path:
        with open(json_path, "w") as f:
            json.dump(rows, f, indent=1)
    return 0

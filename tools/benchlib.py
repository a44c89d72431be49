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
    return write_rows(rows, json_path)


def write_rows(rows: list[dict], json_path: str | None) -> int:
    """Write the rows to ``--json`` if asked; the script's exit status (0)."""
    if json_path:
        with open(json_path, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


def mark_fp8_checkpoint(path: str, block: tuple[int, int] = (128, 128)) -> None:
    """Add an FP8 ``quantization_config`` (DeepSeek-V3's: e4m3, dynamic activations, ``block``
    scales) to the ``config.json`` in ``path``."""
    config_json = f"{path}/config.json"
    with open(config_json) as f:
        config = json.load(f)
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": list(block)}
    with open(config_json, "w") as f:
        json.dump(config, f)

"""Render a ``tools/bench_moe.py --json`` file as the markdown tables of docs/benchmarks.md (GB/s: the
bandwidth the row's floor used: the median of probe reads timed round-robin with its passes; – for
runs made before those readings; the backward without LoRA and LoRA's share of the backward: – for
runs before the twentieth session).

    python tools/bench_table.py docs/bench_moe.json
"""

from __future__ import annotations

import json
import re
import sys


def main(path: str) -> int:
    rows = json.load(open(path))
    by = {r["name"]: r for r in rows}
    pat = re.compile(r"^(\S+) (\S+) qlen=(\d+) fwd \(save\)$")
    print("| shape | quant | qlen | GB/s | fwd ms | of_floor | of_roof | vs torch | vs bf16 | bwd ms | of_floor "
          "| vs torch | vs bf16 | LoRA on fwd | bwd/fwd | bwd of_floor w/o LoRA | LoRA on bwd |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
          "| ---: | ---: |")
    for r in rows:
        m = pat.match(r["name"])
        if not m:
            continue
        shape, quant, qlen = m.groups()
        b = by[f"{shape} {quant} qlen={qlen} bwd"]
        lora = by[f"{shape} {quant} qlen={qlen} lora overhead"]
        plain = by.get(f"{shape} {quant} qlen={qlen} bwd (no LoRA)", {})  # (runs before the twentieth session: none)

        def f(x, key, fmt="{:.2f}"):
            return fmt.format(x[key]) if key in x else "–"

        cells = [shape, quant, qlen, f(r, "bw_gbs", "{:.0f}"), f"{r['ms']:.1f}", f(r, "of_floor"), f(r, "of_roof"),
                 f(r, "vs_torch"), f(r, "vs_bf16"), f"{b['ms']:.1f}", f(b, "of_floor"), f(b, "vs_torch"),
                 f(b, "vs_bf16"), f"{lora['ratio'] * 100:+.0f}%", f"{b['ms'] / r['ms']:.2f}", f(plain, "of_floor"),
                 f"{lora['bwd_ratio'] * 100:+.0f}%" if "bwd_ratio" in lora else "–"]
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))

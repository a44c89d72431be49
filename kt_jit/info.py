"""``python -m kt_jit.info``: CPU features, AMX status, threads, huge pages, kernel cache location and
stats."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def collect() -> dict:
    """Everything ``python -m kt_jit.info`` prints, as a dict."""
    from .codegen.cache import cache_info
    from .codegen.compile import toolchain_versions
    from .kernels.gemm import tuning_report
    from .runtime.amx import active_isa, amx_status
    from .runtime.buffers import huge_page_status
    from .runtime.cpu import cpu_info, l1d_cache_bytes
    from .runtime.threads import default_num_threads, launcher_name

    info = cpu_info()
    ok, why = amx_status()
    try:
        isa = active_isa()
    except RuntimeError as e:
        isa = f"none ({e})"
    return {
        "cpu": info.model_name,
        "llvm_host_cpu": info.llvm_host_name,
        "features": info.summary(),
        "l1d_bytes": l1d_cache_bytes(),
        "tuning": tuning_report(),  # (a bad KT_JIT_TUNING or stored file is reported, not raised)
        "amx": {"usable": ok, "status": why},
        "kernel_isa": isa,
        "threads": default_num_threads(),
        "launcher": launcher_name(),
        "huge_pages": huge_page_status(),
        "toolchain": toolchain_versions(),
        "cache": cache_info(),
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    data = collect()
    if "--json" in argv:
        print(json.dumps(data, indent=1))
        return 0
    print(f"CPU            {data['cpu']}  (LLVM host name: {data['llvm_host_cpu']})")
    feats = " ".join(f"{k}{'+' if v else '-'}" for k, v in data["features"].items())
    print(f"features       {feats}")
    l1d = data["l1d_bytes"]
    print(f"L1 data cache  {f'{l1d >> 10} KB per core' if l1d else 'unknown'}")
    t = data["tuning"]
    values = ", ".join(f"{k}={v}" for k, v in t["values"].items()) if "values" in t else t["error"]
    sources = ["by the L1 size"]
    if t["file_problem"]:
        sources.append(t["file_problem"])
    elif Path(t["file"]).exists():
        stored = ",".join(f"{k}={v}" for k, v in t["stored"].items()) or "(the built-in values measured best)"
        sources.append(f"stored {stored} from {t['file']}" if t["file_used"]
                       else f"KT_JIT_STORED_TUNING=0 ignores {t['file']}")
    if t["env"]:
        sources.append(f"KT_JIT_TUNING={t['env']!r}")
    print(f"tuning         {values}")
    print(f"               ({', then '.join(sources)}; tools/tune.py --save measures and stores them)")
    print(f"AMX            {'usable' if data['amx']['usable'] else 'not usable'}: {data['amx']['status']}")
    print(f"kernel ISA     {data['kernel_isa']}")
    print(f"threads        {data['threads']} via {data['launcher']}")
    hp = data["huge_pages"]
    note = "expert weights on 2 MB pages" if hp in ("always", "madvise") else "expert weights on 4 KB pages"
    print(f"huge pages     transparent huge pages: {hp} ({note})")
    tc = data["toolchain"]
    print(f"toolchain      LLVM {tc['llvm']}, llvmlite {tc['llvmlite']}")
    c = data["cache"]
    print(f"kernel cache   {c['dir']}: {c['entries']} entries, {c['bytes'] / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

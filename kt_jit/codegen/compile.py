"""IR text -> optimised module -> object code (and assembly), for a pinned target."""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass

import llvmlite
import llvmlite.binding as llvm

from ..runtime import knobs
from ..runtime.cpu import cpu_info, llvm_cpu_name
from . import perfmap
from .ir import PIPELINE_MARK

_lock = threading.RLock()  # LLVM's global state (target machines, pass builders) is not thread-safe


@functools.lru_cache(maxsize=1)
def _init_llvm() -> None:
    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()


@dataclass(frozen=True)
class Target:
    """What a kernel is compiled for; part of every cache key."""

    triple: str
    cpu: str
    features: str

    @property
    def fn_attrs(self) -> str:
        return (f'"target-cpu"="{self.cpu}" "target-features"="{self.features}" '
                '"min-legal-vector-width"="512" "prefer-vector-width"="512" nounwind')


def target_for(isa: str) -> Target:
    """The compile target for kernels of ``isa`` ("amx", "avx512", "amx_emu") on this host."""
    _init_llvm()
    info = cpu_info()
    want_amx = isa == "amx"
    feats = [f for f in info.llvm_features.split(",") if f]
    if want_amx:  # make sure AMX is on even if LLVM's host probe disagrees
        feats = [f for f in feats if f[1:] not in ("amx-tile", "amx-bf16", "amx-int8")]
        feats += ["+amx-tile", "+amx-bf16", "+amx-int8"]
    return Target(llvm.get_process_triple(), llvm_cpu_name(info, want_amx), ",".join(sorted(feats)))


def toolchain_versions() -> dict[str, str]:
    return {"llvm": ".".join(map(str, llvm.llvm_version_info)), "llvmlite": llvmlite.__version__}


@functools.lru_cache(maxsize=8)
def _target_machine(target: Target):
    _init_llvm()
    t = llvm.Target.from_triple(target.triple)
    return t.create_target_machine(cpu=target.cpu, features=target.features, opt=3,
                                   reloc="pic", codemodel="default")


# Named pass lists a module may ask for (a PIPELINE_MARK line in its text, so the cache key, which
# hashes the text, covers the choice). "light" (SROA + SimplifyCFG, leaving the rest to the code
# generator's own LICM/LSR) compiles the transposed GEMM in 55 instead of 88 ms and runs it as fast
# (same-run A/B at m = 1-64: 0.99-1.08x of O1); the forward GEMM lost ~2% with it, so it keeps O1.
PIPELINES = {"light": ("sroa", "simplify_cfg")}
# What the pipelines do is part of every disk-cache key (codegen/cache.py): edit this string with
# any change to PIPELINES or to the O1 options below.
PIPELINE_VERSION = f"O1-nounroll-novec;{sorted(PIPELINES.items())}"


def _pipeline_of(ir_text: str) -> str:
    for line in ir_text.splitlines()[:3]:
        if line.startswith(PIPELINE_MARK):
            name = line[len(PIPELINE_MARK):].strip()
            if name not in PIPELINES:
                raise ValueError(f"unknown optimisation pipeline {name!r} (known: {sorted(PIPELINES)})")
            return name
    return "default"


def _optimised_module(ir_text: str, target: Target):
    tm = _target_machine(target)
    mod = llvm.parse_assembly(ir_text)
    mod.triple = target.triple
    mod.verify()
    pipeline = _pipeline_of(ir_text)
    if pipeline != "default":
        pb = llvm.create_pass_builder(tm, llvm.create_pipeline_tuning_options(speed_level=1))
        mpm = llvm.create_new_module_pass_manager()
        for name in PIPELINES[pipeline]:
            getattr(mpm, f"add_{name}_pass")()
        mpm.run(mod, pb)
        return tm, mod
    # kernels arrive already blocked, vectorised and unrolled where it pays: the O1 pipeline
    # without vectorisers or loop unrolling runs them as fast as O2 (measured on the GEMMs: +-3%)
    # and saves a quarter of the compile time (the unroller grew the GEMM objects by 13-60%)
    pto = llvm.create_pipeline_tuning_options(speed_level=1)
    pto.loop_vectorization = False
    pto.slp_vectorization = False
    pto.loop_unrolling = False
    pb = llvm.create_pass_builder(tm, pto)
    pb.getModulePassManager().run(mod, pb)
    return tm, mod


def compile_object(ir_text: str, target: Target) -> bytes:
    """Optimise (O1, or the pipeline the module names) and emit an ELF object for ``target``."""
    with _lock:
        tm, mod = _optimised_module(ir_text, target)
        return bytes(tm.emit_object(mod))


def compile_assembly(ir_text: str, target: Target) -> str:
    """Optimise (as :func:`compile_object`) and emit assembly text for ``target`` (for dumps and
    tests)."""
    with _lock:
        tm, mod = _optimised_module(ir_text, target)
        return tm.emit_assembly(mod)


class ObjectLoader:
    """Loads object images into one process-wide LLJIT; keeps every library alive."""

    def __init__(self) -> None:
        self._lljit = None
        self._trackers: list = []
        self._n = 0

    def load(self, obj: bytes, symbols: list[str]) -> dict[str, int]:
        with _lock:
            if self._lljit is None:
                _init_llvm()
                self._lljit = llvm.create_lljit_compiler(_target_machine(target_for("avx512")))
            self._n += 1
            builder = llvm.JITLibraryBuilder().add_object_img(obj).add_current_process()
            for s in symbols:
                builder.export_symbol(s)
            tracker = builder.link(self._lljit, f"kt_jit_lib{self._n}")
            self._trackers.append(tracker)
            addresses = {s: tracker[s] for s in symbols}
        if knobs.perf_map():
            perfmap.record(addresses, obj)
        return addresses


loader = ObjectLoader()

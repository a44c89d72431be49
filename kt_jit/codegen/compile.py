"""IR text -> optimised module -> object code (and assembly), for a pinned target."""

from __future__ import annotations

import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from ctypes import c_char_p, string_at
from dataclasses import dataclass

import llvmlite
import llvmlite.binding as llvm
from llvmlite.binding import ffi

from ..runtime import knobs
from ..runtime.cpu import cpu_info, llvm_cpu_name
from . import perfmap
from .ir import PIPELINE_MARK, split_parts

# LLVM's global state here (the cached target machines, the JIT) is not thread-safe. (llvmlite takes
# its own global lock around every call into LLVM; compile_objects steps around it for the costly
# calls of parts that each have their own context and target machine.)
_lock = threading.RLock()


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


CODEGEN_LEVEL = 3  # the code generator's optimisation level, unless a pipeline names another


def _new_target_machine(target: Target, level: int):
    return llvm.Target.from_triple(target.triple).create_target_machine(
        cpu=target.cpu, features=target.features, opt=level, reloc="pic", codemodel="default")


@functools.lru_cache(maxsize=8)
def _target_machine(target: Target, level: int = CODEGEN_LEVEL):
    _init_llvm()
    return _new_target_machine(target, level)


# Named pipelines a module may ask for (a PIPELINE_MARK line in its text, so the cache key, which
# hashes the text, covers the choice): IR passes, and the code generator's optimisation level
# (default: O1 passes, code generator at 3). "light" (SROA + SimplifyCFG, leaving the rest to the
# code generator's own LICM/LSR) compiles the transposed GEMM in 55 instead of 88 ms and runs it as
# fast (same-run A/B at m = 1-64: 0.99-1.08x of O1); the forward GEMM lost ~2% with it, so it keeps
# O1. Its code generator at level 1 (mainly: no scheduling after register allocation, which an
# out-of-order core hardly needs) takes ~8% less time for the same instructions (forty-fourth
# session: MoE A/B in docs/benchmarks.md).
PIPELINES = {"light": (("sroa", "simplify_cfg"), 1)}
# What the pipelines do is part of every disk-cache key (codegen/cache.py): edit this string with
# any change to PIPELINES or to the O1 options below.
PIPELINE_VERSION = f"O1-nounroll-novec;codegen{CODEGEN_LEVEL};{sorted(PIPELINES.items())}"


def _pipeline_of(ir_text: str) -> str:
    for line in ir_text.splitlines()[:3]:
        if line.startswith(PIPELINE_MARK):
            name = line[len(PIPELINE_MARK):].strip()
            if name not in PIPELINES:
                raise ValueError(f"unknown optimisation pipeline {name!r} (known: {sorted(PIPELINES)})")
            return name
    return "default"


def _codegen_level(ir_text: str) -> int:
    """The code generator's optimisation level for the pipeline ``ir_text`` names."""
    pipeline = _pipeline_of(ir_text)
    return CODEGEN_LEVEL if pipeline == "default" else PIPELINES[pipeline][1]


def _pass_builder(tm, ir_text: str):
    """The pass builder and module pass manager of the pipeline ``ir_text`` names."""
    pipeline = _pipeline_of(ir_text)
    pto = llvm.create_pipeline_tuning_options(speed_level=1)
    if pipeline != "default":
        pb = llvm.create_pass_builder(tm, pto)
        mpm = llvm.create_new_module_pass_manager()
        for name in PIPELINES[pipeline][0]:
            getattr(mpm, f"add_{name}_pass")()
        return pb, mpm
    # kernels arrive already blocked, vectorised and unrolled where it pays: the O1 pipeline
    # without vectorisers or loop unrolling runs them as fast as O2 (measured on the GEMMs: +-3%)
    # and saves a quarter of the compile time (the unroller grew the GEMM objects by 13-60%)
    pto.loop_vectorization = False
    pto.slp_vectorization = False
    pto.loop_unrolling = False
    pb = llvm.create_pass_builder(tm, pto)
    return pb, pb.getModulePassManager()


def _optimised_module(ir_text: str, target: Target):
    tm = _target_machine(target, _codegen_level(ir_text))
    mod = llvm.parse_assembly(ir_text)
    mod.triple = target.triple
    mod.verify()
    pb, mpm = _pass_builder(tm, ir_text)
    mpm.run(mod, pb)
    return tm, mod


def _unlocked(name: str):
    """llvmlite's C function ``name`` without the global lock llvmlite's wrapper takes around every
    call; None if this llvmlite does not expose it."""
    return getattr(getattr(ffi.lib, name), "_cfn", None)


_UNLOCKED = ("LLVMPY_ParseAssembly", "LLVMPY_VerifyModule", "LLVMPY_RunNewModulePassManager",
             "LLVMPY_TargetMachineEmitToMemory")


def _compile_part_unlocked(ir_text: str, target: Target) -> bytes:
    """:func:`compile_objects` for one part, safe to run on several threads at once: LLVM allows one
    thread per LLVMContext, and the part has its own context and target machine. The costly calls
    (parse, verify, optimise, emit) run outside llvmlite's global lock (ctypes releases the GIL in
    them); the few cheap ones (creation, disposal) take it."""
    parse, verify, run, emit = (_unlocked(n) for n in _UNLOCKED)
    ctx = llvm.create_context()
    try:
        tm = _new_target_machine(target, _codegen_level(ir_text))
        with ffi.OutputString() as err:
            mod = llvm.ModuleRef(parse(ctx, c_char_p(ir_text.encode()), err), ctx)
            if err:
                mod.close()
                raise RuntimeError(f"LLVM IR parsing error\n{err}")
        try:
            mod.triple = target.triple
            with ffi.OutputString() as err:
                if verify(mod, err):
                    raise RuntimeError(str(err))
            pb, mpm = _pass_builder(tm, ir_text)
            run(mpm, mod, pb)
            with ffi.OutputString() as err:
                buf = emit(tm, mod, 1, err)
                if not buf:
                    raise RuntimeError(str(err))
            try:
                return string_at(ffi.lib.LLVMPY_GetBufferStart(buf), ffi.lib.LLVMPY_GetBufferSize(buf))
            finally:
                ffi.lib.LLVMPY_DisposeMemoryBuffer(buf)
        finally:
            mod.close()
    finally:
        ctx.close()


def _compile_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # (not Linux)
        return os.cpu_count() or 1


# The compile threads live as long as the process (or until a fork: the child makes its own). A
# thread's malloc arena keeps the memory LLVM used, so a compile on a thread that has compiled
# before skips most of the page faults of a fresh one: the transposed GEMM's cold compile after the
# forward's, Zen 5, 2 threads, fresh processes: ~91 ms against ~94 with new threads per call.
_pool: tuple[int, ThreadPoolExecutor] | None = None
_pool_lock = threading.Lock()


def _forget_pool() -> None:
    global _pool
    _pool = None


os.register_at_fork(after_in_child=_forget_pool)


def _compile_pool(threads: int) -> ThreadPoolExecutor:
    """The process's compile threads (``threads`` of them; a new pool if that number changed)."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool[0] != threads:
            if _pool is not None:
                _pool[1].shutdown(wait=False)
            _pool = (threads, ThreadPoolExecutor(threads, thread_name_prefix="kt_jit_compile"))
        return _pool[1]


def compile_objects(ir_text: str, target: Target) -> list[bytes]:
    """Optimise (O1, or the pipeline the module names) and emit an ELF object for ``target`` per
    part of the module (:meth:`ir.Module.part`; most modules have one). Parts compile in parallel
    on the process's compile threads, one per core this process may use."""
    texts = split_parts(ir_text)
    threads = _compile_threads()
    if threads == 1 or not all(_unlocked(n) for n in _UNLOCKED):
        with _lock:
            return [_emit_object(text, target) for text in texts]
    _init_llvm()
    pool = _compile_pool(threads)  # the longest texts first (they take longest)
    jobs = {i: pool.submit(_compile_part_unlocked, texts[i], target)
            for i in sorted(range(len(texts)), key=lambda i: -len(texts[i]))}
    return [jobs[i].result() for i in range(len(texts))]


def _emit_object(ir_text: str, target: Target) -> bytes:
    tm, mod = _optimised_module(ir_text, target)
    return bytes(tm.emit_object(mod))


def compile_assembly(ir_text: str, target: Target) -> str:
    """Optimise (as :func:`compile_objects`) and emit assembly text for ``target``, of every part
    in turn (for dumps and tests)."""
    with _lock:
        out = []
        for text in split_parts(ir_text):
            tm, mod = _optimised_module(text, target)
            out.append(tm.emit_assembly(mod))
        return "".join(out)


class ObjectLoader:
    """Loads object images into one process-wide LLJIT; keeps every library alive."""

    def __init__(self) -> None:
        self._lljit = None
        self._trackers: list = []
        self._n = 0

    def load(self, objects: list[bytes], symbols: list[str]) -> dict[str, int]:
        """Link ``objects`` (a module's parts, which may call each other) into one library; the
        addresses of ``symbols`` (with KT_JIT_PERF_MAP also of the further parts' functions)."""
        mapped = knobs.perf_map()
        if mapped:
            symbols = list(symbols) + [f for obj in objects[1:] for f in perfmap.global_functions(obj)
                                       if f not in symbols]
        with _lock:
            if self._lljit is None:
                _init_llvm()
                self._lljit = llvm.create_lljit_compiler(_target_machine(target_for("avx512")))
            self._n += 1
            builder = llvm.JITLibraryBuilder()
            for obj in objects:
                builder.add_object_img(obj)
            builder.add_current_process()
            for s in symbols:
                builder.export_symbol(s)
            tracker = builder.link(self._lljit, f"kt_jit_lib{self._n}")
            self._trackers.append(tracker)
            addresses = {s: tracker[s] for s in symbols}
        if mapped:
            for obj in objects:
                perfmap.record(addresses, obj)
        return addresses


loader = ObjectLoader()

"""On-disk kernel cache: object code + JSON metadata, an in-process memo, and statistics.

Layout: ``$KT_JIT_CACHE_DIR/v<CODEGEN_VERSION>/<key[:2]>/<key>.o`` and ``<key>.json`` (a module
compiled in parts, codegen/ir.py ``Module.part``, stores its objects one after the other in the
``.o``, their sizes in the metadata). The key is a
sha256 over the kernel spec, the IR text, the target (triple, CPU name, features), the LLVM and
llvmlite versions, CODEGEN_VERSION and the optimisation pipelines' description
(``compile.PIPELINE_VERSION``). Writes go to a unique temp file and are renamed into place
(object first, metadata last), so readers never see half an entry and concurrent compilers of the
same kernel both succeed. The metadata records the object's size and sha256: a truncated or
corrupted entry is detected, reported with a warning and recompiled.

Kernels whose IR is costly to build (the GEMMs': up to ~9 ms of Python) pass a builder instead of
the text. Their entry is then also named by an index file, ``<index key>.idx``, holding the entry's
key. The index key hashes everything the IR is made from: the spec, the source of every kt_jit
module and the module-level constants of the loaded codegen, kernels and runtime modules as they
are at the call (a test that patches one gets other kernels), with the target and versions. A warm
start so finds the entry without building the IR; an index whose entry is missing or damaged
costs an IR build, nothing more.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..runtime import knobs
from . import compile as cc

CODEGEN_VERSION = 2


@dataclass
class CacheStats:
    hits: int = 0          # kernels loaded from disk
    memo_hits: int = 0     # lookups answered by the in-process memo
    compiles: int = 0      # kernels compiled by this process
    compile_seconds: float = 0.0
    load_seconds: float = 0.0
    recovered: int = 0     # corrupt entries that were recompiled
    index_hits: int = 0    # kernels found on disk through their index, without building their IR
    ir_builds: int = 0     # IR modules built from a builder (index misses)
    by_kernel: dict[str, str] = field(default_factory=dict)  # name -> "compiled" | "disk" | "memo"


stats = CacheStats()
_memo: dict[str, dict[str, int]] = {}
_lock = threading.Lock()


def cache_root() -> Path:
    return knobs.cache_dir() / f"v{CODEGEN_VERSION}"


def cache_key(spec_text: str, ir_text: str, target: cc.Target) -> str:
    h = hashlib.sha256()
    versions = cc.toolchain_versions()
    for part in (spec_text, ir_text, target.triple, target.cpu, target.features,
                 versions["llvm"], versions["llvmlite"], str(CODEGEN_VERSION), cc.PIPELINE_VERSION):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


@functools.cache
def _source_digest() -> str:
    """sha256 over the source files of the kt_jit package (read once per process)."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.py")):
        h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


_CONSTANT_TYPES = (bool, int, float, str, tuple, frozenset, dict, list)
_BUILDER_PACKAGES = ("kt_jit.codegen.", "kt_jit.kernels.", "kt_jit.runtime.")  # (the layers IR comes from)


def _constants_digest() -> str:
    """sha256 over the upper-case module-level constants of the loaded modules that build IR, as
    they are now (their values steer the IR builders; tests patch some)."""
    h = hashlib.sha256()
    for name in sorted(n for n in list(sys.modules) if n.startswith(_BUILDER_PACKAGES)):
        mod = sys.modules.get(name)
        if mod is None:
            continue
        for k, v in vars(mod).items():
            if k.isupper() and isinstance(v, _CONSTANT_TYPES):
                h.update(f"{name}.{k}={v!r}\0".encode())
    return h.hexdigest()


def index_key(spec_text: str, target: cc.Target) -> str:
    """The key of the index entry naming the cache entry of a kernel built from ``spec_text`` by
    this kt_jit (sources and constants) for ``target``."""
    return cache_key(spec_text, f"index:{_source_digest()}:{_constants_digest()}", target)


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _read_entry(key: str) -> list[bytes] | None:
    """The cached objects (one per module part) for ``key``; None if absent. Raises ValueError if
    the entry is damaged."""
    base = cache_root() / key[:2] / key
    meta_path, obj_path = base.with_suffix(".json"), base.with_suffix(".o")
    if not meta_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        obj = obj_path.read_bytes()
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"unreadable cache entry: {e}") from e
    if len(obj) != meta.get("object_bytes") or hashlib.sha256(obj).hexdigest() != meta.get("object_sha256"):
        raise ValueError("object size or checksum does not match its metadata")
    sizes = meta.get("part_bytes", [len(obj)])
    if not (isinstance(sizes, list) and all(isinstance(n, int) and n > 0 for n in sizes) and sum(sizes) == len(obj)):
        raise ValueError("the parts' sizes do not add up to the object's")
    parts, at = [], 0
    for n in sizes:
        parts.append(obj[at:at + n])
        at += n
    return parts


def _write_entry(key: str, objects: list[bytes], meta: dict) -> None:
    """Store ``objects`` (a module's parts) as one file, the parts' sizes in the metadata."""
    base = cache_root() / key[:2] / key
    obj = b"".join(objects)
    meta = dict(meta, object_bytes=len(obj), object_sha256=hashlib.sha256(obj).hexdigest(),
                part_bytes=[len(o) for o in objects])
    _write_quietly((base.with_suffix(".o"), obj), (base.with_suffix(".json"), json.dumps(meta, indent=1).encode()))


def _write_index(index: str, key: str) -> None:
    _write_quietly((cache_root() / index[:2] / f"{index}.idx", key.encode()))


def _write_quietly(*files: tuple[Path, bytes]) -> None:
    """Write ``files`` atomically, in order; a read-only or full disk costs a recompile next time
    (a warning), nothing more."""
    try:
        for path, data in files:
            _atomic_write(path, data)
    except OSError as e:
        warnings.warn(f"kt_jit: could not write kernel cache entry ({e})", RuntimeWarning, stacklevel=4)


def _dump(name: str, ir_text: str, target: cc.Target) -> None:
    d = knobs.dump_dir()
    if d is None:
        return
    try:
        d.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ValueError(f"KT_JIT_DUMP_DIR={d} is not a directory: set it to a directory (made if missing) or "
                         "unset it") from None
    (d / f"{name}.ll").write_text(ir_text)
    (d / f"{name}.s").write_text(cc.compile_assembly(ir_text, target))


def _read_index(index: str) -> str | None:
    """The entry key an index file names, or None (absent; damaged: with a warning)."""
    path = cache_root() / index[:2] / f"{index}.idx"
    try:
        key = path.read_text().strip()
    except FileNotFoundError:
        return None
    except OSError as e:
        key = f"({e})"
    if not re.fullmatch(r"[0-9a-f]{64}", key):
        warnings.warn(f"kt_jit: damaged cache index {path.name}; rebuilding the kernel's IR", RuntimeWarning,
                      stacklevel=3)
        return None
    return key


def _from_disk(name: str, key: str, symbols: list[str]) -> dict[str, int] | None:
    """Load the entry ``key`` from disk; None if absent, or damaged (warned, counted as recovered)."""
    try:
        objects = _read_entry(key)
    except ValueError as e:
        warnings.warn(f"kt_jit: damaged cache entry for {name} ({e}); recompiling", RuntimeWarning, stacklevel=3)
        stats.recovered += 1
        return None
    if objects is None:
        return None
    t0 = time.perf_counter()
    try:
        addrs = cc.loader.load(objects, symbols)
    except Exception as e:  # an object LLVM cannot link is as good as corrupt
        warnings.warn(f"kt_jit: cache entry for {name} failed to load ({e}); recompiling", RuntimeWarning,
                      stacklevel=3)
        stats.recovered += 1
        addrs = None
    stats.load_seconds += time.perf_counter() - t0
    if addrs is not None:
        stats.hits += 1
        stats.by_kernel[name] = "disk"
    return addrs


def get_or_compile(name: str, spec_text: str, ir: str | Callable[[], str], target: cc.Target,
                   symbols: list[str]) -> dict[str, int]:
    """Addresses of ``symbols`` for this kernel: from the memo, the disk cache, or a fresh compile.

    ``ir`` is the module's IR text, or a function that builds it; with a function, ``spec_text``
    must name everything the IR is built from besides kt_jit's code and constants (the kernel's
    spec): a warm start then finds the entry through its index, without building the IR."""
    use_disk = not knobs.cache_disabled()
    with _lock:
        # (the builder's module is part of the index's spec: a copy of a kernel module loaded beside
        # it, as A/B measurements load the old code, must not find the original's kernels)
        index = index_key(f"{ir.__module__}: {spec_text}", target) \
            if callable(ir) and knobs.dump_dir() is None else None
        failed = None  # an entry the index named that could not be loaded
        if index is not None:
            hit = _memo.get(index)
            if hit is not None:
                stats.memo_hits += 1
                stats.by_kernel[name] = "memo"
                return hit
            named = _read_index(index) if use_disk else None
            if named is not None:
                addrs = _memo.get(named) or _from_disk(name, named, symbols)
                if addrs is not None:
                    stats.index_hits += 1
                    _memo[index] = _memo[named] = addrs
                    return addrs
                failed = named
        if callable(ir):
            ir = ir()
            stats.ir_builds += 1
        key = cache_key(spec_text, ir, target)
        addrs = _memo.get(key)
        if addrs is not None:
            stats.memo_hits += 1
            stats.by_kernel[name] = "memo"
        else:
            _dump(name, ir, target)
            if use_disk and key != failed:
                addrs = _from_disk(name, key, symbols)
            if addrs is None:
                t0 = time.perf_counter()
                objects = cc.compile_objects(ir, target)
                stats.compile_seconds += time.perf_counter() - t0
                stats.compiles += 1
                stats.by_kernel[name] = "compiled"
                if use_disk:
                    _write_entry(key, objects, {"name": name, "spec": spec_text, "target": target.__dict__,
                                            **cc.toolchain_versions(), "codegen_version": CODEGEN_VERSION,
                                            "created": time.time()})
                t0 = time.perf_counter()
                addrs = cc.loader.load(objects, symbols)
                stats.load_seconds += time.perf_counter() - t0
            _memo[key] = addrs
        if index is not None:
            _memo[index] = addrs
            if use_disk:
                _write_index(index, key)
        return addrs


def cache_info() -> dict:
    """Entries and bytes on disk, plus this process's hits, compiles and seconds spent compiling."""
    root = cache_root()
    entries, nbytes = 0, 0
    if root.exists():
        for p in root.rglob("*"):
            if p.is_file() and not p.name.endswith(".tmp"):
                nbytes += p.stat().st_size
                entries += p.suffix == ".json"
    return {"dir": str(root), "entries": entries, "bytes": nbytes, "hits": stats.hits,
            "memo_hits": stats.memo_hits, "compiles": stats.compiles,
            "compile_seconds": round(stats.compile_seconds, 4),
            "load_seconds": round(stats.load_seconds, 4), "recovered": stats.recovered,
            "index_hits": stats.index_hits, "ir_builds": stats.ir_builds}


_ENTRY = re.compile(r"^\.?[0-9a-f]{64}\.(o|json|idx)(\..*\.tmp)?$")


def clear_cache() -> int:
    """Delete every kt_jit entry on disk (all codegen versions); returns how many were removed.

    Only files kt_jit writes (``v<N>/<xx>/<sha256>.o|.json|.idx`` and their temp files) are touched, so a
    KT_JIT_CACHE_DIR pointing at a shared directory loses nothing else. Kernels already loaded in
    this process keep working.
    """
    root = knobs.cache_dir()
    removed = 0
    for version_dir in root.glob("v[0-9]*") if root.exists() else ():
        for p in version_dir.glob("??/*"):
            if p.is_file() and _ENTRY.match(p.name):
                removed += p.name.endswith(".json")
                p.unlink(missing_ok=True)
        for d in version_dir.glob("??"):
            try:
                d.rmdir()
            except OSError:
                pass
    return removed

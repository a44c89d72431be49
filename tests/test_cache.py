"""On-disk kernel cache: persistence across processes, corruption recovery, concurrent compiles."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import kt_jit

# compiles (or loads) one GEMM pair and prints this process's cache stats as JSON
CHILD = textwrap.dedent("""
    import json, sys, warnings, torch, kt_jit
    warnings.simplefilter("always")
    w = kt_jit.pack_bf16(torch.randn(64, 128).bfloat16())
    x = torch.randn(5, 128).bfloat16()
    y = kt_jit.linear(x, w)
    dx = kt_jit.linear_t(torch.randn(5, 64).bfloat16(), w)
    ref = x.float() @ kt_jit.unpack_bf16(w).float().T
    assert ((y - ref).abs().max() < 1e-3), "wrong result"
    print(json.dumps(kt_jit.cache_info()))
""")


def _run(cache_dir, check=True):
    env = dict(os.environ, KT_JIT_CACHE_DIR=str(cache_dir))
    proc = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def _stats(proc):
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_second_process_compiles_nothing(tmp_path):
    first = _stats(_run(tmp_path))
    assert first["compiles"] == 2 and first["entries"] == 2
    second = _stats(_run(tmp_path))
    assert second["compiles"] == 0 and second["hits"] == 2
    # the GEMMs are found through their index: no IR built
    assert second["index_hits"] == 2 and second["ir_builds"] == 0


def test_damaged_or_stale_index_costs_an_ir_build_only(tmp_path):
    _run(tmp_path)
    indexes = sorted(tmp_path.rglob("*.idx"))
    assert len(indexes) == 2
    indexes[0].write_text("garbage")
    indexes[1].write_text("0" * 64)  # names an entry that does not exist
    proc = _run(tmp_path)
    stats = _stats(proc)
    assert stats["compiles"] == 0 and stats["hits"] == 2 and stats["ir_builds"] == 2
    assert "damaged cache index" in proc.stderr
    assert _stats(_run(tmp_path))["index_hits"] == 2  # rewritten


def test_index_key_follows_code_constants(monkeypatch):
    from kt_jit.codegen import cache
    from kt_jit.codegen.compile import target_for
    from kt_jit.kernels import gemm
    target = target_for("avx512")
    before = cache.index_key("spec", target)
    assert cache.index_key("spec", target) == before and cache.index_key("other spec", target) != before
    monkeypatch.setattr(gemm, "STREAM_ROW_STEP", gemm.STREAM_ROW_STEP + 1)
    assert cache.index_key("spec", target) != before


def test_a_copy_of_the_gemm_module_gets_its_own_kernels(tmp_path, monkeypatch):
    """A copy of kernels/gemm.py loaded beside it (as A/B measurements load the old code) whose IR
    differs finds none of gemm.py's kernels through the index memo, though its specs print the same."""
    import importlib.util

    from kt_jit.kernels import gemm
    monkeypatch.setenv("KT_JIT_CACHE_DIR", str(tmp_path))
    name = "kt_jit.kernels._gemm_copy"
    copy_path = tmp_path / "_gemm_copy.py"
    copy_path.write_text(Path(gemm.__file__).read_text())
    spec = importlib.util.spec_from_file_location(name, copy_path)
    copy = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, copy)
    spec.loader.exec_module(copy)
    # (the old code's IR: here gemm.py's with a comment line more)
    monkeypatch.setattr(copy, "build_ir", lambda s: gemm.build_ir(s).replace("\n", "\n; the copy\n", 1))

    def kernel(mod):
        schedule = mod.default_schedule("fwd", "avx512", 64, 64)
        return mod.GemmKernel(mod.GemmSpec("fwd", 64, 64, "avx512", False, schedule))

    ours, theirs = kernel(gemm), kernel(copy)
    assert repr(ours.spec) == repr(theirs.spec) and ours.addr != theirs.addr


def test_declared_pointer_fields_are_checked():
    from kt_jit.codegen.ir import Module
    from kt_jit.codegen.worker import ArgBlock
    block = ArgBlock(["a", "b"], pointers=["a"])
    assert block.pointers == {block.fields.index("a")}
    fn = Module("m", "").function("f", [("ptr", "%ctx")])
    block.load_ptr(fn, "%ctx", "a")
    with pytest.raises(AssertionError, match="'b' is loaded as a pointer but not declared"):
        block.load_ptr(fn, "%ctx", "b")


def test_corrupt_and_truncated_entries_are_recompiled(tmp_path):
    _run(tmp_path)
    objs = sorted(tmp_path.rglob("*.o"))
    assert len(objs) == 2
    objs[0].write_bytes(objs[0].read_bytes()[:100])          # truncated
    objs[1].write_bytes(b"\x7fELF" + os.urandom(2000))        # garbage of another size
    proc = _run(tmp_path)
    stats = _stats(proc)
    assert stats["compiles"] == 2 and stats["recovered"] == 2
    assert "damaged cache entry" in proc.stderr
    assert _stats(_run(tmp_path))["compiles"] == 0  # repaired on disk


def test_corrupt_metadata_is_recompiled(tmp_path):
    _run(tmp_path)
    for meta in tmp_path.rglob("*.json"):
        meta.write_text("{not json")
    stats = _stats(_run(tmp_path))
    assert stats["compiles"] == 2 and stats["recovered"] == 2


def test_two_processes_compiling_at_once(tmp_path):
    env = dict(os.environ, KT_JIT_CACHE_DIR=str(tmp_path))
    procs = [subprocess.Popen([sys.executable, "-c", CHILD], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate() for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    assert not list(tmp_path.rglob("*.tmp"))
    assert _stats(_run(tmp_path))["compiles"] == 0


def test_cache_info_and_clear(tmp_path, monkeypatch):
    _run(tmp_path)
    monkeypatch.setenv("KT_JIT_CACHE_DIR", str(tmp_path))
    info = kt_jit.cache_info()
    assert info["entries"] == 2 and info["bytes"] > 0
    assert kt_jit.clear_cache() == 2
    assert kt_jit.cache_info()["entries"] == 0


def test_unwritable_cache_dir_still_runs(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    proc = _run(blocker / "sub")
    assert _stats(proc)["compiles"] == 2
    assert "could not write kernel cache entry" in proc.stderr


@pytest.mark.parametrize("var", ["KT_JIT_DUMP_DIR"])
def test_dump_dir_gets_ll_and_s(tmp_path, var):
    env = dict(os.environ, KT_JIT_CACHE_DIR=str(tmp_path / "c"), **{var: str(tmp_path / "d")})
    subprocess.run([sys.executable, "-c", CHILD], env=env, check=True, capture_output=True)
    names = {p.suffix for p in (tmp_path / "d").iterdir()}
    assert names == {".ll", ".s"}
    (tmp_path / "f").write_text("")  # a file where the directory should be: named, not FileExistsError
    env = dict(env, KT_JIT_CACHE_DIR=str(tmp_path / "c2"), **{var: str(tmp_path / "f")})
    proc = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and f"{var}={tmp_path / 'f'} is not a directory" in proc.stderr


def test_clear_cache_only_removes_its_own_files(tmp_path, monkeypatch):
    _run(tmp_path)
    keep = [tmp_path / "notes.json", tmp_path / "v1" / "ab" / "build.o"]
    for k in keep:
        k.parent.mkdir(parents=True, exist_ok=True)
        k.write_text("x")
    monkeypatch.setenv("KT_JIT_CACHE_DIR", str(tmp_path))
    assert kt_jit.clear_cache() == 2
    assert all(k.exists() for k in keep)


PERF_CHILD = textwrap.dedent("""
    import json, os, torch, kt_jit
    from kt_jit.codegen import cache, perfmap
    from kt_jit.kernels.gemm import kernel_for
    perfmap.map_path().unlink(missing_ok=True)  # (a file left by an earlier process with this pid)
    try:
        w = kt_jit.pack_bf16(torch.randn(64, 128).bfloat16())
        kt_jit.linear(torch.randn(5, 128).bfloat16(), w)
        kt_jit.linear_t(torch.randn(5, 64).bfloat16(), w)
        kernel_for("bwd", 64, 128)  # the MoE's transposed GEMM: in two module parts
        loaded = sorted(n for n, how in cache.stats.by_kernel.items() if how != "memo")
        print(json.dumps({"map": perfmap.read_map(), "loaded": loaded}))
    finally:
        perfmap.map_path().unlink(missing_ok=True)
""")


def test_perf_map_names_every_loaded_kernel(tmp_path):
    """KT_JIT_PERF_MAP=1: each kernel linked, compiled or loaded from the cache, gets one line in
    /tmp/perf-<pid>.map with its name, start and size (from the object's symbol table), as does each
    function of a further module part; ranges do not overlap. Off by default."""
    from kt_jit.codegen import perfmap

    assert perfmap.symbol_sizes(b"not an object file") == {}
    assert perfmap.symbol_sizes(b"\x7fELF\x02\x01" + b"\xff" * 100) == {}  # (damaged: nothing, no error)
    for on in (True, True, False):  # (the first run compiles, the second loads from the cache)
        env = {k: v for k, v in os.environ.items() if k != "KT_JIT_PERF_MAP"}
        env |= {"KT_JIT_CACHE_DIR": str(tmp_path)} | ({"KT_JIT_PERF_MAP": "1"} if on else {})
        proc = subprocess.run([sys.executable, "-c", PERF_CHILD], env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        if not on:
            assert out["map"] == []
            continue
        names = sorted(name for _, _, name in out["map"])
        assert [n for n in names if n in out["loaded"]] == out["loaded"] and len(out["loaded"]) >= 2
        # and the functions of the transposed GEMM's further module part (its streamed form's larger
        # groups), nothing else
        parts = [n for n in names if n not in out["loaded"]]
        assert parts and all(any(n.startswith(k + "_rows") for k in out["loaded"]) for n in parts)
        ends = 0
        for start, size, _ in out["map"]:
            assert size > 0 and start >= ends
            ends = start + size


def test_perf_map_failures_never_fail_a_kernel_load(tmp_path, monkeypatch):
    """A map that cannot be written (here: its path is a directory) gives one warning; kernels
    still load, from the cache too, with no "damaged cache entry" report. A stale map (older than
    the process, left by an earlier one with its pid) is replaced, a fresh one appended to."""
    from kt_jit.codegen import perfmap

    child = textwrap.dedent("""
        import os, pathlib, warnings, torch, kt_jit
        from kt_jit.codegen import perfmap
        perfmap.map_path = lambda pid=None: pathlib.Path(os.environ["MAP_PATH"])
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            w = kt_jit.pack_bf16(torch.randn(64, 128).bfloat16())
            kt_jit.linear(torch.randn(5, 128).bfloat16(), w)
            kt_jit.linear_t(torch.randn(5, 64).bfloat16(), w)
        msgs = [str(x.message) for x in seen]
        assert sum("perf map" in m for m in msgs) == 1, msgs
        assert not any("cache entry" in m for m in msgs), msgs
        print("ok")
    """)
    (tmp_path / "a_directory").mkdir()
    env = dict(os.environ, KT_JIT_CACHE_DIR=str(tmp_path / "cache"), KT_JIT_PERF_MAP="1",
               MAP_PATH=str(tmp_path / "a_directory"))
    for _ in range(2):  # compiled, then from the cache
        proc = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True)
        assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr

    # stale against fresh, in this process (the module's state is reset around it)
    path = tmp_path / "perf.map"
    monkeypatch.setattr(perfmap, "map_path", lambda pid=None: path)
    for name, value in (("_lines", []), ("_written_by", 0), ("_written", 0), ("_failed", False)):
        monkeypatch.setattr(perfmap, name, value)
    monkeypatch.setattr(perfmap, "symbol_sizes", lambda o: {"k1": 16, "k2": 32})  # (the file handling is tested)
    path.write_text("1000 10 left_by_an_earlier_process\n")
    os.utime(path, (1, 1))
    perfmap.record({"k1": 0x2000}, b"")
    assert [n for _, _, n in perfmap.read_map()] == ["k1"]
    perfmap.record({"k2": 0x3000}, b"")
    assert [n for _, _, n in perfmap.read_map()] == ["k1", "k2"]
    # as in a fork's child, whose map another writer (e.g. CPython's -X perf) has just started:
    # every line so far is appended after the other writer's
    monkeypatch.setattr(perfmap, "_written_by", 0)
    path.write_text("1000 10 python_trampoline\n")
    perfmap.record({"k1": 0x4000}, b"")
    assert [n for _, _, n in perfmap.read_map()] == ["python_trampoline", "k1", "k2", "k1"]

"""Modules in parts (codegen/ir.py Module.part): split, compiled in parallel, linked, cached."""

import ctypes
import dataclasses
import json
import multiprocessing
import re
import threading

import pytest

from kt_jit.codegen import cache
from kt_jit.codegen import compile as cc
from kt_jit.codegen.ir import PART_MARK, Module, split_parts
from kt_jit.kernels import gemm


def _two_part_module(name: str) -> str:
    """``i64 name(i64 x) = name_times3(x) + 1``, ``name_times3`` in a further part."""
    mod = Module(name, cc.target_for("avx512").fn_attrs)
    part = mod.part(f"{name}_times3").function(f"{name}_times3", [("i64", "%x")], ret="i64")
    part.ret(part.mul("%x", 3))
    sym = mod.declare(f"{name}_times3", f"declare i64 @{name}_times3(i64) #0")
    fn = mod.function(name, [("i64", "%x")], ret="i64")
    fn.ret(fn.add(fn.val(f"call i64 {sym}(i64 %x)"), 1))
    return mod.render()


def test_split_parts():
    text = _two_part_module("kt_test_split")
    main, part = split_parts(text)
    assert text.count(PART_MARK) == 1
    assert "define i64 @kt_test_split(" in main and "declare i64 @kt_test_split_times3" in main
    assert "define i64 @kt_test_split_times3(" in part and PART_MARK not in main + part
    assert main.startswith("; ModuleID") and part.startswith("; ModuleID")
    one = Module("kt_test_one", "nounwind").render()
    assert split_parts(one) == [one]


def test_parallel_compile_gives_the_serial_objects(monkeypatch):
    """Parts compiled at once on two threads (outside llvmlite's lock, each with its own context and
    target machine) give byte for byte the objects each part compiles to alone under the lock."""
    spec = gemm.GemmSpec("bwd", 192, 256, "avx512", False, gemm.default_schedule("bwd", "avx512", 192, 256))
    text, target = gemm.build_ir(spec), cc.target_for("avx512")
    monkeypatch.setattr(cc, "_compile_threads", lambda: 2)
    parallel = cc.compile_objects(text, target)
    monkeypatch.setattr(cc, "_compile_threads", lambda: 1)
    serial = cc.compile_objects(text, target)
    assert len(parallel) == 2 and parallel == serial
    assert serial == [cc.compile_objects(t, target)[0] for t in split_parts(text)]


def test_compile_threads_outlive_a_call_and_a_fork(monkeypatch):
    """Parts compile on the process's compile threads, the same ones from call to call (their malloc
    arenas stay warm); a forked child, which has none of them, makes its own and compiles."""
    text, target = _two_part_module("kt_test_pool"), cc.target_for("avx512")
    threads = []
    part = cc._compile_part_unlocked
    monkeypatch.setattr(cc, "_compile_threads", lambda: 2)
    monkeypatch.setattr(cc, "_compile_part_unlocked",
                        lambda t, tg: threads.append(threading.current_thread()) or part(t, tg))
    first = cc.compile_objects(text, target)
    for _ in range(3):
        assert cc.compile_objects(text, target) == first
    assert len(threads) == 8 and len(set(threads)) <= 2 and threading.current_thread() not in threads
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as child:
        assert child.apply_async(cc.compile_objects, (text, target)).get(timeout=60) == first


def test_parts_link_run_and_come_back_from_the_disk_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KT_JIT_CACHE_DIR", str(tmp_path))
    name = "kt_test_parts_link"
    text, target = _two_part_module(name), cc.target_for("avx512")
    key = cache.cache_key("parts-test", text, target)

    def run() -> int:
        addr = cache.get_or_compile(name, "parts-test", text, target, [name])[name]
        return ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_int64)(addr)(5)

    compiles, hits = cache.stats.compiles, cache.stats.hits
    assert run() == 16 and cache.stats.compiles == compiles + 1
    meta = json.loads(next(tmp_path.rglob(f"{key}.json")).read_text())
    assert len(meta["part_bytes"]) == 2 and sum(meta["part_bytes"]) == meta["object_bytes"]
    cache._memo.pop(key)
    assert run() == 16 and cache.stats.hits == hits + 1  # both parts from the one file
    # part sizes that do not add up: a damaged entry, recompiled with a warning
    meta_path = next(tmp_path.rglob(f"{key}.json"))
    meta_path.write_text(json.dumps(dict(meta, part_bytes=[1, meta["object_bytes"]])))
    cache._memo.pop(key)
    with pytest.warns(RuntimeWarning, match="damaged cache entry"):
        assert run() == 16
    assert cache.stats.compiles == compiles + 2


@pytest.mark.parametrize("lp,sm", [(4, 24), (0, 40)])
def test_streamed_form_groups_split_between_the_parts(lp, sm):
    """The transposed GEMM's streamed form: groups whose row blocks all have STREAM_PART_ROWS rows
    or more run in the further part, the others inline; together they compile every row-count case
    (the numerics of both: test_gemm.py test_streamed_form_row_blocks, 0-41 rows)."""
    sch = gemm.default_schedule("bwd", "avx512", 192, 256)
    spec = gemm.GemmSpec("bwd", 192, 256, "avx512", False, dataclasses.replace(sch, lp=lp, sm=sm))
    main, part = split_parts(gemm.build_ir(spec))
    groups = gemm._stream_groups(spec)
    large = [g for g in groups if min(gemm._stream_row_split(g)) >= gemm.STREAM_PART_ROWS]
    assert 17 in groups and 17 not in large and 9 in large  # (17 rows: blocks of 9 and 8)
    cases = {text: sorted(int(c) for c in re.findall(r"^rows\.c(\d+):", text, re.M)) for text in (main, part)}
    assert cases[part] == gemm._stream_row_variants(spec, large) == list(range(9, 17))
    assert cases[main] == gemm._stream_row_variants(spec, [g for g in groups if g not in large])
    assert sorted(set(cases[main]) | set(cases[part])) == gemm._stream_row_variants(spec)


def test_quantized_lane_partial_variants_are_parts():
    """The transposed GEMM's lane-partial variants (1..unroll rows, and the generic one) are parts of
    their own for quantized weights (each 15-125 ms of compile time), inline for bf16; a part's
    part belongs to the main module."""
    def names(quant, gs=0):
        sch = gemm.default_schedule("bwd", "avx512", 192, 256, quant, group_size=gs)
        spec = gemm.GemmSpec("bwd", 192, 256, "avx512", False, sch, quant, gs)
        return [re.match(r"; ModuleID = '(.*)'", t).group(1)[len(spec.name):] for t in split_parts(gemm.build_ir(spec))]

    assert names("bf16") == ["", "_rows9"]
    for quant, gs in (("int8", 0), ("int4", 128)):
        parts = names(quant, gs)
        assert parts[0] == "" and {"_lanes1", "_lanes2", "_lanesn"} <= set(parts), (quant, parts)
    mod = Module("kt_test_nested", "nounwind")
    mod.part("a").part("b")
    assert [t.splitlines()[0] for t in split_parts(mod.render())] == [
        "; ModuleID = 'kt_test_nested'", "; ModuleID = 'a'", "; ModuleID = 'b'"]


def test_pipeline_names_the_code_generator_level():
    """The transposed bf16 GEMM's "light" pipeline emits at code generator level 1 (same code, no
    post-RA scheduling: ~8% less compile time); other kernels keep level 3."""
    target = cc.target_for("avx512")
    bwd = gemm.build_ir(gemm.GemmSpec("bwd", 64, 64, "avx512", False, gemm.default_schedule("bwd", "avx512", 64, 64)))
    fwd = gemm.build_ir(gemm.GemmSpec("fwd", 64, 64, "avx512", False, gemm.default_schedule("fwd", "avx512", 64, 64)))
    assert cc._codegen_level(bwd) == cc.PIPELINES["light"][1] == 1
    assert cc._codegen_level(fwd) == cc.CODEGEN_LEVEL == 3
    text = split_parts(bwd)[0]
    _, mod = cc._optimised_module(text, target)
    at = {level: bytes(cc._new_target_machine(target, level).emit_object(mod)) for level in (1, 3)}
    assert cc.compile_objects(text, target)[0] == at[1] != at[3]
    with pytest.raises(ValueError, match="unknown optimisation pipeline"):
        cc._codegen_level(f"; ModuleID = 'x'\n{cc.PIPELINE_MARK}heavy\n")

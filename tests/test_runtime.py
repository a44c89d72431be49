"""Runtime layer: features, AMX permission, the parallel launcher, aligned buffers, knobs."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from kt_jit import linear, linear_t, pack_bf16
from kt_jit.codegen.cache import get_or_compile
from kt_jit.codegen.compile import target_for
from kt_jit.codegen.ir import Module
from kt_jit.codegen.worker import ArgBlock, build_worker
from kt_jit.runtime import aligned_empty, amx_status, cpu_info, knobs
from kt_jit.runtime.threads import default_num_threads, launch

COUNT_ARGS = ArgBlock(["counts", "thread_slots"])


def _counting_worker():
    """A worker that adds 1 to counts[item] for every item it claims."""
    target = target_for("avx512")
    mod = Module("count_items", target.fn_attrs)

    def body(fn, ctx, item, tiles):
        counts = COUNT_ARGS.load_ptr(fn, ctx, "counts")
        fn.emit(f"atomicrmw add ptr {fn.gep(counts, fn.mul(item, 8))}, i64 1 monotonic")

    build_worker(mod, "count_items", COUNT_ARGS, body)
    return get_or_compile("count_items", "count_items", mod.render(), target, ["count_items"])["count_items"]


def _lookahead_worker(name: str, wait_for_claims: int = 0):
    """A worker built with ``lookahead``: each item adds 1 to counts[item]; even items claim their
    thread's next item and add 1 to thread_slots[next] when there is one. With
    ``wait_for_claims``, an item first spins (bounded) until that many claims were made, then
    stores its thread's stack address in thread_slots[item] instead (a thread's identity)."""
    target = target_for("avx512")
    mod = Module(name, target.fn_attrs)

    def body(fn, ctx, item, tiles, claim_next):
        counts = COUNT_ARGS.load_ptr(fn, ctx, "counts")
        slots = COUNT_ARGS.load_ptr(fn, ctx, "thread_slots")
        fn.emit(f"atomicrmw add ptr {fn.gep(counts, fn.mul(item, 8))}, i64 1 monotonic")
        if wait_for_claims:  # spin until the counter shows that many claims (at most 2^28 rounds)
            spins = fn.var("i64", "0")
            head, again, out = fn.new_block("spin"), fn.new_block("again"), fn.new_block("spun")
            fn.br(head)
            fn.set_block(head)
            claims = fn.val("load atomic i64, ptr %ctx monotonic, align 8")
            short, bounded = fn.icmp("slt", claims, wait_for_claims), fn.icmp("slt", spins.get(), 1 << 28)
            waiting = fn.val(f"and i1 {short}, {bounded}")
            fn.cbr(waiting, again, out)
            fn.set_block(again)
            spins.set(fn.add(spins.get(), 1))
            fn.br(head)
            fn.set_block(out)
            marker = fn.alloca("i8", 64)
            fn.store("i64", fn.val(f"ptrtoint ptr {marker} to i64"), fn.gep(slots, fn.mul(item, 8)), 8)
            claim_next()
            return
        with fn.if_then(fn.icmp("eq", fn.val(f"and i64 {item}, 1"), 0), name="even"):
            following = claim_next()
            with fn.if_then(fn.icmp("slt", following, COUNT_ARGS.load(fn, ctx, "n_items")), name="some"):
                fn.emit(f"atomicrmw add ptr {fn.gep(slots, fn.mul(following, 8))}, i64 1 monotonic")

    build_worker(mod, name, COUNT_ARGS, body, lookahead=True)
    return get_or_compile(name, name, mod.render(), target, [name])[name]


@pytest.mark.parametrize("threads", [1, 2, 3, 8])
@pytest.mark.parametrize("n_items", [0, 1, 7, 1000])
def test_launcher_runs_every_item_exactly_once(threads, n_items):
    import ctypes

    addr = _counting_worker()
    counts = torch.zeros(max(n_items, 1), dtype=torch.int64)
    args = COUNT_ARGS.make(n_items, counts=counts.data_ptr(), thread_slots=0)
    launch(addr, ctypes.addressof(args), threads)
    assert counts[:n_items].eq(1).all()
    assert args.counter >= n_items  # every thread's last claim overshoots by one


@pytest.mark.parametrize("threads", [1, 2, 3, 8])
@pytest.mark.parametrize("n_items", [0, 1, 2, 7, 1000])
def test_lookahead_worker_runs_every_item_once(threads, n_items):
    """Items that claim their thread's next one ahead (the even ones here) and items that do not:
    every item runs exactly once, and an item is announced as a successor at most once."""
    import ctypes

    addr = _lookahead_worker("count_items_ahead")
    counts = torch.zeros(max(n_items, 1), dtype=torch.int64)
    announced = torch.zeros(max(n_items, 1), dtype=torch.int64)
    args = COUNT_ARGS.make(n_items, counts=counts.data_ptr(), thread_slots=announced.data_ptr())
    launch(addr, ctypes.addressof(args), threads)
    assert counts[:n_items].eq(1).all()
    assert announced[:n_items].le(1).all()
    if threads == 1:  # one thread runs the items in order: each even item announces the odd one after it
        assert announced[1:n_items:2].eq(1).all() and announced[0:n_items:2].eq(0).all()


def test_lookahead_does_not_hold_an_item_back():
    """Two items on two threads: the claim ahead happens inside the body (late), so the second
    item goes to the second thread; a claim at the loop head would have run both on one thread."""
    import ctypes

    addr = _lookahead_worker("count_items_wait", wait_for_claims=2)
    counts = torch.zeros(2, dtype=torch.int64)
    owner = torch.zeros(2, dtype=torch.int64)
    args = COUNT_ARGS.make(2, counts=counts.data_ptr(), thread_slots=owner.data_ptr())
    launch(addr, ctypes.addressof(args), 2)
    assert counts.eq(1).all()
    assert owner[0] != owner[1], "both items ran on one thread"


@pytest.mark.parametrize("threads", ["1", "2"])
def test_launch_batch_defers_and_runs_in_order(threads, monkeypatch):
    """Inside a LaunchBatch, launches run at the block's end (or at flush), in order, every item
    once; an exception drops them; an explicit thread count runs at once, after the deferred ones;
    batches do not nest."""
    from kt_jit.codegen.worker import LaunchBatch, flush_launches

    monkeypatch.setenv("KT_JIT_NUM_THREADS", threads)
    addr = _counting_worker()
    counts = torch.zeros(100, dtype=torch.int64)
    with LaunchBatch():
        for n in (100, 60, 10):  # items below n get one count per launch
            COUNT_ARGS.run(addr, n, counts=counts.data_ptr(), thread_slots=0)
        assert counts.sum() == 0, "ran before the batch ended"
    assert counts[:10].eq(3).all() and counts[10:60].eq(2).all() and counts[60:].eq(1).all()
    counts.zero_()
    with LaunchBatch():
        COUNT_ARGS.run(addr, 5, counts=counts.data_ptr(), thread_slots=0)
        flush_launches()
        assert counts[:5].eq(1).all()
        COUNT_ARGS.run(addr, 5, counts=counts.data_ptr(), thread_slots=0)
        COUNT_ARGS.run(addr, 5, 1, counts=counts.data_ptr(), thread_slots=0)  # explicit threads: now
        assert counts[:5].eq(3).all()
    counts.zero_()
    with pytest.raises(ValueError), LaunchBatch():
        COUNT_ARGS.run(addr, 5, counts=counts.data_ptr(), thread_slots=0)
        raise ValueError("interrupted")
    assert counts.sum() == 0
    with LaunchBatch(), pytest.raises(RuntimeError, match="nest"), LaunchBatch():
        pass


def test_arg_block_names_missing_fields():
    with pytest.raises(TypeError, match="counts"):
        COUNT_ARGS.make(3, thread_slots=0)


def test_num_threads_knob(monkeypatch):
    monkeypatch.setenv("KT_JIT_NUM_THREADS", "3")
    assert default_num_threads() == 3
    for bad in ("zero", "0", "-1", "100000"):  # (100000: libgomp killed the process creating them)
        monkeypatch.setenv("KT_JIT_NUM_THREADS", bad)
        with pytest.raises(ValueError, match="KT_JIT_NUM_THREADS must be an integer from 1 to 4096"):
            default_num_threads()
    monkeypatch.delenv("KT_JIT_NUM_THREADS")
    assert default_num_threads() >= 1
    w = pack_bf16(torch.zeros(32, 32, dtype=torch.bfloat16))
    for bad in (0, 2.5, True, 100000):  # (2.5 reached ctypes; 100000 libgomp)
        for fn in (linear, linear_t):
            with pytest.raises(ValueError, match="num_threads must be an integer"):
                fn(torch.zeros(1, 32, dtype=torch.bfloat16), w, num_threads=bad)


def test_isa_knob_is_validated(monkeypatch):
    monkeypatch.setenv("KT_JIT_ISA", "neon")
    with pytest.raises(ValueError, match="KT_JIT_ISA"):
        knobs.isa_request()


def test_cpu_info_is_consistent():
    info = cpu_info()
    assert info.model_name
    if info.amx_bf16:
        assert info.has("amx_tile")
    assert set(info.summary()) >= {"amx_tile", "amx_bf16", "amx_int8", "avx512_bf16"}


def test_l1d_cache_size_parsing():
    from kt_jit.runtime.cpu import l1d_cache_bytes

    assert knobs.parse_size("32K\n") == 32 << 10
    assert knobs.parse_size("48K") == 48 << 10
    assert knobs.parse_size("2M") == 2 << 20
    assert knobs.parse_size("512") == 512 and knobs.parse_size("512", "K") == 512 << 10
    assert knobs.parse_size("") is None and knobs.parse_size("big") is None
    size = l1d_cache_bytes()
    assert size == 0 or 4 << 10 <= size <= 1 << 20, size


def test_small_openmp_stacks_are_refused(monkeypatch):
    """The kernels keep up to ~300 KB on each thread's stack: a smaller OMP_STACKSIZE is a clear
    error, not a crash inside a kernel."""
    from kt_jit.runtime.threads import check_openmp_stack

    for name in ("OMP_STACKSIZE", "GOMP_STACKSIZE"):
        monkeypatch.delenv(name, raising=False)
    assert knobs.openmp_stack_bytes() is None
    check_openmp_stack()
    for value, size in (("64K", 64 << 10), ("512", 512 << 10), ("2m", 2 << 20), ("1G", 1 << 30), ("4096 B", 4096)):
        monkeypatch.setenv("OMP_STACKSIZE", value)
        assert knobs.openmp_stack_bytes() == size, value
    monkeypatch.setenv("OMP_STACKSIZE", "64K")
    with pytest.raises(RuntimeError, match="OMP_STACKSIZE"):
        check_openmp_stack()
    monkeypatch.setenv("OMP_STACKSIZE", "16M")
    check_openmp_stack()
    monkeypatch.delenv("OMP_STACKSIZE")
    monkeypatch.setenv("GOMP_STACKSIZE", "100")  # kilobytes
    with pytest.raises(RuntimeError, match="at least 1M"):
        check_openmp_stack()
    monkeypatch.setenv("GOMP_STACKSIZE", "lots")  # unreadable: libgomp's default
    check_openmp_stack()


def test_amx_status_reason_is_clear():
    ok, why = amx_status()
    assert isinstance(ok, bool) and why
    if not cpu_info().has("amx_tile"):
        assert not ok and "no AMX" in why


def test_require_amx_raises_instead_of_sigill():
    from kt_jit.runtime.amx import require_amx

    if amx_status()[0]:
        require_amx()  # must not raise where AMX works
    else:
        with pytest.raises(RuntimeError, match="AMX kernels cannot run"):
            require_amx()


def test_aligned_buffers():
    for n in (1, 3, 17, 1000):
        t = aligned_empty((n, 3), torch.bfloat16)
        assert t.data_ptr() % 64 == 0 and t.shape == (n, 3) and t.is_contiguous()


def test_resident_buffers_start_on_huge_pages():
    """Large resident buffers (expert weights) start on a 2 MB boundary of their own mapping on Linux,
    stay valid after the call that made them, and are released with their tensors; small ones are
    ordinary aligned buffers."""
    import gc

    from kt_jit.runtime.buffers import HUGE_MIN_BYTES, HUGE_PAGE, resident_empty

    small = resident_empty((5, 3), torch.float32)
    assert small.data_ptr() % 64 == 0 and small.shape == (5, 3)
    big = resident_empty((HUGE_MIN_BYTES // 2 + 3, 2), torch.bfloat16)
    assert big.shape == (HUGE_MIN_BYTES // 2 + 3, 2) and big.is_contiguous() and big.dtype == torch.bfloat16
    if sys.platform.startswith("linux"):
        assert big.data_ptr() % HUGE_PAGE == 0
    big.fill_(2.5)
    part = big[7:9]
    del big
    gc.collect()
    assert torch.equal(part, torch.full((2, 2), 2.5, dtype=torch.bfloat16))  # (a view keeps the mapping)


def test_info_command_runs():
    out = subprocess.run([sys.executable, "-m", "kt_jit.info"], capture_output=True, text=True, check=True)
    for word in ("AMX", "threads", "kernel cache", "kernel ISA", "huge pages", "stream_group_blocks="):
        assert word in out.stdout
    env = dict(os.environ, KT_JIT_TUNING="lanes_min_rows=0,bogus=2")  # reported, not a crash
    out = subprocess.run([sys.executable, "-m", "kt_jit.info"], capture_output=True, text=True, check=True, env=env)
    assert "unknown name(s) ['bogus']" in out.stdout


def test_info_command_shows_a_stored_tuning(tmp_path):
    env = dict(os.environ, KT_JIT_CACHE_DIR=str(tmp_path))
    env.pop("KT_JIT_TUNING", None), env.pop("KT_JIT_STORED_TUNING", None)
    code = "from kt_jit.runtime import tuning_store; tuning_store.save({'stream_prefetch': 2048}, {})"
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
    out = subprocess.run([sys.executable, "-m", "kt_jit.info"], capture_output=True, text=True, check=True, env=env)
    assert "stream_prefetch=2048," in out.stdout and "stored stream_prefetch=2048 from " + str(tmp_path) in out.stdout
    (next((tmp_path / "tuning").glob("*.json"))).write_text("{")
    out = subprocess.run([sys.executable, "-m", "kt_jit.info"], capture_output=True, text=True, check=True, env=env)
    assert "ignoring the stored tuning" in out.stdout and "stream_prefetch=2048," not in out.stdout


def test_huge_page_status_reads_the_bracketed_mode(tmp_path, monkeypatch):
    import kt_jit.runtime.buffers as buffers

    setting = tmp_path / "enabled"
    setting.write_text("always [madvise] never\n")
    monkeypatch.setattr(buffers, "THP_SETTING", str(setting))
    assert buffers.huge_page_status() == "madvise"
    monkeypatch.setattr(buffers, "THP_SETTING", str(tmp_path / "missing"))
    assert buffers.huge_page_status() == "unknown"


def test_bandwidth_and_peak_probes_measure_something():
    """The benchmarks' floors: a streaming read and write (one-shot and reusable) and the bf16 peak
    give positive, finite rates (slower than 0.1 GB/s would mean a probe is broken); the write
    leaves its pattern in every byte of its buffer."""
    import math

    from kt_jit.kernels.probe import ReadProbe, WriteProbe, bf16_peak_flops, read_bandwidth, write_bandwidth

    probe = ReadProbe(16 << 20)
    assert probe.nbytes >= 16 << 20
    for bw in (probe(), probe(), read_bandwidth(16 << 20, repeats=2)):
        assert math.isfinite(bw) and bw > 1e8
    for pattern in (0, 0x3F80_3F80_3F80_3F80, 0xFFFF_0000_1234_5678, -2):
        writer = WriteProbe((16 << 20) + 4096, pattern)  # (whole work items: the 4 KB tail is dropped)
        assert writer.nbytes == 16 << 20 and writer.buffer.numel() == writer.nbytes // 8
        writer.buffer.fill_(1)
        assert math.isfinite(writer()) and writer() > 1e8
        assert (writer.buffer.numpy().view(np.uint64) == np.uint64(pattern % (1 << 64))).all()
    for bad in (1 << 64, -(1 << 63) - 1):
        with pytest.raises(ValueError, match="64 bits"):
            WriteProbe(1 << 18, bad)
    assert write_bandwidth(16 << 20, repeats=2, pattern=0) > 1e8
    assert bf16_peak_flops(seconds=0.02) > 1e9

"""Pieces of the tools/ scripts that decide something (the scripts' measurements are not tested)."""

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import profile_kernels  # noqa: E402
import tune  # noqa: E402


def _row(value, candidate, qlen, vs_default, default=False):
    return {"value": value, "candidate": candidate, "qlen": qlen, "vs_default": vs_default, "default": default}


def test_tune_recommends_only_clear_wins_at_every_token_count():
    rows = [_row("lane_partial_slice", 256, 1, 1.00, True), _row("lane_partial_slice", 256, 16, 1.00, True),
            _row("lane_partial_slice", 512, 1, 1.10, False), _row("lane_partial_slice", 512, 16, 0.97, False),
            _row("lane_partial_slice", 1024, 1, 1.04, False), _row("lane_partial_slice", 1024, 16, 1.03, False),
            _row("stream_group_blocks", 4, 128, 1.00, True), _row("stream_group_blocks", 16, 128, 1.01, False),
            _row("lanes_min_rows", 16, 512, 1.00, True), _row("lanes_min_rows", 0, 512, 1.06, False),
            _row("lanes_min_rows", 12, 512, 1.08, False)]
    # 512 loses at qlen 16 (its worst), 1024 wins at both; 1% is inside the margin; the best of two wins
    assert tune.recommend(rows, 0.02) == {"lane_partial_slice": 1024, "lanes_min_rows": 12}
    assert tune.recommend(rows, 0.05) == {"lanes_min_rows": 12}
    assert set(tune.CANDIDATES) == {f.name for f in dataclasses.fields(tune.gemm.HostTuning)}


def test_tune_measures_int8_experts_where_bf16_runs_amx():
    """On AMX hosts bf16 layers run the AMX kernels, so the values are timed on int8 experts (whose
    kernels they shape), and the bf16-only ones are left out."""
    assert tune.weights_for("stream_prefetch", "avx512") == "bf16"
    assert tune.weights_for("stream_prefetch", "amx") == "int8"
    assert tune.weights_for("quant_prefetch", "avx512") == tune.weights_for("quant_prefetch", "amx") == "int8"
    assert set(tune.BF16_ONLY) == {"lanes_min_rows", "multirow_prefetch", "panel_blocks"}
    assert set(tune.QUICK_QLENS) == set(tune.CANDIDATES)


def test_tune_saves_a_setting_the_next_process_starts_from(tmp_path, monkeypatch):
    """``tune.py --save`` stores its setting for this CPU kind; a later process's host_tuning starts
    from it (``--forget`` deletes it); a setting kt_jit would refuse is not stored."""
    import pytest

    from kt_jit.runtime import tuning_store

    monkeypatch.setenv("KT_JIT_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("KT_JIT_TUNING", raising=False)
    monkeypatch.delenv("KT_JIT_STORED_TUNING", raising=False)
    path = tune.save_setting("stream_prefetch=2048,lane_partial_slice=256", {"rounds": 10})
    assert path == tuning_store.tuning_path() and path.parent == tmp_path / "tuning"
    tuning_store.reset_memo()
    tuned = tune.gemm.host_tuning()
    assert (tuned.stream_prefetch, tuned.lane_partial_slice) == (2048, 256)
    with pytest.raises(ValueError, match="64-1024"):
        tune.save_setting("lane_partial_slice=2048", {})
    tune.save_setting("quant_prefetch=512", {}, kept={"stream_prefetch": 2048})  # (--values of one name)
    tuning_store.reset_memo()
    monkeypatch.setenv("KT_JIT_STORED_TUNING", "0")
    built_in = tune.gemm.host_tuning()
    monkeypatch.delenv("KT_JIT_STORED_TUNING")
    assert tune.gemm.host_tuning() == tune.gemm.replaced(built_in, {"stream_prefetch": 2048, "quant_prefetch": 512})
    assert tune.main(["--forget"]) == 0 and not path.exists()
    tuning_store.reset_memo()


def test_profile_attributes_samples_to_the_kernel_whose_range_holds_them():
    """profile_kernels: a sample's time belongs to a kernel when its address is in [start, start +
    size) (perf map ranges), at that offset; the others' time is counted by the file they lie in."""
    kernels = [(100, 50, "a"), (200, 10, "b")]
    ips = [99, 100, 149, 150, 205, 209, 210, 300]
    dsos = ["libgomp.so.1", "[JIT]", "[JIT]", "[JIT]", "[JIT]", "[JIT]", "libgomp.so.1", "libpython3.11.so.1.0"]
    periods = [1, 2, 4, 8, 16, 32, 64, 128]
    per, offsets = profile_kernels.attribute(list(zip(ips, dsos, periods, strict=True)), kernels)
    assert per == {"a": 6, "b": 48, "(outside kernels: libgomp.so.1)": 65, "(outside kernels: [JIT])": 8,
                   "(outside kernels: libpython3.11.so.1.0)": 128}
    assert offsets["a"] == {0: 1, 49: 1} and offsets["b"] == {5: 1, 9: 1}

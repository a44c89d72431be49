"""Packed BF16 expert GEMMs, forward (Y = X W^T) and transposed (dX = dY W), every ISA."""

import dataclasses

import numpy as np
import pytest
import torch
from conftest import ISAS, NEEDS_AVX512_BF16
from reference import linear as ref_linear
from reference import linear_t as ref_linear_t
from reference import rel_err

from kt_jit.kernels import gemm
from kt_jit.kernels.pack import pack_bf16, unpack_bf16
from kt_jit.kernels.rowquant import ACT_MAX, quantize_rows

MS = [1, 7, 16, 33, 100, 512]


def _weights(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g).bfloat16()


def _shape_for(isa):
    # the AMX emulator is scalar IR: keep its shapes small
    return (64, 96) if isa == "amx_emu" else (192, 256)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m", MS)
def test_linear_matches_reference(isa, m):
    n, k = _shape_for(isa)
    w = _weights(n, k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).bfloat16()
    y = gemm.linear(x, pack_bf16(w), isa=isa)
    assert y.dtype == torch.float32 and y.shape == (m, n)
    assert rel_err(y, ref_linear(x, w)) < 1e-4


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m", MS)
def test_linear_t_matches_reference(isa, m):
    n, k = _shape_for(isa)
    w = _weights(n, k, seed=1)
    dy = torch.randn(m, n, generator=torch.Generator().manual_seed(100 + m)).bfloat16()
    dx = gemm.linear_t(dy, pack_bf16(w), isa=isa)
    assert dx.dtype == torch.float32 and dx.shape == (m, k)
    assert rel_err(dx, ref_linear_t(dy, w)) < 1e-4


@NEEDS_AVX512_BF16
@pytest.mark.parametrize("m", [1, 7, 13])
def test_forward_over_several_k_chunks(m):
    """K = 1024 is 2 chunks of 256 k-pairs: row blocks after the first take the loop variant that
    prefetches the next chunk (schedule ``pfn``)."""
    w = _weights(64, 1024, seed=7)
    x = torch.randn(m, 1024, generator=torch.Generator().manual_seed(m)).bfloat16()
    kern = gemm.kernel_for("fwd", 64, 1024, isa="avx512")
    assert kern.spec.schedule.pfn and kern.spec.schedule.kc * 2 < 1024
    assert rel_err(gemm.linear(x, pack_bf16(w), isa="avx512"), ref_linear(x, w)) < 1e-4


@NEEDS_AVX512_BF16
@pytest.mark.parametrize("m", [9, 30])
def test_transposed_over_several_n_chunks(m):
    """N = 768 is several panel chunks (48 n-blocks, HostTuning.panel_blocks per chunk): the first
    row block takes the loop variant that prefetches the next chunk (schedule ``pfn``), the others
    the plain one."""
    w = _weights(768, 64, seed=8)
    dy = torch.randn(m, 768, generator=torch.Generator().manual_seed(m)).bfloat16()
    kern = gemm.kernel_for("bwd", 768, 64, isa="avx512", one_group=True)
    assert kern.spec.schedule.pfn and kern.spec.schedule.kc * 16 < 768
    assert rel_err(gemm.linear_t(dy, pack_bf16(w), isa="avx512"), ref_linear_t(dy, w)) < 1e-4


@pytest.mark.parametrize("isa", ISAS)
def test_accumulate_adds_into_output(isa):
    n, k = 64, 96
    w = _weights(n, k, seed=2)
    p = pack_bf16(w)
    x = torch.randn(9, k).bfloat16()
    dy = torch.randn(9, n).bfloat16()
    base_y, base_dx = torch.randn(9, n), torch.randn(9, k)
    y = gemm.linear(x, p, out=base_y.clone(), accumulate=True, isa=isa)
    dx = gemm.linear_t(dy, p, out=base_dx.clone(), accumulate=True, isa=isa)
    assert rel_err(y, base_y + ref_linear(x, w)) < 1e-4
    assert rel_err(dx, base_dx + ref_linear_t(dy, w)) < 1e-4


@pytest.mark.parametrize("n,k", [(32, 32), (32, 64), (96, 32), (160, 224)])
def test_odd_multiples_of_32(n, k):
    """N/16 and K/16 that are not multiples of 4 take the narrower schedules."""
    w = _weights(n, k, seed=3)
    x = torch.randn(5, k).bfloat16()
    dy = torch.randn(5, n).bfloat16()
    p = pack_bf16(w)
    assert rel_err(gemm.linear(x, p), ref_linear(x, w)) < 1e-4
    assert rel_err(gemm.linear_t(dy, p), ref_linear_t(dy, w)) < 1e-4


def test_pack_round_trip_and_layout():
    w = _weights(64, 128, seed=4)
    p = pack_bf16(w)
    assert p.shape == (4, 64, 16, 2) and p.data_ptr() % 64 == 0
    assert torch.equal(unpack_bf16(p), w)
    # packed[nb, r, i, e] = W[16 nb + i, 2 r + e]
    assert p[2, 5, 3, 1] == w[2 * 16 + 3, 2 * 5 + 1]
    stacked = pack_bf16(torch.stack([w, w * 2]))
    assert stacked.shape == (2, 4, 64, 16, 2)
    assert torch.equal(unpack_bf16(stacked)[1], (w * 2))
    for bad in (p.flatten(), p[..., 0], p.reshape(4, 64, 32)):
        with pytest.raises(ValueError, match="not a packed weight"):
            unpack_bf16(bad)


@NEEDS_AVX512_BF16
def test_functions_returning_results_run_at_once_inside_a_launch_batch():
    """linear, linear_t and quantize_rows return filled tensors even inside a LaunchBatch."""
    from kt_jit.codegen.worker import LaunchBatch

    g = torch.Generator().manual_seed(8)
    w = torch.randn(64, 96, generator=g).bfloat16()
    x, dy = torch.randn(5, 96, generator=g).bfloat16(), torch.randn(5, 64, generator=g).bfloat16()
    packed = pack_bf16(w)
    with LaunchBatch():
        y, dx, (q, s) = gemm.linear(x, packed), gemm.linear_t(dy, packed), quantize_rows(x)
        assert rel_err(y, ref_linear(x, w)) < 1e-4 and rel_err(dx, ref_linear_t(dy, w)) < 1e-4
        assert rel_err(q.float() * s[:, None], x.float()) < 1e-3


def test_zero_rows():
    w = _weights(64, 64)
    p = pack_bf16(w)
    assert gemm.linear(torch.empty(0, 64, dtype=torch.bfloat16), p).shape == (0, 64)
    assert gemm.linear_t(torch.empty(0, 64, dtype=torch.bfloat16), p).shape == (0, 64)


@pytest.mark.parametrize("n,k", [(48, 64), (64, 40), (0, 64)])
def test_bad_weight_shape_is_a_value_error(n, k):
    with pytest.raises(ValueError, match="multiples of 32"):
        pack_bf16(torch.zeros(n, k))


def test_bad_operands_are_value_errors():
    p = pack_bf16(_weights(64, 64))
    with pytest.raises(ValueError, match="bfloat16"):
        gemm.linear(torch.zeros(3, 64), p)
    with pytest.raises(ValueError, match="columns"):
        gemm.linear(torch.zeros(3, 32, dtype=torch.bfloat16), p)
    with pytest.raises(ValueError, match="contiguous"):
        gemm.linear(torch.zeros(64, 3, dtype=torch.bfloat16).T, pack_bf16(_weights(64, 64)[:, :]))
    with pytest.raises(ValueError, match="2-D"):
        gemm.linear(torch.zeros(64, dtype=torch.bfloat16), p)
    with pytest.raises(ValueError, match="packed"):
        gemm.linear(torch.zeros(3, 64, dtype=torch.bfloat16), torch.zeros(64, 64, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="out must be"):
        gemm.linear(torch.zeros(3, 64, dtype=torch.bfloat16), p, out=torch.zeros(3, 63))


def test_schedule_validation():
    with pytest.raises(ValueError, match="kc"):
        gemm.GemmSpec("fwd", 64, 64, "avx512", False, gemm.GemmSchedule(mr=6, nr=2, kc=24))
    with pytest.raises(ValueError, match="nr"):
        gemm.GemmSpec("fwd", 96, 64, "avx512", False, gemm.GemmSchedule(mr=6, nr=4))
    with pytest.raises(ValueError, match="isa"):
        gemm.GemmSpec("fwd", 64, 64, "sse", False, gemm.GemmSchedule(mr=6, nr=2))
    with pytest.raises(ValueError, match="form"):
        gemm.GemmSpec("fwd", 64, 64, "avx512", False, gemm.GemmSchedule(mr=6, nr=2, form="panel"))
    with pytest.raises(ValueError, match="sm"):
        gemm.GemmSpec("bwd", 64, 64, "avx512", False, gemm.GemmSchedule(mr=3, nr=2, form="fold", sm=4))
    with pytest.raises(ValueError, match="small"):
        gemm.GemmSpec("bwd", 64, 64, "avx512", False, gemm.GemmSchedule(mr=6, nr=2, form="panel", sm=4, small="x"))
    with pytest.raises(ValueError, match="N/16"):
        gemm.GemmSpec("bwd", 96, 64, "avx512", False, gemm.GemmSchedule(mr=6, nr=2, kc=4, form="panel"))
    with pytest.raises(ValueError, match="even"):  # int4 rows are decoded in pairs
        gemm.GemmSpec("fwd", 64, 96, "avx512", False, gemm.GemmSchedule(mr=6, nr=4, kc=3), quant="int4")
    with pytest.raises(ValueError, match="lp"):  # more lane-partial rows than streamed ones
        gemm.GemmSpec("bwd", 64, 64, "avx512", False, gemm.GemmSchedule(mr=6, nr=2, form="panel", sm=2, lp=4))
    with pytest.raises(ValueError, match="lp"):
        gemm.GemmSpec("bwd", 64, 64, "avx512", False, gemm.GemmSchedule(mr=3, nr=2, form="fold", lp=4))
    with pytest.raises(ValueError, match="pfw"):  # the wide blocks' prefetch distance is the forward's
        gemm.GemmSpec("bwd", 64, 64, "avx512", False, gemm.GemmSchedule(mr=6, nr=2, form="panel", pfw=32))
    with pytest.raises(ValueError, match="pfw"):
        gemm.GemmSpec("fwd", 64, 64, "avx512", False, gemm.GemmSchedule(mr=6, nr=2, pf=16, pfw=-1))
    with pytest.raises(ValueError, match="pfi"):  # the look-ahead rides on the next-chunk prefetch
        gemm.GemmSpec("fwd", 64, 64, "avx512", False, gemm.GemmSchedule(mr=6, nr=2, pfi=True))
    with pytest.raises(ValueError, match="pfi"):
        gemm.GemmSpec("bwd", 64, 64, "avx512", False, gemm.GemmSchedule(mr=6, nr=2, form="panel", pfn=True, pfi=True))
    with pytest.raises(ValueError, match="pfi"):
        gemm.GemmSpec("fwd", 64, 64, "amx", False, gemm.GemmSchedule(mr=2, nr=2, pfn=True, pfi=True))
    # every field that changes the code is in the kernel's name (and so in its cache key)
    assert str(gemm.GemmSchedule(6, 4, pf=16, pfw=32)) != str(gemm.GemmSchedule(6, 4, pf=16))
    assert str(gemm.GemmSchedule(6, 4, pfn=True, pfi=True)) != str(gemm.GemmSchedule(6, 4, pfn=True))
    assert str(gemm.GemmSchedule(6, 4, form="panel", sm=24, sb=8)) != str(gemm.GemmSchedule(6, 4, form="panel", sm=24))
    with pytest.raises(ValueError, match="sb"):
        gemm.GemmSpec("bwd", 64, 64, "avx512", False, gemm.GemmSchedule(mr=6, nr=2, form="panel", sm=24, sb=0))
    with pytest.raises(ValueError, match="ls"):
        gemm.GemmSpec("bwd", 64, 64, "avx512", False, gemm.GemmSchedule(mr=6, nr=2, form="panel", sm=8, lp=4, ls=32))
    assert str(gemm.GemmSchedule(6, 4, form="panel", sm=8, lp=4, ls=1024)) != str(
        gemm.GemmSchedule(6, 4, form="panel", sm=8, lp=4))
    with pytest.raises(ValueError, match="lp"):
        gemm.GemmSpec("bwd", 64, 64, "avx512", False,
                      gemm.GemmSchedule(mr=6, nr=2, form="panel", sm=16, lp=gemm.LANE_PARTIAL_MAX + 1))
    for bad in (dict(tl=17), dict(tl=-1), dict(tl=12, form="fold")):  # tokens in lanes: 1-16 rows, the panel kernel
        with pytest.raises(ValueError, match="tl="):
            gemm.GemmSpec("bwd", 64, 64, "avx512", False, gemm.GemmSchedule(mr=6, nr=2, **{"form": "panel", **bad}))
    with pytest.raises(ValueError, match="tl="):  # bf16 weights only
        gemm.GemmSpec("bwd", 64, 64, "avx512", False, gemm.GemmSchedule(mr=6, nr=2, form="panel", tl=12), "int8")
    assert str(gemm.GemmSchedule(6, 4, form="panel", tl=12)) != str(gemm.GemmSchedule(6, 4, form="panel"))
    # integer kernels: a K-chunk (fwd) or n-chunk (bwd) must not overflow the int32 partial sums
    with pytest.raises(ValueError, match="overflow"):
        gemm.GemmSpec("fwd", 64, 4096, "avx512", False, gemm.GemmSchedule(mr=6, nr=4, kc=1024), "int8")
    with pytest.raises(ValueError, match="overflow"):
        gemm.GemmSpec("bwd", 8192, 64, "avx512", False, gemm.GemmSchedule(mr=6, nr=4, kc=128, form="panel"), "int8")
    gemm.GemmSpec("fwd", 64, 4096, "avx512", False, gemm.GemmSchedule(mr=6, nr=4, kc=1024), "int4")  # |q-z| <= 15
    with pytest.raises(ValueError, match="group_size/2"):
        gemm.GemmSpec("fwd", 64, 256, "avx512", False, gemm.GemmSchedule(mr=6, nr=4, kc=48), "int4", 64)


def test_host_tuning_follows_the_l1_size(monkeypatch):
    """The streamed form reads 16 n-blocks per pass, the lane-partial form's slices are 256 k-pair
    rows, and the streams are prefetched 1 KB ahead (2 KB in the quantized forward and the bf16
    forward's blocks of 3+ rows) where the L1 data cache holds 48 KB; 4 blocks, 1024 rows, 512 B,
    256 B and 512 B on smaller (or unknown) ones; single groups keep 256-row slices. The quantized
    lane-partial form's second prefetch (into L2, 4 KB ahead) only with the smaller L1 (Zen 4), and
    there the per-channel int4 forward's items of 8 column blocks (4 with 48 KB)."""
    for size, blocks, slice_, ahead, quant_ahead in ((48 << 10, 16, 256, 1024, 2048), (64 << 10, 16, 256, 1024, 2048),
                                                     (32 << 10, 4, 1024, 512, 256), (0, 4, 1024, 512, 256)):
        monkeypatch.setattr(gemm, "l1d_cache_bytes", lambda size=size: size)
        sch = gemm.default_schedule("bwd", "avx512", 1536, 2048)
        assert (sch.sb, sch.ls, sch.sp) == (blocks, slice_, ahead)
        assert gemm.default_schedule("bwd", "avx512", 1536, 2048, one_group=True).ls == gemm.LANE_PARTIAL_SLICE
        for quant in ("int8", "int4"):  # the forward's pf counts packed rows
            assert gemm.default_schedule("fwd", "avx512", 1536, 2048, quant).pf * gemm.ROW_BYTES[quant] == quant_ahead
        bf16 = gemm.default_schedule("fwd", "avx512", 1536, 2048)
        assert (bf16.pf, bf16.pfw * 64) == (16, 2048 if size >= 48 << 10 else 512)  # (pf: not a per-CPU value)
        for quant in ("int8", "int4"):
            assert gemm.default_schedule("bwd", "avx512", 1536, 2048, quant).lf == (0 if size >= 48 << 10 else 4096)
        assert sch.lf == 0  # (bf16)
        int4 = gemm.default_schedule("fwd", "avx512", 1536, 2048, "int4")
        assert int4.nr == (4 if size >= 48 << 10 else 8)  # (per channel; K-groups and N % 128 != 0 keep 4)
        assert gemm.default_schedule("fwd", "avx512", 1536, 2048, "int4", group_size=128).nr == 4
        assert gemm.default_schedule("fwd", "avx512", 1600, 2048, "int4").nr == 4


@pytest.mark.parametrize("quant", ["bf16", "int8"])
def test_stream_prefetch_reaches_the_streaming_forms(quant):
    """The schedule's ``sp`` is the distance the lane-partial and streamed transposed forms prefetch
    ahead (an offset no other address of the kernel uses)."""
    base = gemm.default_schedule("bwd", "avx512", 1536, 2048, quant)
    # each form alone next to the panel: streamed (no lane-partial), lane-partial (the fold form above)
    for form in (dict(lp=0), dict(small="fold", sm=8, lp=min(base.lp, 8))):
        irs = {sp: gemm.build_ir(gemm.GemmSpec("bwd", 1536, 2048, "avx512", False,
                                               dataclasses.replace(base, sp=sp, **form), quant)) for sp in (2112, 6208)}
        for sp, other in ((2112, 6208), (6208, 2112)):
            assert f"i64 {sp}\n" in irs[sp] and f"i64 {sp}\n" not in irs[other], form


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_far_prefetch_reaches_the_quantized_lane_partial_form(quant):
    """The schedule's ``lf`` is the distance of the quantized lane-partial form's second prefetch,
    into L2 (an offset no other address of the kernel uses; 0: no such prefetch at all)."""
    base = gemm.default_schedule("bwd", "avx512", 1536, 2048, quant)
    irs = {lf: gemm.build_ir(gemm.GemmSpec("bwd", 1536, 2048, "avx512", False, dataclasses.replace(base, lf=lf),
                                           quant)) for lf in (0, 5184)}
    assert "i64 5184\n" in irs[5184] and "i64 5184\n" not in irs[0]
    with pytest.raises(ValueError, match="lf=-1"):
        gemm.GemmSpec("bwd", 1536, 2048, "avx512", False, dataclasses.replace(base, lf=-1), quant)


def test_tuning_overrides_from_the_environment(monkeypatch):
    """KT_JIT_TUNING overrides the host-tuned values (names: HostTuning's fields), the kernels are
    looked up again under it, and a bad value is a ValueError naming the variable."""
    default = gemm.default_schedule("bwd", "avx512", 1536, 2048, lanes_dy=True)
    before = gemm.kernel_for("bwd", 96, 192, isa="avx512", lanes_dy=True)
    assert before.spec.schedule.tl == gemm.host_tuning().lanes_min_rows
    for lanes in (0, 13):
        monkeypatch.setenv("KT_JIT_TUNING", f" stream_group_blocks=4, lanes_min_rows={lanes} ")
        sch = gemm.default_schedule("bwd", "avx512", 1536, 2048, lanes_dy=True)
        assert (sch.sb, sch.tl, sch.ls) == (4, lanes, default.ls)
        assert gemm.kernel_for("bwd", 96, 192, isa="avx512", lanes_dy=True).spec.schedule.tl == lanes
    monkeypatch.setenv("KT_JIT_TUNING", "lane_partial_slice=512,lanes_min_rows=12,stream_prefetch=2048")
    sch = gemm.default_schedule("bwd", "avx512", 1536, 2048, lanes_dy=True)
    assert (sch.sb, sch.ls, sch.tl, sch.sp) == (default.sb, 512, 12, 2048)
    monkeypatch.setenv("KT_JIT_TUNING", "quant_prefetch=1024,multirow_prefetch=4096")
    assert gemm.default_schedule("fwd", "avx512", 1536, 2048, "int8").pf == 1024 // gemm.ROW_BYTES["int8"]
    assert gemm.default_schedule("fwd", "avx512", 1536, 2048).pfw == 4096 // 64
    for blocks in (4, 8):
        monkeypatch.setenv("KT_JIT_TUNING", f"int4_fwd_blocks={blocks}")
        assert gemm.default_schedule("fwd", "avx512", 1536, 2048, "int4").nr == blocks
        assert gemm.default_schedule("fwd", "avx512", 1536, 2048, "int8").nr == 4
    for far in (0, 2048):
        monkeypatch.setenv("KT_JIT_TUNING", f"quant_far_prefetch={far}")
        assert gemm.default_schedule("bwd", "avx512", 1536, 2048, "int4").lf == far
        assert gemm.default_schedule("bwd", "avx512", 1536, 2048).lf == 0
    # the bf16 panel's n-blocks: the largest divisor of N/16 (96 for N 1536) up to panel_blocks;
    # quantized panels keep theirs
    for blocks, kc in ((5, 4), (8, 8), (16, 16), (32, 32)):
        monkeypatch.setenv("KT_JIT_TUNING", f"panel_blocks={blocks}")
        assert gemm.default_schedule("bwd", "avx512", 1536, 2048).kc == kc
        assert gemm.default_schedule("bwd", "avx512", 1536, 2048, "int8").kc == gemm.QUANT_PANEL_BLOCKS
    for bad, match in (("bogus=1", "unknown name"), ("stream_group_blocks", "name=integer"),
                       ("stream_group_blocks=x", "name=integer"), ("=4", "name=integer"),
                       ("lanes_min_rows=5", "lanes_min_rows=5"), ("lane_partial_slice=100", "lane_partial_slice"),
                       ("lane_partial_slice=2048", "64-1024"), ("stream_group_blocks=0", "1-32"),
                       ("stream_group_blocks=64", "1-32"), ("stream_group_blocks=4,stream_group_blocks=8", "twice"),
                       ("stream_prefetch=100", "stream_prefetch=100"), ("quant_prefetch=0", "64-8192"),
                       ("quant_prefetch=16384", "64-8192"), ("panel_blocks=0", "1-32"), ("panel_blocks=33", "1-32"),
                       ("quant_far_prefetch=100", "or 0 for none"), ("quant_far_prefetch=-64", "quant_far_prefetch"),
                       ("int4_fwd_blocks=2", "4 or 8")):
        monkeypatch.setenv("KT_JIT_TUNING", bad)
        with pytest.raises(ValueError, match=match) as err:
            gemm.default_schedule("bwd", "avx512", 1536, 2048)
        assert "KT_JIT_TUNING" in str(err.value) and "kt_jit.info" in str(err.value)


def test_stored_tuning_sits_between_the_built_in_values_and_the_environment(tmp_path, monkeypatch):
    """A setting stored for this CPU kind (runtime/tuning_store.py) replaces the built-in values,
    KT_JIT_TUNING replaces it in turn, KT_JIT_STORED_TUNING=0 ignores it, and a file kt_jit cannot
    use (garbage, another format, an unknown name, a value out of range) is ignored with a warning
    that names it, never an error."""
    import json
    import warnings

    from kt_jit.runtime import tuning_store
    from kt_jit.runtime.cpu import l1d_cache_bytes

    monkeypatch.setenv("KT_JIT_CACHE_DIR", str(tmp_path))
    for name in ("KT_JIT_TUNING", "KT_JIT_STORED_TUNING"):
        monkeypatch.delenv(name, raising=False)
    built_in = gemm.host_tuning()
    key = tuning_store.host_key()
    assert f"l1d{l1d_cache_bytes() >> 10}k" in key and "/" not in key
    path = tuning_store.save({"stream_prefetch": 2048, "stream_group_blocks": 8}, {"rounds": 10})
    assert json.loads(path.read_text())["values"] == {"stream_prefetch": 2048, "stream_group_blocks": 8}
    assert not list(path.parent.glob("*.tmp"))

    def tuning(**env):
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        tuning_store.reset_memo()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = gemm.host_tuning()
        for name in env:
            monkeypatch.delenv(name)
        return got, [str(w.message) for w in caught]

    assert tuning() == (dataclasses.replace(built_in, stream_prefetch=2048, stream_group_blocks=8), [])
    assert gemm.default_schedule("bwd", "avx512", 1536, 2048).sp == 2048
    assert tuning(KT_JIT_TUNING="stream_prefetch=256")[0] == dataclasses.replace(
        built_in, stream_prefetch=256, stream_group_blocks=8)
    assert tuning(KT_JIT_STORED_TUNING="0") == (built_in, [])
    for text, why in (("garbage", "Expecting value"), (b"\xff{", "utf-8"),
                      ('{"format": 99, "values": {}}', "format 99"),
                      ('{"format": 1, "values": {"stream_prefetch": "big"}}', "integers"),
                      ('{"format": 1, "values": {"bogus": 1}}', "unknown name(s) ['bogus']"),
                      ('{"format": 1, "values": {"stream_prefetch": 100}}', "stream_prefetch=100")):
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        got, messages = tuning()
        assert got == built_in and len(messages) == 1, (text, messages)
        assert str(path) in messages[0] and why in messages[0] and "tune.py --save" in messages[0]
    assert tuning_store.forget() and not tuning_store.forget()
    tuning_store.reset_memo()


@pytest.mark.parametrize("isa", ISAS)
def test_every_schedule_variant_is_correct(isa):
    """A few non-default schedules (the tuner's search space) give the same numbers."""
    n, k = 128, 128
    w = _weights(n, k, seed=5)
    p = pack_bf16(w)
    x = torch.randn(13, k).bfloat16()
    dy = torch.randn(13, n).bfloat16()
    if isa == "avx512":
        # (6, 8): blocks of 4+ rows run as column groups (gemm.FWD_ACCUMULATORS)
        fwd = [gemm.GemmSchedule(mr, nr, kc, pf) for mr, nr, kc, pf in [(1, 8, 0, 0), (4, 2, 16, 8), (6, 4, 32, 0),
                                                                        (6, 8, 32, 0)]]
        bwd = [gemm.GemmSchedule(mr, nr, 0, pf, "fold") for mr, nr, pf in [(1, 1, 0), (2, 8, 1), (3, 2, 4)]]
        bwd += [gemm.GemmSchedule(mr, nr, kc, pf, "panel", sm) for mr, nr, kc, pf, sm in
                [(6, 4, 0, 0, 0), (3, 2, 2, 4, 0), (6, 4, 4, 4, 8), (1, 8, 8, 0, 2), (4, 1, 1, 1, 16)]]
    else:
        fwd = bwd = [gemm.GemmSchedule(2, 2)]
    y = torch.empty(13, n)
    dx = torch.empty(13, k)
    for sch in fwd:
        kern = gemm.get_kernel(gemm.GemmSpec("fwd", n, k, isa, False, sch))
        xs = gemm._pad_rows_for_amx(x) if isa != "avx512" else x
        kern.launch(gemm._one_group(xs.data_ptr(), p.data_ptr(), y.data_ptr(), 13), k * 2, n * 4)
        assert rel_err(y, ref_linear(x, w)) < 1e-4, sch
    for sch in bwd:
        kern = gemm.get_kernel(gemm.GemmSpec("bwd", n, k, isa, False, sch))
        src = gemm.pack_dy_for_amx(dy) if isa != "avx512" else dy
        kern.launch(gemm._one_group(src.data_ptr(), p.data_ptr(), dx.data_ptr(), 13), n * 2, k * 4)
        assert rel_err(dx, ref_linear_t(dy, w)) < 1e-4, sch


@pytest.mark.skipif(not __import__("kt_jit").cpu_info().avx512_bf16, reason="the packing kernel is AVX-512")
@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("n", [16, 64])
def test_dy_tiles_kernel_matches_the_torch_packing(n, scaled):
    """The MoE backward packs each expert's dY rows into the AMX transposed GEMM's B tiles in one
    launch: bit for bit what pack_dy_for_amx builds, tokens past each group's count zero; ``scaled``
    (per-channel quantized weights): each group's dY times its own column scales, rounded to bf16."""
    from kt_jit.kernels.dytiles import kernel_for
    from kt_jit.runtime.buffers import aligned_empty

    ms, ld = [1, 16, 17, 33], n + 16  # rows per group; a padded row pitch (elements)
    tiled = [-(-m // 16) * 16 for m in ms]
    src = torch.randn(sum(tiled), ld, generator=torch.Generator().manual_seed(n)).bfloat16()
    tiles = aligned_empty((sum(tiled) * n * 4,), torch.bfloat16).fill_(7.0)
    firsts = [sum(tiled[:g]) for g in range(len(ms))]
    scales = torch.rand(len(ms), n, generator=torch.Generator().manual_seed(1)) + 0.5
    groups = [(src.data_ptr() + f * ld * 2, tiles.data_ptr() + f * n * 8, m)
              + ((scales[g].data_ptr(),) if scaled else ()) for g, (f, m) in enumerate(zip(firsts, ms, strict=True))]
    kernel_for(n, scaled=scaled).launch(torch.tensor(groups, dtype=torch.int64), ld * 2)
    for g, (f, m) in enumerate(zip(firsts, ms, strict=True)):
        want = gemm.pack_dy_for_amx(src[f:f + m, :n].contiguous(), scales[g] if scaled else None).reshape(-1)
        assert torch.equal(tiles[f * n * 4:f * n * 4 + want.numel()].view(torch.int16), want.view(torch.int16))


LANES_SIZES = [0, 1, 5, 11, 12, 13, 16, 17, 20, 27, 28, 31, 32, 33, 44, 64]  # around every tile's limit


@NEEDS_AVX512_BF16
@pytest.mark.parametrize("n", [48, 96])
def test_dy_lanes_kernel_matches_the_torch_packing(n):
    """The tokens-in-lanes layout of dY, written per group in one launch (each group's 2 m n bytes
    after the previous one's and a guard gap), bit for bit what pack_dy_lanes builds, for the
    groups lanes_rows admits; the other groups' bytes and the gaps are left alone."""
    from kt_jit.kernels.dytiles import kernel_for, lanes_rows, pack_dy_lanes

    assert [m for m in LANES_SIZES if lanes_rows(m, 12)] == [12, 13, 16, 28, 31, 32, 44, 64]
    assert [m for m in LANES_SIZES if lanes_rows(m, 16)] == [16, 28, 31, 32, 44, 64]
    assert not any(lanes_rows(m, 0) for m in LANES_SIZES)
    ld = n + 24  # a padded row pitch (elements)
    src = torch.randn(sum(LANES_SIZES), ld, generator=torch.Generator().manual_seed(n)).bfloat16()
    gap = 32  # elements of guard after each group's region
    out = torch.full((sum(LANES_SIZES) * n + gap * len(LANES_SIZES),), 7.0, dtype=torch.bfloat16)
    firsts = np.cumsum([0] + LANES_SIZES[:-1])
    at = [int(f) * n + gap * e for e, f in enumerate(firsts)]  # each region's first element
    groups = [(src.data_ptr() + f * ld * 2, out.data_ptr() + a * 2, m) for f, a, m in zip(firsts, at, LANES_SIZES,
                                                                                            strict=True)]
    kernel_for(n, "lanes", 12).launch(torch.tensor(groups, dtype=torch.int64), ld * 2)
    for f, a, m in zip(firsts, at, LANES_SIZES, strict=True):
        got = out[a:a + m * n]
        if lanes_rows(m, 12):
            assert torch.equal(got.view(torch.int16), pack_dy_lanes(src[f:f + m, :n]).view(torch.int16)), m
        else:
            assert bool((got == 7.0).all()), m
        assert bool((out[a + m * n:a + m * n + gap] == 7.0).all()), m
    with pytest.raises(ValueError, match="min_rows"):
        kernel_for(n, "lanes", 0)
    with pytest.raises(ValueError, match="form"):
        kernel_for(n, "rows", 0)


def _lanes_inputs(dys, n, min_rows):
    """(rows, lanes): each group's dY ([m, >= n] bf16) in the tokens-in-lanes layout of a form whose
    smallest group is ``min_rows`` (the MoE backward's way: one dytiles launch), and copies of the
    rows. Each group's unused layout is NaN (the rows of the groups the form takes, the lanes of
    the others): a kernel reading the wrong one, or taking the wrong form, gives NaN."""
    from kt_jit.kernels.dytiles import kernel_for, lanes_rows

    lanes = [torch.empty(d.shape[0] * n, dtype=torch.bfloat16) for d in dys]
    table = [(d.data_ptr(), t.data_ptr(), d.shape[0]) for d, t in zip(dys, lanes, strict=True)]
    kernel_for(n, "lanes", min_rows).launch(torch.tensor(table, dtype=torch.int64), dys[0].stride(0) * 2)
    rows = [d.clone() for d in dys]
    for r, t in zip(rows, lanes, strict=True):
        (r if lanes_rows(r.shape[0], min_rows) else t).fill_(float("nan"))
    return rows, lanes


@NEEDS_AVX512_BF16
@pytest.mark.parametrize("n,k", [(96, 192), (768, 96)], ids=str)
def test_transposed_gemm_tokens_in_lanes(n, k, lanes_form):
    """The default schedule, with the tokens-in-lanes form on, of launches that pass dY in its
    layout (the MoE backward's): one launch over groups around every 16-row tile's limit, next to the streamed,
    lane-partial and panel forms' groups, overwriting and accumulating (K = 192: 64 outputs per
    work item, four 16-output slices; K = 96: two)."""
    sch = gemm.default_schedule("bwd", "avx512", n, k, lanes_dy=True)
    assert sch.tl == lanes_form and sch.nr == (4 if k % 64 == 0 else 2)
    assert gemm.default_schedule("bwd", "avx512", n, k).tl == 0
    assert gemm.default_schedule("bwd", "avx512", n, k, "int8", lanes_dy=True).tl == 0
    assert gemm.default_schedule("bwd", "avx512", n, k, one_group=True, lanes_dy=True).tl == 0
    g = torch.Generator().manual_seed(n)
    ws = [_weights(n, k, seed=s) for s in range(len(LANES_SIZES))]
    packed = [pack_bf16(w) for w in ws]
    dys = [torch.randn(m, n + 32, generator=g).bfloat16() for m in LANES_SIZES]  # rows in wider buffers
    rows, lanes = _lanes_inputs(dys, n, sch.tl)
    for accumulate in (False, True):
        outs = [torch.randn(m + 16, k + 16, generator=g) for m in LANES_SIZES]  # 16 guard rows, 16 columns
        before = [o.clone() for o in outs]
        table = torch.tensor([[d.data_ptr(), p.data_ptr(), o.data_ptr(), d.shape[0], 0, 0, t.data_ptr()]
                              for d, p, o, t in zip(rows, packed, outs, lanes, strict=True)], dtype=torch.int64)
        gemm.get_kernel(gemm.GemmSpec("bwd", n, k, "avx512", accumulate, sch)).launch(table, (n + 32) * 2,
                                                                                      (k + 16) * 4)
        for e, m in enumerate(LANES_SIZES):
            if m:
                want = ref_linear_t(dys[e][:, :n], ws[e]) + (before[e][:m, :k] if accumulate else 0)
                assert rel_err(outs[e][:m, :k], want) < 1e-5, (m, accumulate)
            assert torch.equal(outs[e][:, k:], before[e][:, k:]), m  # nothing written past K
            assert torch.equal(outs[e][m:], before[e][m:]), m  # nor past the group's rows


@pytest.mark.skipif(not __import__("kt_jit").cpu_info().avx512_bf16, reason="AVX-512 BF16 kernels")
@pytest.mark.parametrize("quant", ["bf16", "int8"])
@pytest.mark.parametrize("kc", [0, 128])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_forward_gemm_over_many_groups_with_look_ahead(quant, kc, threads):
    """One forward launch over groups of 0..25 rows (one and more register blocks, so the last
    K-chunk's later row blocks prefetch the next item's first chunk, claimed ahead), the default
    prefetch schedule with one K-chunk (kc=0) and with several; every output against the oracle."""
    n, k = 256, 1024
    sizes = [0, 7, 13, 1, 25, 6, 12]
    sch = dataclasses.replace(gemm.default_schedule("fwd", "avx512", n, k, quant), kc=kc)
    assert sch.pfn and sch.pfi
    ws = [_weights(n, k, seed=s) for s in range(len(sizes))]
    xs = [torch.randn(m, k, generator=torch.Generator().manual_seed(10 + m)).bfloat16() for m in sizes]
    ys = [torch.full((m, n), float("nan")) for m in sizes]
    if quant == "bf16":
        spec = gemm.GemmSpec("fwd", n, k, "avx512", False, sch)
        packed = [pack_bf16(w) for w in ws]
        rows = [[x.data_ptr(), p.data_ptr(), y.data_ptr(), x.shape[0], 0, 0]
                for x, p, y in zip(xs, packed, ys, strict=True)]
        want = [ref_linear(x, w) for x, w in zip(xs, ws, strict=True)]
    else:  # int16 rows with per-row scales (an empty group keeps a one-row dummy: never read)
        spec = gemm.GemmSpec("fwd", n, k, "avx512", False, sch, quant="int8")
        qs = [_quantized("int8", 0, False, n, k, seed=s) for s in range(len(sizes))]
        inputs = [_kernel_input(spec, x if x.shape[0] else torch.zeros(1, k).bfloat16(), q[1])
                  for x, q in zip(xs, qs, strict=True)]
        rows = [[xq.data_ptr(), q[0].data_ptr(), y.data_ptr(), x.shape[0], q[1].data_ptr(), 0, xsc.data_ptr()]
                for x, q, y, (xq, xsc) in zip(xs, qs, ys, inputs, strict=True)]
        want = [ref_linear(x, q[3]) for x, q in zip(xs, qs, strict=True)]
    table = torch.tensor(rows, dtype=torch.int64)
    gemm.get_kernel(spec).launch(table, k * 2, n * 4, num_threads=threads)
    for m, got, expect in zip(sizes, ys, want, strict=True):
        if m:
            assert rel_err(got, expect) < 2e-4, m


@pytest.mark.skipif(not __import__("kt_jit").cpu_info().avx512_bf16, reason="AVX-512 BF16 kernels")
@pytest.mark.parametrize("sch", [gemm.GemmSchedule(6, 4, 0, 2, "panel", 8),
                                 gemm.GemmSchedule(6, 4, 0, 2, "panel", 12),
                                 gemm.GemmSchedule(6, 4, 0, 2, "panel", 12, sb=8),
                                 gemm.GemmSchedule(6, 4, 0, 2, "panel", 12, sb=3),
                                 gemm.GemmSchedule(6, 4, 0, 2, "panel", 8, lp=4),
                                 gemm.GemmSchedule(6, 4, 0, 2, "panel", 8, "fold", lp=8),
                                 gemm.GemmSchedule(6, 2, 3, 2, "panel", 5, "fold"),
                                 gemm.GemmSchedule(3, 2, 0, 1, "fold")], ids=str)
@pytest.mark.parametrize("n", [96, 768])
def test_transposed_gemm_forms_over_many_groups(sch, n):
    """One launch over groups of every size around the lane-partial/streamed/panel boundaries
    (0..17 rows), accumulating into an existing output: the way the MoE backward calls it
    (N/16 = 6: the streamed forms read 2 n-blocks side by side; N/16 = 48: the streamed form
    reads ``sb`` at a time: 16 in three passes, 8 in six, 3 in sixteen)."""
    k = 192
    sizes = list(range(18))
    ws = [_weights(n, k, seed=s) for s in sizes]
    packed = [pack_bf16(w) for w in ws]
    dys = [torch.randn(m, n, generator=torch.Generator().manual_seed(m)).bfloat16() for m in sizes]
    outs = [torch.randn(m, k) for m in sizes]
    expect = [o + ref_linear_t(d, w) for o, d, w in zip(outs, dys, ws, strict=True)]
    table = torch.tensor([[d.data_ptr(), p.data_ptr(), o.data_ptr(), d.shape[0], 0, 0]
                          for d, p, o in zip(dys, packed, outs, strict=True)], dtype=torch.int64)
    spec = gemm.GemmSpec("bwd", n, k, "avx512", True, sch)
    if sch.sm and sch.small == "stream":
        assert gemm._stream_blocks(spec) == {(96, 16): 2, (96, 8): 2, (96, 3): 3,
                                             (768, 16): 16, (768, 8): 8, (768, 3): 3}[n, sch.sb]
    gemm.get_kernel(spec).launch(table, n * 2, k * 4)
    for m, got, want in zip(sizes, outs, expect, strict=True):
        if m:
            assert rel_err(got, want) < 1e-5, m


@NEEDS_AVX512_BF16
@pytest.mark.parametrize("step", [1, 2])
@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("n", [96, 768])
def test_streamed_form_row_blocks(step, accumulate, n, monkeypatch):
    """The default bf16 transposed GEMM over groups of 0..41 rows with row pitches of an odd number
    of lines (the MoE's): the streamed form takes 5-24 rows, their accumulators in registers over a
    pass of n-blocks (N/16 = 6: 2 blocks per pass; 48: 16 per pass, three passes); 17-24 rows run as
    two row blocks of 8-12; with STREAM_ROW_STEP 2, blocks of an odd row count carry a zero padding
    row. Over NaN (every output written, none read on the first pass) or accumulated; a schedule
    streaming 1-40 rows (three row blocks above 32) next to it."""
    monkeypatch.setattr(gemm, "STREAM_ROW_STEP", step)
    k, pad = 192, 16
    sizes = list(range(42))
    g = torch.Generator().manual_seed(n + step)
    ws = [_weights(n, k, seed=100 + m) for m in sizes]
    packed = [pack_bf16(w) for w in ws]
    dpad = 0 if n // 32 % 2 else 32  # dY's pitch: an odd number of lines
    dys = [torch.randn(m, n + dpad, generator=g).bfloat16() for m in sizes]
    before = [torch.randn(m, k + pad, generator=g) if accumulate else torch.full((m, k + pad), float("nan"))
              for m in sizes]
    sch = gemm.default_schedule("bwd", "avx512", n, k)
    assert (sch.lp, sch.sm, sch.small) == (4, 24, "stream")
    spec = gemm.GemmSpec("bwd", n, k, "avx512", accumulate, sch)
    assert gemm._stream_row_variants(spec) == ([5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16] if step == 1
                                               else [6, 8, 10, 12, 14, 16])
    wide = gemm.GemmSpec("bwd", n, k, "avx512", accumulate, dataclasses.replace(sch, lp=0, sm=40))
    assert gemm._stream_row_variants(wide) == list(range(step, 17, step))
    table = torch.tensor([[d.data_ptr(), p.data_ptr(), 0, d.shape[0], 0, 0]
                          for d, p in zip(dys, packed, strict=True)], dtype=torch.int64)
    for sp in (spec, wide):
        outs = [b.clone() for b in before]
        table[:, 2] = torch.tensor([o.data_ptr() for o in outs])
        gemm.GemmKernel(sp).launch(table, (n + dpad) * 2, (k + pad) * 4)
        for m, d, w, b, got in zip(sizes, dys, ws, before, outs, strict=True):
            want = ref_linear_t(d[:, :n], w) + (b[:, :k] if accumulate else 0)
            assert m == 0 or rel_err(got[:, :k], want) < 1e-5, (m, sp.schedule)
            torch.testing.assert_close(got[:, k:], b[:, k:], rtol=0, atol=0, equal_nan=True)  # untouched


@pytest.mark.skipif(not __import__("kt_jit").cpu_info().avx512_bf16, reason="AVX-512 BF16 kernels")
@pytest.mark.parametrize("slice_", [gemm.LARGE_L1_TUNING.lane_partial_slice, gemm.SMALL_L1_TUNING.lane_partial_slice])
def test_transposed_gemm_lane_partial_slices(slice_):
    """The lane-partial form (bf16 groups of 1-4 rows; the int4 modes take 1-8) over several
    K-slices (of either CPU class's length) and 4-block passes, overwriting the output, next to a
    5-row group (the transposing streamed form)."""
    n, k = 128, 2 * 2 * slice_
    sizes = [1, 2, 3, 4, 5]
    ws = [_weights(n, k, seed=10 + m) for m in sizes]
    packed = [pack_bf16(w) for w in ws]
    dys = [torch.randn(m, n, generator=torch.Generator().manual_seed(m)).bfloat16() for m in sizes]
    outs = [torch.full((m, k), float("nan")) for m in sizes]
    table = torch.tensor([[d.data_ptr(), p.data_ptr(), o.data_ptr(), d.shape[0], 0, 0]
                          for d, p, o in zip(dys, packed, outs, strict=True)], dtype=torch.int64)
    sch = dataclasses.replace(gemm.default_schedule("bwd", "avx512", n, k), ls=slice_)
    assert sch.lp == 4
    spec = gemm.GemmSpec("bwd", n, k, "avx512", False, sch)
    assert gemm._lane_partial_slice(spec, 4) == slice_ and k // 2 // slice_ == 2
    gemm.get_kernel(spec).launch(table, n * 2, k * 4)
    for m, d, w, got in zip(sizes, dys, ws, outs, strict=True):
        assert rel_err(got, ref_linear_t(d, w)) < 1e-5, m


@pytest.mark.skipif(not __import__("kt_jit").cpu_info().avx512_bf16, reason="AVX-512 BF16 kernels")
@pytest.mark.parametrize("quant", ["bf16", "int8"])
def test_single_group_transposed_slices_over_work_items(quant, monkeypatch, request):
    """linear_t's single group of 1-8 rows: the lane-partial form with each K-slice a work item of
    its own (2 slices at 1-4 rows, 8 above), every output written exactly once (over NaN, and
    accumulated into a random output); 9 rows: the panel form. (Two threads: the schedule asks for a
    1-4-row slice per thread.)"""
    from kt_jit.kernels.quant import dequantize_int8, pack_int8

    monkeypatch.setattr(gemm, "default_num_threads", lambda: 2)
    gemm._kernel_for.cache_clear()  # the schedules chosen under two threads do not outlive the test
    request.addfinalizer(gemm._kernel_for.cache_clear)
    n, k = 96, 4 * gemm.LANE_PARTIAL_SLICE
    w = _weights(n, k, seed=7)
    if quant == "int8":
        packed, scales = pack_int8(w)
        w = dequantize_int8(packed, scales)
    else:
        packed, scales = pack_bf16(w), None
    sch = gemm.kernel_for("bwd", n, k, quant=quant, one_group=True).spec.schedule
    assert (sch.lp, sch.lps) == (8, True)
    assert not gemm.kernel_for("bwd", n, k, quant=quant, one_group=True, lora_rank=16).spec.schedule.lps
    for m in range(1, 10):
        dy = torch.randn(m, n, generator=torch.Generator().manual_seed(m)).bfloat16()
        want = ref_linear_t(dy, w)
        dx = gemm.linear_t(dy, packed, out=torch.full((m, k), float("nan")), scales=scales)
        # int8: dY times each channel's scale is rounded to bf16 (~1.5e-3, as in the fold form)
        tol = 3e-3 if quant == "int8" else 1e-5
        assert rel_err(dx, want) < tol, m
        base = torch.randn(m, k, generator=torch.Generator().manual_seed(50 + m))
        dx = gemm.linear_t(dy, packed, out=base.clone(), accumulate=True, scales=scales)
        assert rel_err(dx, base + want) < tol, m


QUANT_CASES = [("int8", 0, False), ("int4", 0, False), ("int4", 0, True), ("int4", 32, False), ("int4", 64, True)]


def _quantized(quant, gs, zp, n, k, seed=0):
    from kt_jit.kernels.quant import dequantize_int4, dequantize_int8, pack_int4, pack_int8

    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    if quant == "int8":
        p, s = pack_int8(w)
        return p, s, None, dequantize_int8(p, s)
    p, s, z = pack_int4(w, gs, zp)
    return p, s, z, dequantize_int4(p, s, z)


def _kernel_input(spec, a, scales):
    """(what the kernel reads as x, its row scales or None): integer kernels take int16 rows with
    per-row scales -- of X (forward) or of dY diag(channel scales) (transposed)."""
    if not spec.int_x:
        return a, None
    if spec.op == "fwd":
        return quantize_rows(a)
    return quantize_rows(a, col_scales=(scales.reshape(1, -1), np.zeros(a.shape[0], dtype=np.int64)))


@pytest.mark.skipif(not __import__("kt_jit").cpu_info().avx512_bf16, reason="quantized kernels need AVX-512 BF16")
@pytest.mark.parametrize("quant,gs,zp", QUANT_CASES)
@pytest.mark.parametrize("m", [1, 2, 3, 7, 33])
@pytest.mark.parametrize("far", [0, gemm.QUANT_FAR_PREFETCH])
def test_quantized_gemms_match_dequantized_reference(quant, gs, zp, m, far, monkeypatch):
    """Integer kernels (every forward; the transposed GEMM of per-channel modes): codes times int16
    activations (per-row scales, |error| <= max|x|/32766) are within ~1e-4 of the dequantized
    weight's product. The K-group transposed GEMM rounds each dequantized weight to bf16 once
    (~0.2%). m = 1, 3 and 7 take the lane-partial form of the transposed GEMM (int8: 1 and 3 its
    code per row count, 7 its quad steps; int4: quad steps, per channel 1 unrolled and 3 and 7 in
    the row loop, K-groups 1 and 3 unrolled), 33 the panel path; k = 1024 has several K-chunks
    (and groups) per output. Both with and without the lane-partial form's prefetch into L2 (its
    int8 rows of 1-2 tokens step two k-pair rows, one line, at a time)."""
    monkeypatch.setenv("KT_JIT_TUNING", f"quant_far_prefetch={far}")
    for n, k in ((192, 128), (64, 1024)):
        p, s, z, wd = _quantized(quant, gs, zp, n, k)
        x = torch.randn(m, k).bfloat16()
        dy = torch.randn(m, n).bfloat16()
        y, dx = torch.empty(m, n), torch.empty(m, k)
        zptr = z.data_ptr() if z is not None else 0
        for op, a, out, lda, ldo in (("fwd", x, y, k * 2, n * 4), ("bwd", dy, dx, n * 2, k * 4)):
            kern = gemm.kernel_for(op, n, k, quant=quant, group_size=gs, zero_point=zp)
            assert kern.spec.int_x == (op == "fwd" or not gs)
            xa, xs = _kernel_input(kern.spec, a, s)
            kern.launch(gemm._one_group(xa.data_ptr(), p.data_ptr(), out.data_ptr(), m, s.data_ptr(), zptr,
                                        xs.data_ptr() if xs is not None else None), lda, ldo)
        assert rel_err(y, ref_linear(x, wd)) < 2e-4
        assert rel_err(dx, ref_linear_t(dy, wd)) < (5e-3 if gs else 2e-4)


@NEEDS_AVX512_BF16
@pytest.mark.parametrize("zp", [False, True])
def test_int4_zero_point_terms_hold_for_one_signed_inputs(zp):
    """The int4 kernels sum x q and subtract z sum x once (forward: per K-chunk, exact in int32;
    transposed lane-partial form: per row, in fp32): inputs of one sign, where the two terms are
    large and nearly cancel, stay within the kernels' usual error of the dequantized product. A
    forward whose K-chunks are not whole vectors (8 pairs) adds -z to every code instead."""
    n, k = 256, 1024
    p, s, z, wd = _quantized("int4", 0, zp, n, k)
    for m in (1, 3, 7):
        x, dy = torch.rand(m, k).bfloat16() + 2, torch.rand(m, n).bfloat16() + 2
        y, dx = torch.empty(m, n), torch.empty(m, k)
        y8 = torch.empty(m, n)  # (K-chunks of 8 pairs: the forward adds -z to every code instead)
        chunks8 = gemm.get_kernel(gemm.GemmSpec("fwd", n, k, "avx512", False, gemm.GemmSchedule(6, 4, 8), "int4",
                                                zero_point=zp))
        fwd, bwd = (gemm.kernel_for(op, n, k, quant="int4", zero_point=zp) for op in ("fwd", "bwd"))
        for kern, a, out, lda, ldo in ((fwd, x, y, k * 2, n * 4), (chunks8, x, y8, k * 2, n * 4),
                                       (bwd, dy, dx, n * 2, k * 4)):
            xa, xs = _kernel_input(kern.spec, a, s)
            kern.launch(gemm._one_group(xa.data_ptr(), p.data_ptr(), out.data_ptr(), m, s.data_ptr(),
                                        z.data_ptr() if z is not None else 0, xs.data_ptr()), lda, ldo)
        assert rel_err(y, ref_linear(x, wd)) < 2e-4 and rel_err(y8, ref_linear(x, wd)) < 2e-4, m
        assert rel_err(dx, ref_linear_t(dy, wd)) < 2e-4, m


@NEEDS_AVX512_BF16
def test_quantize_rows():
    """q = round(x * (1/s)), s = max|x| / ACT_MAX per row; zero and tiny rows give q = 0 with a
    finite 1/s; a NaN or inf in a row gives a non-finite scale (so the GEMM output is not finite
    either) and codes that stay within +-ACT_MAX."""
    x = (torch.randn(37, 96, generator=torch.Generator().manual_seed(3)) * 3).bfloat16()
    x[3] = 0
    x[4] *= 1e-36  # below TINY
    x[5, 7], x[6, 1] = float("nan"), float("inf")
    q, s = quantize_rows(x)
    finite = [i for i in range(37) if i not in (3, 4, 5, 6)]
    want_s = x[finite].float().abs().amax(1) / ACT_MAX
    assert torch.equal(s[finite], want_s)
    amax = x[finite].float().abs().amax(1, keepdim=True)
    inv = torch.full_like(amax, ACT_MAX) / amax  # the kernel multiplies by 1/s (IEEE division)
    assert torch.equal(q[finite].float(), torch.round(x[finite].float() * inv))
    assert q.abs().max() == ACT_MAX and not q[3].any()
    assert s[3:5].isfinite().all() and s[3] > 0 and (q[4].float() * s[4] - x[4].float()).abs().max() < 1e-38
    assert not s[5:7].isfinite().any()
    with pytest.raises(ValueError, match="bfloat16"):
        quantize_rows(x.float())


def test_quantize_rows_listed_scaled_and_pitched():
    """Only the listed rows, each first multiplied by its own column-scale vector; rows with a
    padded pitch keep it in the output."""
    g = torch.Generator().manual_seed(4)
    base = torch.randn(9, 96 + 32, generator=g).bfloat16()
    x = base[:, :96]  # pitch 128 elements
    cols = torch.rand(3, 96, generator=g) + 0.5
    rows = np.array([0, 2, 5, 8])
    which = [0, 2, 1, 2]
    q, s = quantize_rows(x, rows, (cols, np.array(which)))
    assert q.stride(0) == 128
    for r, c in zip(rows.tolist(), which, strict=True):
        want = x[r].float() * cols[c]
        assert torch.allclose(s[r], want.abs().max() / ACT_MAX)
        assert (q[r].float() * s[r] - want).abs().max() <= s[r] * 0.5 * 1.001
    with pytest.raises(ValueError, match="col_scales"):
        quantize_rows(x, rows, (cols, np.zeros(3, dtype=np.int64)))
    with pytest.raises(ValueError, match="col_scales"):
        quantize_rows(x, rows, (cols.double(), np.zeros(4, dtype=np.int64)))


def test_int8_linear_api():
    from kt_jit.kernels.quant import dequantize_int8, pack_int8

    p, s = pack_int8(torch.randn(64, 96))
    x = torch.randn(5, 96).bfloat16()
    assert rel_err(gemm.linear(x, p, scales=s), ref_linear(x, dequantize_int8(p, s))) < 2e-4
    with pytest.raises(ValueError, match="scales"):
        gemm.linear(x, p)


def test_non_cpu_tensors_are_rejected():
    p = pack_bf16(_weights(64, 64))
    x = torch.zeros(3, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="CPU"):
        gemm.linear(x, p, out=torch.empty(3, 64, device="meta"))
    with pytest.raises(ValueError):
        gemm.linear(x, p.to("meta"))


def _weights_in(quant, gs, zp, n, k, g):
    """(packed, scales, zero points, the weight the kernels compute with) of a random W [n, k]."""
    if quant == "bf16":
        w = torch.randn(n, k, generator=g).bfloat16()
        return pack_bf16(w), None, None, w
    return _quantized(quant, gs, zp, n, k)


@NEEDS_AVX512_BF16
@pytest.mark.parametrize("quant,gs,zp", [("int8", 0, False), ("int4", 0, True), ("int4", 0, False),
                                         ("int4", 64, True), ("int4", 32, False), ("int4", 128, False)])
@pytest.mark.parametrize("n", [160, 256])
def test_quantized_transposed_default_forms(quant, gs, zp, n):
    """The default transposed GEMM of each quantized mode over groups of 1..17, 24, 26 and 34 rows
    in one launch: the lane-partial form (int8 1-12 rows, int4 per channel 1-16, K-groups 1-32;
    above 4 rows (int4 per channel: 2) quad steps, rows in chunks of 4 and the 1-3 left; N/16 = 10:
    2 n-blocks per step) and the panel above; the row pitches are odd multiples of
    64 bytes, as the MoE's; several K-slices (K-groups) per group. N = 256 (16 n-blocks): the
    lane-partial form's 8-block steps at 1-2 rows (int8: LP_WIDE_QUANTS; per-channel int4: 16 at
    3+ rows)."""
    k, pad = 1024, 16  # int8 and bf16 slices are 256 k-pairs: two; int4 (8 rows) 64: eight
    g = torch.Generator().manual_seed(9)
    p, s, z, wd = _weights_in(quant, gs, zp, n, k, g)
    kern = gemm.kernel_for("bwd", n, k, quant=quant, group_size=gs, zero_point=zp)
    sm = gemm.QUAD_MAX_ROWS[gemm._quad_kind(quant, gs)]
    assert kern.spec.schedule.small == "stream" and kern.spec.schedule.sm == sm
    assert gemm._stream_blocks(kern.spec) == 2 or n != 160
    ms = [*range(1, 18), 24, 26, 30, 32, 34]
    dys = [torch.randn(m, n, generator=g).bfloat16() for m in ms]  # pitch 320 B: 5 lines
    outs = [torch.full((m, k + pad), float("nan")) for m in ms]  # pitch 4160 B: 65 lines
    xq = [_kernel_input(kern.spec, d, s) for d in dys]
    table = torch.tensor([[xq[e][0].data_ptr(), p.data_ptr(), o.data_ptr(), m, s.data_ptr(),
                           z.data_ptr() if z is not None else 0]
                          + ([xq[e][1].data_ptr()] if kern.spec.int_x else [])
                          for e, (o, m) in enumerate(zip(outs, ms, strict=True))], dtype=torch.int64)
    kern.launch(table, n * 2, (k + pad) * 4)
    for m, d, got in zip(ms, dys, outs, strict=True):  # K-groups: bf16-rounded scaled operands (~0.2%)
        assert rel_err(got[:, :k], ref_linear_t(d, wd)) < (5e-3 if gs else 2e-4), m


@NEEDS_AVX512_BF16
@pytest.mark.parametrize("quant", ["bf16", "int8"])
@pytest.mark.parametrize("ps", [1, 2, 4])
def test_transposed_panel_shares_the_next_chunk_prefetch(quant, ps):
    """The panel form over 12 n-chunks (N/16 = 48, 4 n-blocks each) with the next chunk's prefetch
    shared by up to ``ps`` row blocks (as many full ones as the group has, a power of two, at most a
    panel step's lines: int8 2), the fill's own prefetch in the first chunk and in groups without a
    full row block: groups of 1..31 rows (0 to 5 full row blocks of 6) in one launch, accumulating
    into an existing output; each result against the oracle."""
    n, k = 768, 128
    g = torch.Generator().manual_seed(11)
    p, s, _, wd = _weights_in(quant, 0, False, n, k, g)
    spec = gemm.GemmSpec("bwd", n, k, "avx512", True, gemm.GemmSchedule(6, 4, 4, 2, "panel", pfn=True, ps=ps), quant)
    ms = [1, 5, 6, 11, 12, 17, 18, 23, 24, 29, 31]
    dys = [torch.randn(m, n, generator=g).bfloat16() for m in ms]
    outs = [torch.randn(m, k, generator=g) for m in ms]
    expect = [o + ref_linear_t(d, wd) for o, d in zip(outs, dys, strict=True)]
    xq = [_kernel_input(spec, d, s) for d in dys]
    table = torch.tensor([[x.data_ptr(), p.data_ptr(), o.data_ptr(), m, s.data_ptr() if s is not None else 0, 0]
                          + ([xsc.data_ptr()] if spec.int_x else [])
                          for (x, xsc), o, m in zip(xq, outs, ms, strict=True)], dtype=torch.int64)
    gemm.get_kernel(spec).launch(table, n * 2, k * 4)
    for m, got, want in zip(ms, outs, expect, strict=True):
        assert rel_err(got, want) < 2e-4, m


def test_panel_prefetch_share_is_checked_and_defaulted():
    """``ps``: a power of two, above 1 only for the panel form with its next-chunk prefetch; the
    default shares it among as many row blocks as a panel step has lines (up to
    PANEL_PREFETCH_SHARE): bf16 4, int8 2, int4 (one line) none."""
    base = gemm.default_schedule("bwd", "avx512", 1536, 2048)
    assert {q: gemm.default_schedule("bwd", "avx512", 1536, 2048, q).ps for q in ("bf16", "int8", "int4")} == {
        "bf16": min(4, gemm.PANEL_PREFETCH_SHARE), "int8": min(2, gemm.PANEL_PREFETCH_SHARE), "int4": 1}
    for bad in (dict(ps=0), dict(ps=3), dict(ps=2, pfn=False)):
        with pytest.raises(ValueError, match="ps="):
            gemm.GemmSpec("bwd", 1536, 2048, "avx512", False, dataclasses.replace(base, **bad))
    with pytest.raises(ValueError, match="ps="):
        gemm.GemmSpec("fwd", 1536, 2048, "avx512", False,
                      dataclasses.replace(gemm.default_schedule("fwd", "avx512", 1536, 2048), ps=2))


@NEEDS_AVX512_BF16
@pytest.mark.parametrize("m", [1, 3, 6])
def test_int4_transposed_step_sums_stay_in_int32(m):
    """The per-channel int4 quad steps sum 2 products per n-block in int32, codes kept times up to
    2^8 (gemm.QUAD_STEP_MAX): the largest codes against the largest dY codes in every block stay
    exact (N = 512: 16 n-blocks per step at 3+ rows, 8 at 1-2; 32 would overflow)."""
    from kt_jit.kernels.quant import dequantize_int4, pack_int4
    from kt_jit.kernels.rowquant import ACT_MAX

    n, k = 512, 128
    p, s, z = pack_int4(torch.ones(n, k), 0, False)  # every code 15 (q - 8 = 7)
    dy = torch.ones(m, n).bfloat16()
    kern = gemm.kernel_for("bwd", n, k, quant="int4")
    xq, xs = _kernel_input(kern.spec, dy, s)
    assert int(xq.abs().max()) == ACT_MAX and kern.spec.schedule.lp >= m
    out = torch.empty(m, k)
    kern.launch(gemm._one_group(xq.data_ptr(), p.data_ptr(), out.data_ptr(), m, s.data_ptr(), 0, xs.data_ptr()),
                n * 2, k * 4)
    assert rel_err(out, ref_linear_t(dy, dequantize_int4(p, s, z))) < 2e-4


def _lora_table(p, s, z, groups, xscales=None, lanes=None):
    """Fused-LoRA group table from (input, output, m, LoRA rows, adapter 0, adapter 1) per group
    (``xscales``: per group, the row scales of an int16 input, for the quantized forward;
    ``lanes``: per group, dY in the tokens-in-lanes layout)."""
    def ptr(t):
        return t.data_ptr() if t is not None else 0

    return torch.tensor([[a.data_ptr(), p.data_ptr(), o.data_ptr(), m, ptr(s), ptr(z)]
                         + ([xscales[e].data_ptr()] if xscales is not None else [])
                         + ([lanes[e].data_ptr()] if lanes is not None else [])
                         + [h.data_ptr(), b0.data_ptr(), b1.data_ptr()]
                         for e, (a, o, m, h, b0, b1) in enumerate(groups)], dtype=torch.int64)


@NEEDS_AVX512_BF16
@pytest.mark.parametrize("quant,gs,zp,blocks", [("bf16", 0, False, 8), ("int8", 0, False, 8), ("int4", 64, True, 8),
                                                ("int4", 0, False, 8), ("int4", 0, False, 4)])
@pytest.mark.parametrize("split,rank", [(0, 16), (128, 16), (128, 32)])
def test_fused_lora_forward(quant, gs, zp, blocks, split, rank, monkeypatch):
    """Y (+)= X W^T + H B^T in one launch, over groups of 0..13 rows (every row-block tail), with one
    adapter or two (outputs past ``split`` read the second adapter and the second half of H).
    Per-channel int4 takes HostTuning.int4_fwd_blocks column blocks per item (with 8 its blocks of
    4+ rows in two column groups)."""
    monkeypatch.setenv("KT_JIT_TUNING", f"int4_fwd_blocks={blocks}")
    n, k = 256, 128
    g = torch.Generator().manual_seed(5)
    p, s, z, wd = _weights_in(quant, gs, zp, n, k, g)
    hcols = rank * (2 if split else 1)
    ms = [0, 1, 5, 7, 13]
    xs = [torch.randn(m, k, generator=g).bfloat16() for m in ms]
    hs = [torch.randn(m, hcols, generator=g).bfloat16() for m in ms]
    b0 = torch.randn(len(ms), split or n, rank, generator=g).bfloat16()
    b1 = torch.randn(len(ms), n - split, rank, generator=g).bfloat16() if split else b0
    for accumulate in (False, True):
        ys = [torch.randn(m, n, generator=g) for m in ms]
        before = [y.clone() for y in ys]
        kern = gemm.kernel_for("fwd", n, k, accumulate, quant=quant, group_size=gs, zero_point=zp, lora_rank=rank,
                               lora_split=split)
        assert kern.spec.schedule.nr == (blocks if quant == "int4" and not gs else 4)
        xq = [_kernel_input(kern.spec, x, s) for x in xs]
        table = _lora_table(p, s, z, [(xq[e][0], y, m, h, b0[e], b1[e])
                                      for e, (y, h, m) in enumerate(zip(ys, hs, ms, strict=True))],
                            [sc for _, sc in xq] if kern.spec.int_x else None)
        kern.launch(table, k * 2, n * 4, ldh=hcols * 2)
        for e, m in enumerate(ms):
            if m == 0:
                continue
            ref = ref_linear(xs[e], wd) + (before[e] if accumulate else 0)
            ref[:, :split or n] += ref_linear(hs[e][:, :rank], b0[e])
            if split:
                ref[:, split:] += ref_linear(hs[e][:, rank:], b1[e])
            assert rel_err(ys[e], ref) < (1e-5 if quant == "bf16" else 2e-4), (m, accumulate)


@NEEDS_AVX512_BF16
@pytest.mark.parametrize("quant,gs,zp", [("bf16", 0, False), ("int8", 0, False), ("int4", 0, True), ("int4", 64, True)])
@pytest.mark.parametrize("two,rank", [(False, 16), (True, 16), (True, 32), (False, 32)])
@pytest.mark.parametrize("form", ["panel", "fold", "long", "lanes"])
def test_fused_lora_transposed(quant, gs, zp, two, rank, form):
    """dX (+)= dY W + T A in one launch over groups of 0..14 rows: streamed (or fold) small groups
    and panel groups; with two adapters T = [T0 | T1] and dX += T0 A0 + T1 A1. "long" (K = 2048,
    row pitches odd multiples of 64 bytes: groups up to 24 rows whole) and "lanes" (K = 4096,
    lane-partial groups up to 8 rows): the whole-group forms add the LoRA term in passes of a few
    A row pairs over chunks of column blocks whose output takes up to gemm.LORA_PASSES_MAX_BYTES
    (here all of it at 9 rows of K = 2048 or 6 of 4096; above, chunks ending in a partial one: 14
    rows; 7 and 8), "tokens" (bf16: dY also in the tokens-in-lanes layout, groups of 12, 13, 16 and
    28 rows take that form with a smallest group of 12: :func:`test_fused_lora_tokens_in_lanes`).
    T rows and dX rows sit in wider buffers."""
    n, k = {"long": (160, 2048), "lanes": (128, 4096)}.get(form, (128, 256))
    ldo = k + 16 if form in ("long", "tokens") else k  # output row pitch (elements)
    g = torch.Generator().manual_seed(6)
    p, s, z, wd = _weights_in(quant, gs, zp, n, k, g)
    tcols = rank * (2 if two else 1)
    ms = {"lanes": [0, 1, 5, 7, 8], "tokens": [0, 5, 12, 13, 16, 20, 28]}.get(form, [0, 1, 3, 5, 9, 14])
    dys = [torch.randn(m, n, generator=g).bfloat16() for m in ms]
    ts = [torch.randn(m, tcols + 8, generator=g).bfloat16()[:, :tcols] for m in ms]
    a0 = torch.randn(len(ms), rank, k, generator=g).bfloat16()
    a1 = torch.randn(len(ms), rank, k, generator=g).bfloat16()
    sch = gemm.default_schedule("bwd", "avx512", n, k, quant, form == "fold", gs, lanes_dy=form == "tokens")
    if form == "tokens":
        sch = dataclasses.replace(sch, tl=12)
    sm = 8 if form in ("panel", "fold") else 24  # (sm=8: 9 and 14 rows: panel)
    sch = dataclasses.replace(sch, sm=sm, lp=min(sch.lp, sm))
    if form == "lanes":
        sch = dataclasses.replace(sch, lp=8)
    if form in ("long", "lanes"):
        sizes = [m * k * 4 for m in ms if m]  # bytes of each group's output: both sides of the limit
        assert min(sizes) <= gemm.LORA_PASSES_MAX_BYTES < max(sizes)
    if form == "fold":  # (a single group's default runs 1-8 rows as lane-partial K-slices, without LoRA)
        sch = dataclasses.replace(sch, lp=0, lps=False)
    for accumulate in (False, True):
        bases = [torch.randn(m, ldo, generator=g) for m in ms]
        outs = [b[:, :k] for b in bases]
        before = [b.clone() for b in bases]
        spec = gemm.GemmSpec("bwd", n, k, "avx512", accumulate, sch, quant, gs, zp, rank, n // 2 if two else 0)
        dq = [_kernel_input(spec, d, s) for d in dys]
        lanes = None
        if sch.tl:  # (alive until the launch)
            rows, lanes = _lanes_inputs(dys, n, sch.tl)
            dq = [(r, None) for r in rows]
        table = _lora_table(p, s, z, [(dq[e][0], o, m, t, a0[e], a1[e])
                                      for e, (o, t, m) in enumerate(zip(outs, ts, ms, strict=True))],
                            [sc for _, sc in dq] if spec.int_x else None, lanes)
        gemm.get_kernel(spec).launch(table, n * 2, ldo * 4, ldh=(tcols + 8) * 2)
        for e, m in enumerate(ms):
            assert torch.equal(bases[e][:, k:], before[e][:, k:])  # nothing written past K
            if m == 0:
                continue
            ref = (ref_linear_t(dys[e], wd) + (before[e][:, :k] if accumulate else 0)
                   + ref_linear_t(ts[e][:, :rank], a0[e]))
            if two:
                ref += ref_linear_t(ts[e][:, rank:], a1[e])
            tol = 1e-5 if quant == "bf16" else 2e-4 if spec.int_x else 5e-3
            assert rel_err(outs[e], ref) < tol, (m, accumulate)


@NEEDS_AVX512_BF16
@pytest.mark.parametrize("two,rank", [(False, 16), (True, 16), (True, 32)])
def test_fused_lora_tokens_in_lanes(two, rank):
    test_fused_lora_transposed("bf16", 0, False, two, rank, "tokens")


def test_int4_lane_partial_slices_as_work_items_are_rejected():
    sch = dataclasses.replace(gemm.default_schedule("bwd", "avx512", 256, 1024, "int8", one_group=True), lp=8)
    assert sch.lps
    with pytest.raises(ValueError, match="bf16 and int8 only"):
        gemm.GemmSpec("bwd", 256, 1024, "avx512", False, sch, "int4")


def test_fused_lora_is_rejected_where_not_implemented():
    with pytest.raises(ValueError, match="AVX-512 GEMMs"):
        gemm.GemmSpec("fwd", 64, 64, "amx", False, gemm.default_schedule("fwd", "amx", 64, 64), lora_rank=16)
    with pytest.raises(ValueError, match="lora_split"):
        gemm.GemmSpec("fwd", 256, 64, "avx512", False, gemm.default_schedule("fwd", "avx512", 256, 64), lora_rank=16,
                      lora_split=32)


AMX_ISAS = [p for p in ISAS if p.values[0] != "avx512"]


@pytest.mark.parametrize("isa", AMX_ISAS)
@pytest.mark.parametrize("quant,gs,zp", QUANT_CASES)
def test_amx_quantized_gemms_match_dequantized_reference(isa, quant, gs, zp):
    """The AMX kernels decode each 16-row block of codes to a bf16 tile: per-channel forwards use the
    exact codes and scale the fp32 outputs (~1e-6 of the dequantized product), K-group forwards up
    to 32 rows too (scaling each group's partial products); per-channel transposed GEMMs take dY
    diag(s) rounded to bf16; K-group ones, and K-group forwards above 32 rows, round each
    dequantized weight to bf16 once (~0.2%). m = 1, 17 and 40: one and two row tiles, and the
    path for more than 32 rows (blocks decoded once for every row chunk) with a tail; k = 128 holds
    several K-groups."""
    n, k = 64, 128
    p, s, z, wd = _quantized(quant, gs, zp, n, k, seed=3)
    zptr = z.data_ptr() if z is not None else 0
    for m in (1, 17, 40):
        g = torch.Generator().manual_seed(m)
        x, dy = torch.randn(m, k, generator=g).bfloat16(), torch.randn(m, n, generator=g).bfloat16()
        y, dx = torch.empty(m, n), torch.empty(m, k)
        fwd = gemm.kernel_for("fwd", n, k, isa=isa, quant=quant, group_size=gs, zero_point=zp)
        bwd = gemm.kernel_for("bwd", n, k, isa=isa, quant=quant, group_size=gs, zero_point=zp)
        assert fwd.spec.isa == bwd.spec.isa == isa and not fwd.spec.int_x and not bwd.spec.int_x
        assert bwd.spec.scaled_dy == (not gs)  # per channel: dY diag(s) in the tiles, exact codes
        xp, dyt = gemm._pad_rows_for_amx(x), gemm.pack_dy_for_amx(dy, None if gs else s)
        fwd.launch(gemm._one_group(xp.data_ptr(), p.data_ptr(), y.data_ptr(), m, s.data_ptr(), zptr), k * 2, n * 4)
        bwd.launch(gemm._one_group(dyt.data_ptr(), p.data_ptr(), dx.data_ptr(), m, s.data_ptr(), zptr), n * 2, k * 4)
        assert rel_err(y, ref_linear(x, wd)) < (5e-3 if gs and m > 32 else 1e-5), m
        assert rel_err(dx, ref_linear_t(dy, wd)) < 5e-3, m
        if m in (17, 40):  # accumulate: the (scaled) products added to what Y holds (both paths)
            acc = gemm.kernel_for("fwd", n, k, accumulate=True, isa=isa, quant=quant, group_size=gs, zero_point=zp)
            base = torch.randn(m, n, generator=g)
            y = base.clone()
            acc.launch(gemm._one_group(xp.data_ptr(), p.data_ptr(), y.data_ptr(), m, s.data_ptr(), zptr), k * 2, n * 4)
            assert rel_err(y, base + ref_linear(x, wd)) < (5e-3 if gs and m > 32 else 1e-5)


@pytest.mark.parametrize("isa", AMX_ISAS)
@pytest.mark.parametrize("quant,gs,zp", QUANT_CASES)
def test_amx_quantized_forward_over_several_decode_units(isa, quant, gs, zp):
    """Above 32 rows: k = 1280 is 40 k-blocks, a decode unit of 32 (AMX_DECODE_UNIT) and a shorter
    one of 8, each added to Y (per channel times the scales; K-group weights are decoded times
    theirs, several groups per unit); the first writes Y (NaN before), unless accumulating. An
    empty group in the same launch reads and writes nothing."""
    n, k, m = 64, 1280, 40
    p, s, z, wd = _quantized(quant, gs, zp, n, k, seed=4)
    zptr = z.data_ptr() if z is not None else 0
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(6)).bfloat16()
    xp = gemm._pad_rows_for_amx(x)
    want = ref_linear(x, wd)
    tol = 5e-3 if gs else 1e-5
    for accumulate in (False, True):
        kern = gemm.kernel_for("fwd", n, k, accumulate=accumulate, isa=isa, quant=quant, group_size=gs, zero_point=zp)
        assert gemm._decode_unit(kern.spec) == 32
        base = torch.randn(m, n, generator=torch.Generator().manual_seed(7)) if accumulate else None
        y = base.clone() if accumulate else torch.full((m, n), float("nan"))
        groups = np.array([[0, 0, 0, 0, 0, 0], [xp.data_ptr(), p.data_ptr(), y.data_ptr(), m, s.data_ptr(), zptr]],
                          dtype=np.int64)  # (an empty group with null pointers first)
        kern.launch(groups, k * 2, n * 4)
        assert rel_err(y, (base + want) if accumulate else want) < tol, accumulate


@pytest.mark.parametrize("isa", AMX_ISAS)
@pytest.mark.parametrize("quant,gs,zp", [("int8", 0, False), ("int4", 32, True)])
def test_amx_quantized_transposed_gemm_in_pieces(isa, quant, gs, zp, monkeypatch):
    """Where an item's decoded blocks would pass AMX_PREDECODE_BYTES (N > 4096) the transposed GEMM
    decodes them above 32 rows in pieces of n-blocks, each added to dX by its own copy-out
    (forced here: 4 KB, so n = 160, 10 n-blocks, runs pieces of 4, 4 and 2); the first piece writes
    dX (NaN before) unless accumulating. m = 40 (pieces) and 17 (each block decoded as used)."""
    n, k = 160, 96
    spec = gemm.kernel_for("bwd", n, k, isa=isa, quant=quant, group_size=gs, zero_point=zp).spec
    assert gemm._bwd_pieces(spec) == (1, 10)
    assert gemm._bwd_pieces(dataclasses.replace(spec, n=7168)) == (2, 224)  # (DeepSeek's down projection)
    for n_blocks in range(2, 1025, 2):  # every piece within the limit, as few pieces as that allows
        pieces, per = gemm._bwd_pieces(dataclasses.replace(spec, n=16 * n_blocks))
        assert per * 1024 <= gemm.AMX_PREDECODE_BYTES and (pieces - 1) * gemm.AMX_PREDECODE_BYTES < n_blocks * 1024
        assert (pieces - 1) * per < n_blocks <= pieces * per
    monkeypatch.setattr(gemm, "AMX_PREDECODE_BYTES", 4096)
    assert gemm._bwd_pieces(dataclasses.replace(spec, n=n)) == (3, 4)
    gemm.get_kernel.cache_clear()  # (the memos hold kernels built with the default limit)
    gemm._kernel_for.cache_clear()
    p, s, z, wd = _quantized(quant, gs, zp, n, k, seed=8)
    zptr = z.data_ptr() if z is not None else 0
    try:
        for m in (40, 17):
            dy = torch.randn(m, n, generator=torch.Generator().manual_seed(m)).bfloat16()
            want = ref_linear_t(dy, wd)
            for accumulate in (False, True):
                kern = gemm.kernel_for("bwd", n, k, accumulate=accumulate, isa=isa, quant=quant, group_size=gs,
                                       zero_point=zp)
                dyt = gemm.pack_dy_for_amx(dy, None if gs else s)
                base = torch.randn(m, k, generator=torch.Generator().manual_seed(9)) if accumulate else None
                dx = base.clone() if accumulate else torch.full((m, k), float("nan"))
                kern.launch(gemm._one_group(dyt.data_ptr(), p.data_ptr(), dx.data_ptr(), m, s.data_ptr(), zptr),
                            n * 2, k * 4)
                assert rel_err(dx, (base + want) if accumulate else want) < 5e-3, (m, accumulate)
    finally:
        gemm.get_kernel.cache_clear()
        gemm._kernel_for.cache_clear()


@pytest.mark.parametrize("isa", AMX_ISAS)
def test_amx_int8_linear_and_linear_t(isa):
    """The public single-group entry points take int8 weights on AMX too (given ``isa``)."""
    from kt_jit.kernels.quant import dequantize_int8, pack_int8

    n, k = 64, 96
    p, s = pack_int8(torch.randn(n, k, generator=torch.Generator().manual_seed(5)))
    wd = dequantize_int8(p, s)
    x, dy = torch.randn(19, k).bfloat16(), torch.randn(19, n).bfloat16()
    assert rel_err(gemm.linear(x, p, isa=isa, scales=s), ref_linear(x, wd)) < 1e-5
    assert rel_err(gemm.linear_t(dy, p, isa=isa, scales=s), ref_linear_t(dy, wd)) < 5e-3
    base = torch.randn(19, n)  # accumulate: the scaled outputs added to what is there
    y = gemm.linear(x, p, out=base.clone(), accumulate=True, isa=isa, scales=s)
    assert rel_err(y, base + ref_linear(x, wd)) < 1e-5


@NEEDS_AVX512_BF16
@pytest.mark.parametrize("steps", [8, 96, 256])
def test_forward_row_blocks_share_every_next_chunk_prefetch(steps):
    """The forward's next-chunk prefetch positions (gemm._row_block_share): the row blocks from
    row 0 (groups of FETCH_ALL_ROWS full blocks or more) or from the second block on, each over
    its k-steps, together reach every position of the chunk and none past it."""
    from kt_jit.codegen.worker import ArgBlock, compile_worker

    args, mr = ArgBlock(["out", "m"]), 6

    def body(fn, ctx, item, tiles):
        out, m = args.load_ptr(fn, ctx, "out"), args.load(fn, ctx, "m")
        every = fn.icmp("sge", m, gemm.FETCH_ALL_ROWS * mr)
        first_row = fn.val(f"select i1 {every}, i64 0, i64 {mr}")

        def micro(m0, rows):
            with fn.if_then(fn.icmp("sge", m0, first_row), name="share"):
                pos, rate = gemm._row_block_share(fn, m, m0, rows, first_row, steps)
                with fn.loop(0, steps, name="s"):
                    at = fn.val(f"lshr i64 {pos.get()}, 16")
                    fn.store("i8", "1", fn.gep(out, at), 1)
                    pos.set(fn.add(pos.get(), rate))

        gemm.row_blocks(fn, m, mr, micro)

    addr = compile_worker(f"test_row_block_share_{steps}", f"test-share-{steps}", args, body)
    for m in range(mr + 1, 70):
        out = torch.zeros(steps + 64, dtype=torch.uint8)
        args.run(addr, 1, num_threads=1, keep=(out,), out=out.data_ptr(), m=m)
        assert bool(out[:steps].all()) and not bool(out[steps:].any()), m

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Every test session compiles into its own cache directory (CI starts cold)."""
    os.environ["KT_JIT_CACHE_DIR"] = str(tmp_path_factory.mktemp("kt_jit_cache"))
    yield


def _needs_avx512_bf16():
    from kt_jit.runtime.cpu import cpu_info

    info = cpu_info()
    return pytest.mark.skipif(not info.avx512_bf16,
                              reason=f"AVX-512 BF16 kernels need avx512_bf16; {info.model_name} lacks it")


NEEDS_AVX512_BF16 = _needs_avx512_bf16()


@pytest.fixture
def lanes_form(monkeypatch):
    """The bf16 transposed GEMMs' tokens-in-lanes form from gemm.LANES_MIN_ROWS-row groups, set
    through KT_JIT_TUNING, on every host: CPUs with a 48 KB L1 leave it off by default
    (kernels/gemm.HostTuning). Returns that row count."""
    from kt_jit.kernels.gemm import LANES_MIN_ROWS

    monkeypatch.setenv("KT_JIT_TUNING", f"lanes_min_rows={LANES_MIN_ROWS}")
    return LANES_MIN_ROWS


def _isa_params():
    from kt_jit.runtime.amx import amx_status

    amx_ok, amx_why = amx_status()
    return [
        pytest.param("avx512", marks=NEEDS_AVX512_BF16),
        pytest.param("amx", marks=pytest.mark.skipif(not amx_ok, reason=f"AMX not usable here: {amx_why}")),
        pytest.param("amx_emu"),
    ]


ISAS = _isa_params()


def fp8_blocks(w, block, dtype=None):
    """``w [N, K]`` as a DeepSeek-V3-style FP8 checkpoint stores it, computed block by block:
    ``(q [N, K] fp8, scale_inv [ceil(N/bn), ceil(K/bk)] fp32, exact [N, K] fp32 = q * scale)``,
    each block's scale its amax / the format's largest value."""
    import torch

    dtype = dtype or torch.float8_e4m3fn
    (n, k), (bn, bk) = w.shape, block
    w = w.float()
    q, exact = torch.empty(n, k, dtype=dtype), torch.empty(n, k)
    scales = torch.empty(-(-n // bn), -(-k // bk))
    for a in range(scales.shape[0]):
        for b in range(scales.shape[1]):
            blk = (slice(a * bn, (a + 1) * bn), slice(b * bk, (b + 1) * bk))
            scales[a, b] = w[blk].abs().max() / torch.finfo(dtype).max
            q[blk] = (w[blk] / scales[a, b]).to(dtype)
            exact[blk] = q[blk].float() * scales[a, b]
    return q, scales, exact


def file_mappings(path) -> list[tuple[int, int]]:
    """Address ranges of this process's memory maps of the file ``path`` (Linux)."""
    with open("/proc/self/maps") as f:
        return [tuple(int(a, 16) for a in line.split()[0].split("-")) for line in f
                if line.rstrip().endswith(str(path))]

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


def _isa_params():
    from kt_jit.runtime.amx import amx_status

    amx_ok, amx_why = amx_status()
    return [
        pytest.param("avx512", marks=NEEDS_AVX512_BF16),
        pytest.param("amx", marks=pytest.mark.skipif(not amx_ok, reason=f"AMX not usable here: {amx_why}")),
        pytest.param("amx_emu"),
    ]


ISAS = _isa_params()

"""Generated code: compiles for any x86 host, and the assembly holds no tile or vector spills."""

import re

import pytest

from kt_jit.codegen.amx import TileConfig
from kt_jit.codegen.compile import compile_assembly, target_for
from kt_jit.kernels import gemm

SHAPES = [(768, 2048), (2048, 768)]


def _asm(spec):
    return compile_assembly(gemm.build_ir(spec), target_for(spec.isa))


def _spec(op, isa, n, k):
    return gemm.GemmSpec(op, n, k, isa, False, gemm.default_schedule(op, isa, n, k))


@pytest.mark.parametrize("op", ["fwd", "bwd"])
@pytest.mark.parametrize("n,k", SHAPES)
def test_amx_kernels_have_no_tile_spills(op, n, k):
    """Compiled for sapphirerapids on any host: tiles only move where the schedule says."""
    asm = _asm(_spec(op, "amx", n, k))
    assert asm.count("ldtilecfg") == 1 and asm.count("tilerelease") == 1
    assert "tdpbf16ps" in asm
    # the schedule stores C tiles (4 on the 2-tile path, 2 on the 1-tile path) and nothing else
    assert len(re.findall(r"\btilestored\b", asm)) == 6
    assert not re.search(r"tileloadd\s+[-\d]*\(%rsp", asm)
    # no call inside the kernel (tile state is caller-saved)
    assert not re.search(r"^\s*call", asm, re.M)


@pytest.mark.parametrize("op", ["fwd", "bwd"])
@pytest.mark.parametrize("quant,gs,zp", [("int8", 0, False), ("int4", 0, False), ("int4", 128, True)])
def test_amx_quantized_kernels_decode_without_spills(op, quant, gs, zp):
    """Quantized weights on AMX: the same tile traffic as bf16, plus the decoded blocks' stores to
    the stack (read back only by tile loads): no vector register is reloaded from the stack."""
    spec = gemm.GemmSpec(op, 768, 2048, "amx", False, gemm.default_schedule(op, "amx", 768, 2048), quant, gs, zp)
    asm = _asm(spec)
    assert asm.count("ldtilecfg") == 1 and asm.count("tilerelease") == 1 and "tdpbf16ps" in asm
    # C tiles stored: 6 per path (1 and 2 row tiles); both kernels have a path for up to 32 rows
    # (blocks decoded as used) and one for more (blocks decoded once for every row chunk)
    assert len(re.findall(r"\btilestored\b", asm)) == 12
    assert not re.search(r"^\s*call", asm, re.M)
    stack = re.findall(r"^[ \t]*(\S+)[ \t]+(.*\(%rsp[,)].*)$", asm, re.M)
    # (the transposed GEMM's copy-out reads the staged C tiles with vinsertps / vmovss)
    vector = [(op_, args) for op_, args in stack if "mm" in args and op_ not in ("vinsertps", "vmovss")]
    # decoded rows: 16 per block and copy of the decode, which the up-to-32-rows paths hold once per
    # row-tile count and the paths for more once: 2 blocks per step in the forward, 1 in the
    # transposed GEMM (whose decode-once loop addresses its buffer through another register)
    assert len(vector) == (96 if op == "fwd" else 32)
    assert all(re.fullmatch(r"%zmm\d+, -?\d*\(%rsp(,%\w+,\d)?\)", args) for _, args in vector), vector[:3]


@pytest.mark.parametrize("op", ["fwd", "bwd"])
@pytest.mark.parametrize("n,k", SHAPES)
def test_avx512_kernels_keep_accumulators_in_registers(op, n, k):
    asm = _asm(_spec(op, "avx512", n, k))
    assert "vdpbf16ps" in asm
    spills = re.findall(r"zmm\d+, [-\d]*\(%rsp\)|[-\d]*\(%rsp\), %zmm", asm)
    assert not spills, spills[:5]


def test_tile_config_bytes():
    cfg = TileConfig.uniform().to_bytes()
    assert len(cfg) == 64 and cfg[0] == 1
    assert cfg[16:32] == bytes([64, 0] * 8) and cfg[48:56] == bytes([16] * 8)
    assert TileConfig.uniform(2).to_bytes()[48:56] == bytes([16, 16, 0, 0, 0, 0, 0, 0])


def test_kernel_names_describe_the_spec():
    spec = _spec("fwd", "avx512", 768, 2048)
    assert spec.name.startswith("gemm_fwd_bf16_n768_k2048_avx512_")
    assert str(spec.schedule) in spec.name


@pytest.mark.parametrize("n,k", SHAPES)
def test_avx512_transposed_gemm_regroups_weight_rows_as_they_load(n, k):
    """bf16 rows are regrouped from k-pairs to n-pairs by a vpermw whose data operand is the
    weight load itself (no separate load + vpshufb per 64 bytes streamed)."""
    asm = _asm(_spec("bwd", "avx512", n, k))
    assert "vpshufb" not in asm
    assert re.findall(r"vpermw\s+-?\d*\(%r", asm) and all(
        re.match(r"\s*vpermw\s+-?\d*\(%r", line) for line in asm.splitlines() if "vpermw" in line)


def test_streamed_form_reads_dy_as_broadcast_operands():
    """Each of the streamed form's dot products (8 per row of each row-count case) takes its dY
    pair as a broadcast memory operand, also with the addresses hidden from loop strength
    reduction (codegen/ir.py gep_unseen)."""
    spec = gemm.kernel_for("bwd", 1536, 2048, isa="avx512").spec
    asm = _asm(spec)
    dots = [line for line in asm.splitlines() if "vdpbf16ps" in line]
    assert sum("{1to16}" in line for line in dots) >= 8 * sum(gemm._stream_row_variants(spec))
    assert "vpbroadcastd" not in asm


def test_transposed_panel_requests_its_output_block_for_writing_unless_lora_is_fused():
    """The panel form's items prefetch their output block for writing (its first chunk's loads
    would otherwise each wait for a cold line); the fused-LoRA kernels leave it out (measured
    without gain there)."""
    plain = _asm(gemm.kernel_for("bwd", 1536, 2048, isa="avx512").spec)
    fused = _asm(gemm.kernel_for("bwd", 1536, 2048, lora_rank=16, lora_split=768).spec)
    assert "prefetchw" in plain
    assert "prefetchw" not in fused


def test_tokens_in_lanes_form_broadcasts_weight_pairs_from_memory(lanes_form):
    """The tokens-in-lanes form's dots take each weight pair as an embedded broadcast of the stack
    scratch (no broadcast instruction, no stores forwarded into shuffles: either was 1.3-2x
    slower), with its 16 accumulators in registers; the dY transposition stores masked lanes."""
    from kt_jit.codegen.worker import worker_module
    from kt_jit.kernels import dytiles

    asm = _asm(gemm.kernel_for("bwd", 1536, 2048, isa="avx512", lanes_dy=True).spec)
    dots = re.findall(r"vdpbf16ps\s+(\S+), %zmm", asm)
    assert sum("{1to16}" in d for d in dots) >= 16  # the 16 dots of one n-pair
    assert not re.search(r"vpbroadcastd\s+[-\d]*\(%r", asm)
    # (its weight-row scratch is stack memory by design: no spill or reload marks instead)
    assert "Spill" not in asm and "Reload" not in asm
    spec = dytiles.DyTilesSpec(1536, "lanes", 16)
    ir = worker_module(spec.name, dytiles.ARGS, dytiles._lanes_body(spec)).render()
    lanes = compile_assembly(ir, target_for("avx512"))
    assert re.search(r"vmovdqu32\s+%zmm\d+, [-\d]*\(%r\w+(,%r\w+)?\) \{%k\d\}", lanes)
    assert not re.search(r"^\s*call", lanes, re.M)

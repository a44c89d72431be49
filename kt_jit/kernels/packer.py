"""JIT packing (and online quantization) of expert weights into the tile order the GEMMs read.

One work item takes 16 rows (one n-block) of a row-major source matrix ``W [rows, K]`` and writes
the block's ``K/2`` packed lines (kernels/pack.py's layout; int4: quant.py's nibble pairs), plus,
for the integer storages, the block's scales (and zero points) per row and group. The source rows
are read in 32-column chunks: each row's 32 values become 16 dwords (a bf16 pair, or two 8-bit
codes, per k-pair), and a 16 x 16 dword transpose turns the 16 rows into 16 packed lines (lane =
channel). Quantized storages first read the block's rows once for their group statistics.

The arithmetic is torch's in kernels/quant.py, operation for operation (fp32 ``max|w| / 127`` or
``/ 7``, ``(hi - lo) / 15``, a true division ``w / s``, round half to even, clamp; bf16 rounded
in integer arithmetic as torch rounds, subnormals kept), so the packed bytes, scales and zero
points are bit-identical to :func:`quant.pack_int8` / :func:`quant.pack_int4` /
:func:`pack.pack_bf16` on the same input; tests hold them to that. (Not for NaN weights: their
codes are clamped to a bound here, where torch's conversion of NaN is undefined.)

Sources: bf16, fp16, fp32 rows with unit column stride and any row pitch, and FP8 (e4m3fn, e5m2)
rows with block scales (DeepSeek-V3's ``weight_scale_inv``), dequantized on the fly to
``fp8.float() * scale`` (exactly torch's value): an e4m3 byte moved into an fp16's exponent and
mantissa fields (sign << 8, the rest << 7) is the value times 2^-8 in every case, subnormals
included, so one ``vcvtph2ps`` and a multiply by ``256 * scale`` restore it; e5m2 is the high byte
of an fp16. ``0x7f``/``0xff`` (e4m3fn's NaN) become NaN. Nothing is staged through a dequantized
copy: this replaced torch's conversion chain, which spent ~150 ms per DeepSeek-V3 expert on the FP8
conversion alone (docs/benchmarks.md, "Twenty-eighth session").
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..codegen import avx512 as vx
from ..codegen.ir import F32x16, Function, I32x16, vec_const
from ..codegen.worker import ArgBlock, compile_worker, immediate_launches

ROWS = 16    # rows per work item (one packed n-block)
CHUNK = 32   # columns per step: 16 k-pairs
SOURCES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
           torch.float8_e4m3fn: "e4m3", torch.float8_e5m2: "e5m2"}
STORAGES = {torch.bfloat16: "bf16", torch.int8: "int8", torch.uint8: "int4"}
_LINE_BYTES = {"bf16": 64, "int8": 32, "int4": 16}  # bytes of one packed k-pair line
_FIELDS = ("src", "pitch", "fsc", "fpitch", "dst", "dscale", "dzero", "pad")  # one table row per segment
# table: int64 [segments, 8] as _FIELDS; bps: 16-row blocks per segment; k: columns; gs: group
# size (columns); gstride: bytes between a scale's groups; bn: source rows per FP8 scale row
ARGS = ArgBlock(["table", "bps", "k", "gs", "gstride", "bn"])


@dataclass(frozen=True)
class PackSpec:
    """``source`` ("bf16", "fp16", "fp32", "e4m3", "e5m2") -> ``storage`` ("bf16", "int8", "int4");
    ``asym``: int4 with zero points; ``fp8_block_k``: columns per FP8 scale (a multiple of 32;
    FP8 sources only)."""

    source: str
    storage: str
    asym: bool = False
    fp8_block_k: int = 0

    def __post_init__(self) -> None:
        fp8 = self.source in ("e4m3", "e5m2")
        if self.source not in SOURCES.values() or self.storage not in STORAGES.values():
            raise ValueError(f"no packing from {self.source!r} to {self.storage!r}")
        if self.asym and self.storage != "int4":
            raise ValueError("zero points (asym) exist for int4 storage only")
        if fp8 != (self.fp8_block_k > 0) or self.fp8_block_k % CHUNK:
            raise ValueError(f"fp8_block_k={self.fp8_block_k}: FP8 sources need a positive multiple of {CHUNK}, "
                             "other sources 0")

    @property
    def name(self) -> str:
        bk = f"_bk{self.fp8_block_k}" if self.fp8_block_k else ""
        return f"pack_{self.source}_{self.storage}" + ("_asym" if self.asym else "") + bk


def _splat(elem: str, lanes: int, value: int) -> str:
    """A constant vector operand of ``lanes`` copies of ``value`` (``elem``: "i8", "i16", "i32")."""
    return vec_const(elem, [value] * lanes)


def _declare(fn: Function, name: str, ret: str, args: str) -> str:
    return fn.module.declare(name, f"declare {ret} @{name}({args})")


def _call2(fn: Function, name: str, a: str, b: str) -> str:
    sym = _declare(fn, name, F32x16, f"{F32x16}, {F32x16}")
    return fn.val(f"call {F32x16} {sym}({F32x16} {a}, {F32x16} {b})")


def _call1(fn: Function, name: str, a: str) -> str:
    return fn.val(f"call {F32x16} {_declare(fn, name, F32x16, F32x16)}({F32x16} {a})")


def _reduce(fn: Function, name: str, v: str) -> str:
    return fn.val(f"call float {_declare(fn, name, 'float', F32x16)}({F32x16} {v})")


def _fp8_halves(fn: Function, ptr: str, source: str) -> tuple[str, str]:
    """32 FP8 bytes at ``ptr`` as two <16 x float> (e4m3: the value times 2^-8, see the module
    docstring; e5m2: the value)."""
    b = fn.val(f"zext <32 x i8> {fn.load('<32 x i8>', ptr, 1)} to <32 x i16>")
    if source == "e5m2":
        bits = fn.val(f"shl <32 x i16> {b}, {_splat('i16', 32, 8)}")
    else:
        sign = fn.val(f"and <32 x i16> {b}, {_splat('i16', 32, 0x80)}")
        sign = fn.val(f"shl <32 x i16> {sign}, {_splat('i16', 32, 8)}")
        mag = fn.val(f"and <32 x i16> {b}, {_splat('i16', 32, 0x7F)}")
        shifted = fn.val(f"shl <32 x i16> {mag}, {_splat('i16', 32, 7)}")
        bits = fn.val(f"or <32 x i16> {sign}, {shifted}")
        nan = fn.val(f"icmp eq <32 x i16> {mag}, {_splat('i16', 32, 0x7F)}")
        bits = fn.val(f"select <32 x i1> {nan}, <32 x i16> {_splat('i16', 32, 0x7E00)}, <32 x i16> {bits}")
    h = fn.val(f"bitcast <32 x i16> {bits} to <32 x half>")
    out = []
    for part in range(2):
        half = fn.val(f"shufflevector <32 x half> {h}, <32 x half> poison, "
                      f"<16 x i32> {vec_const('i32', range(16 * part, 16 * part + 16))}")
        out.append(fn.val(f"fpext <16 x half> {half} to {F32x16}"))
    return out[0], out[1]


def _load_halves(fn: Function, row: str, col: str, spec: PackSpec, fsc_row: str | None) -> tuple[str, str]:
    """Columns ``col .. col+31`` of the source row at ``row`` as two <16 x float> (FP8: times the
    block's scale)."""
    if spec.source in ("e4m3", "e5m2"):
        lo, hi = _fp8_halves(fn, fn.gep(row, col), spec.source)
        s = fn.load("float", fn.gep(fsc_row, fn.mul(fn.val(f"udiv i64 {col}, {spec.fp8_block_k}"), 4)), 4)
        if spec.source == "e4m3":
            s = fn.val(f"fmul float {s}, {vx.f32_const(256.0)}")  # exact: undoes the 2^-8 of the fp16 form
        sv = vx.f32_splat_value(fn, s)
        return vx.fmul(fn, lo, sv), vx.fmul(fn, hi, sv)
    size = {"bf16": 2, "fp16": 2, "fp32": 4}[spec.source]
    out = []
    for part in range(2):
        p = fn.gep(row, fn.mul(fn.add(col, 16 * part), size))
        if spec.source == "fp16":
            out.append(fn.val(f"fpext <16 x half> {fn.load('<16 x half>', p, 2)} to {F32x16}"))
        else:
            out.append(vx.load_f32x16(fn, p, "f32" if spec.source == "fp32" else "bf16"))
    return out[0], out[1]


def _codes_to_pairs(fn: Function, lo: str, hi: str) -> str:
    """Two <16 x i32> of 8-bit codes (columns 0-15, 16-31) -> <16 x i32>: dword p holds the codes of
    columns 2p and 2p+1 in its low two bytes."""
    b = [fn.val(f"trunc {I32x16} {v} to <16 x i8>") for v in (lo, hi)]
    both = fn.val(f"shufflevector <16 x i8> {b[0]}, <16 x i8> {b[1]}, <32 x i32> {vec_const('i32', range(32))}")
    return fn.val(f"zext <16 x i16> {fn.val(f'bitcast <32 x i8> {both} to <16 x i16>')} to {I32x16}")


def _to_bf16_bits(fn: Function, v: str) -> str:
    """<16 x float> -> <16 x i16> bf16 bits rounded to nearest even as torch rounds (NaN -> 0xFFFF, as in
    torch's vectorised conversion).
    Not ``vcvtneps2bf16``: it flushes subnormal inputs to zero, torch keeps them."""
    bits = fn.val(f"bitcast {F32x16} {v} to {I32x16}")
    high = fn.val(f"lshr {I32x16} {bits}, {_splat('i32', 16, 16)}")
    lsb = fn.val(f"and {I32x16} {high}, {_splat('i32', 16, 1)}")
    bias = fn.val(f"add {I32x16} {lsb}, {_splat('i32', 16, 0x7FFF)}")
    rounded = fn.val(f"lshr {I32x16} {fn.val(f'add {I32x16} {bits}, {bias}')}, {_splat('i32', 16, 16)}")
    nan = fn.val(f"fcmp uno {F32x16} {v}, {v}")
    out = fn.val(f"select <16 x i1> {nan}, {I32x16} {_splat('i32', 16, 0xFFFF)}, {I32x16} {rounded}")
    return fn.val(f"trunc {I32x16} {out} to <16 x i16>")


def _body(spec: PackSpec):
    quantized = spec.storage != "bf16"
    fp8 = spec.fp8_block_k > 0
    line = _LINE_BYTES[spec.storage]

    def body(fn: Function, ctx: str, item: str, tiles) -> None:
        table = ARGS.load_ptr(fn, ctx, "table")
        bps, k, gs = (ARGS.load(fn, ctx, f) for f in ("bps", "k", "gs"))
        gstride, bn = ARGS.load(fn, ctx, "gstride"), ARGS.load(fn, ctx, "bn")
        entry = fn.gep(table, fn.mul(fn.val(f"udiv i64 {item}, {bps}"), 8 * len(_FIELDS)))
        field = {f: fn.gep(entry, 8 * n) for n, f in enumerate(_FIELDS)}
        src, fsc, dst = (fn.load("ptr", field[f], 8) for f in ("src", "fsc", "dst"))
        dscale, dzero = fn.load("ptr", field["dscale"], 8), fn.load("ptr", field["dzero"], 8)
        pitch, fpitch = fn.load("i64", field["pitch"], 8), fn.load("i64", field["fpitch"], 8)
        blk = fn.val(f"urem i64 {item}, {bps}")
        r0 = fn.mul(blk, ROWS)
        dst = fn.gep(dst, fn.mul(blk, fn.mul(k, line // 2)))  # the block's first line: K/2 lines per block

        def row_ptr(i: str | int) -> str:
            return fn.gep(src, fn.mul(fn.add(r0, i), pitch))

        def fsc_row(i: str | int) -> str | None:
            return fn.gep(fsc, fn.mul(fn.val(f"udiv i64 {fn.add(r0, i)}, {bn}"), fpitch)) if fp8 else None

        def stat_ptr(base: str, i: str | int, g: str, size: int) -> str:
            """Row i's scale (size 4) or zero point (size 1) of the group starting at column g."""
            per_group = gstride if size == 4 else fn.val(f"udiv i64 {gstride}, 4")
            return fn.gep(base, fn.add(fn.mul(fn.val(f"udiv i64 {g}, {gs}"), per_group), fn.mul(fn.add(r0, i), size)))

        if quantized:
            # group statistics, row by row: max|w| (symmetric) or min and max (zero points)
            with fn.loop(0, ROWS, name="srow") as i:
                row, frow = row_ptr(i), fsc_row(i)
                with fn.loop(0, k, gs, name="grp") as g:
                    hi = fn.var(F32x16, vx.f32_splat(float("-inf") if spec.asym else 0.0), 64)
                    lo = fn.var(F32x16, vx.f32_splat(float("inf")), 64) if spec.asym else None
                    with fn.loop(g, fn.add(g, gs), CHUNK, name="scol") as c:
                        for v in _load_halves(fn, row, c, spec, frow):
                            if spec.asym:
                                hi.set(_call2(fn, "llvm.maximum.v16f32", hi.get(), v))
                                lo.set(_call2(fn, "llvm.minimum.v16f32", lo.get(), v))
                            else:
                                hi.set(_call2(fn, "llvm.maximum.v16f32", hi.get(), _call1(fn, "llvm.fabs.v16f32", v)))
                    top = _reduce(fn, "llvm.vector.reduce.fmaximum.v16f32", hi.get())
                    if spec.asym:  # torch: amin.clamp(max=0), amax.clamp(min=0), (hi - lo) / 15
                        bot = _reduce(fn, "llvm.vector.reduce.fminimum.v16f32", lo.get())
                        mn = _declare(fn, "llvm.minimum.f32", "float", "float, float")
                        mx = _declare(fn, "llvm.maximum.f32", "float", "float, float")
                        bot = fn.val(f"call float {mn}(float {bot}, float 0.0)")
                        top = fn.val(f"call float {mx}(float {top}, float 0.0)")
                        scale = fn.val(f"fdiv float {fn.val(f'fsub float {top}, {bot}')}, {vx.f32_const(15.0)}")
                    else:
                        scale = fn.val(f"fdiv float {top}, {vx.f32_const(127.0 if spec.storage == 'int8' else 7.0)}")
                    # torch.where(scale == 0, 1, scale): a NaN or inf scale stays (the caller refuses it)
                    scale = fn.val(f"select i1 {fn.val(f'fcmp oeq float {scale}, 0.0')}, float 1.0, float {scale}")
                    fn.store("float", scale, stat_ptr(dscale, i, g, 4), 4)
                    if spec.asym:  # round(-lo / s) clamped to [0, 15]; a NaN ends as 0
                        z = fn.val(f"fdiv float {fn.val(f'fneg float {bot}')}, {scale}")
                        rint = _declare(fn, "llvm.roundeven.f32", "float", "float")
                        z = fn.val(f"call float {rint}(float {z})")
                        z = fn.val(f"call float {_declare(fn, 'llvm.minnum.f32', 'float', 'float, float')}"
                                   f"(float {z}, float 15.0)")
                        z = fn.val(f"call float {_declare(fn, 'llvm.maxnum.f32', 'float', 'float, float')}"
                                   f"(float {z}, float 0.0)")
                        fn.store("i8", fn.val(f"fptoui float {z} to i8"), stat_ptr(dzero, i, g, 1), 1)

        lo_code, hi_code = {"int8": (-127.0, 127.0), "int4": (-8.0, 7.0)}.get(spec.storage, (0.0, 0.0))
        if spec.asym:
            lo_code, hi_code = 0.0, 15.0
        with fn.loop(0, k, CHUNK, name="col") as c:
            rows = []
            for i in range(ROWS):
                row = row_ptr(i)
                if spec.storage == "bf16" and spec.source == "bf16":
                    rows.append(fn.load(I32x16, fn.gep(row, fn.mul(c, 2)), 2))  # a plain copy
                    continue
                halves = _load_halves(fn, row, c, spec, fsc_row(i))
                if spec.storage == "bf16":
                    b = [_to_bf16_bits(fn, v) for v in halves]
                    both = fn.val(f"shufflevector <16 x i16> {b[0]}, <16 x i16> {b[1]}, "
                                  f"<32 x i32> {vec_const('i32', range(32))}")
                    rows.append(fn.val(f"bitcast <32 x i16> {both} to {I32x16}"))
                    continue
                s = vx.f32_splat_value(fn, fn.load("float", stat_ptr(dscale, i, c, 4), 4))
                z = None
                if spec.asym:
                    zb = fn.load("i8", stat_ptr(dzero, i, c, 1), 1)
                    z = vx.f32_splat_value(fn, fn.val(f"uitofp i8 {zb} to float"))
                codes = []
                for v in halves:
                    q = fn.val(f"fdiv {F32x16} {v}, {s}")
                    if z is not None:
                        q = vx.fadd(fn, q, z)
                    q = _call1(fn, "llvm.roundeven.v16f32", q)
                    q = _call2(fn, "llvm.minnum.v16f32", q, vx.f32_splat(hi_code))  # (NaN ends at a bound)
                    q = _call2(fn, "llvm.maxnum.v16f32", q, vx.f32_splat(lo_code))
                    q = fn.val(f"fptosi {F32x16} {q} to {I32x16}")
                    if spec.storage == "int4" and not spec.asym:
                        q = fn.val(f"add {I32x16} {q}, {_splat('i32', 16, 8)}")
                    codes.append(q)
                rows.append(_codes_to_pairs(fn, *codes))
            lines = vx.transpose_dwords_16x16(fn, rows)  # lines[p]: k-pair c/2 + p of the 16 channels
            half_c = fn.val(f"udiv i64 {c}, 2")
            for p in range(ROWS):
                if spec.storage == "bf16":
                    vx.store_nontemporal(fn, I32x16, lines[p], fn.gep(dst, fn.mul(fn.add(half_c, p), 64)), 64)
                elif spec.storage == "int8":
                    w = fn.val(f"trunc {I32x16} {lines[p]} to <16 x i16>")
                    vx.store_nontemporal(fn, "<16 x i16>", w, fn.gep(dst, fn.mul(fn.add(half_c, p), 32)), 32)
                elif p % 2 == 0:  # int4: k-pair lines 2j and 2j+1 share 32 bytes, low and high nibbles
                    lo_b, hi_b = (fn.val(f"bitcast <16 x i16> {fn.val(f'trunc {I32x16} {v} to <16 x i16>')} "
                                         f"to <32 x i8>") for v in (lines[p], lines[p + 1]))
                    hi_b = fn.val(f"shl <32 x i8> {hi_b}, {_splat('i8', 32, 4)}")
                    both = fn.val(f"or <32 x i8> {lo_b}, {hi_b}")
                    vx.store_nontemporal(fn, "<32 x i8>", both, fn.gep(dst, fn.mul(fn.add(half_c, p), 16)), 32)
        vx.sfence(fn)

    return body


@functools.cache
def get_kernel(spec: PackSpec) -> int:
    """Address of the compiled packing worker for ``spec`` (memoised; disk-cached)."""
    return compile_worker(spec.name, repr(spec), ARGS, _body(spec))


class Fp8Weight(NamedTuple):
    """An FP8 matrix with block scales, as DeepSeek-V3-style checkpoints store it: ``weight [N, K]``
    float8_e4m3fn or float8_e5m2, ``scale_inv [ceil(N/bn), ceil(K/bk)]`` fp32 (the factor that
    restores the weight), ``block = (bn, bk)``."""

    weight: torch.Tensor
    scale_inv: torch.Tensor
    block: tuple[int, int]


Source = torch.Tensor | Fp8Weight


def supports(part: Source) -> bool:
    """Whether :func:`pack_into` takes ``part`` (else use the torch path of kernels/quant.py): a 2-D
    CPU matrix with unit column stride in a source dtype; FP8 with a block width that is a multiple
    of 32 and fp32 scales of the right shape."""
    w = part.weight if isinstance(part, Fp8Weight) else part
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or w.device.type != "cpu" or w.dtype not in SOURCES:
        return False
    if w.stride(1) != 1 and w.shape[1] > 1:
        return False
    fp8 = w.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
    if not fp8:
        return not isinstance(part, Fp8Weight)
    if not isinstance(part, Fp8Weight):
        return False
    bn, bk = part.block
    s = part.scale_inv
    if not (isinstance(bn, int) and isinstance(bk, int) and isinstance(s, torch.Tensor)):
        return False
    return (bn > 0 and bk > 0 and bk % CHUNK == 0 and s.dtype == torch.float32 and s.dim() == 2
            and s.device.type == "cpu" and s.stride(1) == 1
            and tuple(s.shape) == (-(-w.shape[0] // bn), -(-w.shape[1] // bk)))


def pack_into(packed: torch.Tensor, scale: torch.Tensor | None, zero: torch.Tensor | None, first: int,
              experts: Sequence[Sequence[Source]], group_size: int = 0) -> None:
    """Pack (quantize) the matrices of ``experts`` into entries ``first, first + 1, ...`` of
    ``packed``, ``scale`` and ``zero``, in place.

    ``packed``: contiguous, 64-byte aligned, ``[E, N/16, K/2, 16, 2]`` bf16 or int8, or ``[E, N/16,
    K/2, 16]`` uint8 (int4 nibble pairs); ``scale``: fp32 ``[E, G, N]`` (G = K / group_size, 1
    per channel) for int8/int4, else None; ``zero``: uint8 ``[E, G, N]`` for asymmetric int4, else
    None. ``experts[j]`` is expert ``first + j``'s matrix ``[N, K]`` as the vertical concatenation
    of its parts (e.g. gate then up), every part of every expert with the same row count (a
    multiple of 16) and source type, each accepted by :func:`supports`. ``group_size``: 0 (per
    channel) or a multiple of 32 dividing K. The results equal ``pack_bf16`` / ``pack_int8`` /
    ``pack_int4`` of the concatenated fp32 values bit for bit."""
    storage = STORAGES.get(packed.dtype)
    if storage is None or not packed.is_contiguous() or packed.data_ptr() % 64 or packed.device.type != "cpu":
        raise ValueError("packed must be a contiguous, 64-byte aligned CPU tensor of bf16, int8 or uint8 (int4)")
    parts = [p for ex in experts for p in ex]
    if not parts:
        return
    if not all(supports(p) for p in parts):
        raise ValueError("every part must be a 2-D CPU bf16/fp16/fp32 matrix with unit column stride, or an "
                         "Fp8Weight with fp32 block scales and a block width that is a multiple of 32")
    ws = [p.weight if isinstance(p, Fp8Weight) else p for p in parts]
    rows, k = ws[0].shape
    n = rows * len(experts[0])
    if any(tuple(w.shape) != (rows, k) or w.dtype != ws[0].dtype for w in ws) \
            or any(len(ex) != len(experts[0]) for ex in experts):
        raise ValueError("every part must have the same shape and dtype, and every expert as many parts")
    if rows <= 0 or k <= 0 or rows % ROWS or k % CHUNK:
        raise ValueError(f"parts of {rows} x {k}: rows must be a multiple of {ROWS}, columns of {CHUNK}")
    e = packed.shape[0]
    line = _LINE_BYTES[storage]
    want = (e, n // 16, k // 2, 16) + ((2,) if storage != "int4" else ())
    if tuple(packed.shape) != want or not 0 <= first <= e - len(experts):
        raise ValueError(f"packed has shape {tuple(packed.shape)}; {want} expected, with room for "
                         f"{len(experts)} experts from {first}")
    gs = group_size or k
    if group_size and storage != "int4":
        raise ValueError(f"group_size={group_size}: groups along K exist for int4 storage only (pass 0)")
    if gs % CHUNK or k % gs:
        raise ValueError(f"group_size={group_size} must be 0 or a multiple of {CHUNK} dividing K={k}")
    asym = zero is not None
    for name, t, dtype in (("scale", scale, torch.float32), ("zero", zero, torch.uint8)):
        need = storage != "bf16" and (name == "scale" or asym)
        if (t is None) == need or (t is not None and (tuple(t.shape) != (e, k // gs, n) or t.dtype != dtype
                                                      or not t.is_contiguous() or t.device.type != "cpu")):
            raise ValueError(f"{name} must be a contiguous CPU {dtype} tensor [{e}, {k // gs}, {n}] "
                             f"{'for this storage' if need else 'only for int8/int4 (zero: asymmetric int4)'}")
    if asym and storage != "int4":
        raise ValueError("zero points exist for int4 storage only")
    fp8 = isinstance(parts[0], Fp8Weight)
    block = parts[0].block if fp8 else (0, 0)
    if fp8 and any(p.block != block for p in parts):
        raise ValueError("every FP8 part must use the same block size")
    spec = PackSpec(SOURCES[ws[0].dtype], storage, asym, block[1])
    fields = []
    esize = ws[0].element_size()
    for j, ex in enumerate(experts):
        for m, p in enumerate(ex):
            w = p.weight if fp8 else p
            dst = packed[first + j].data_ptr() + m * (rows // ROWS) * (k // 2) * line
            dscale = scale[first + j].data_ptr() + m * rows * 4 if scale is not None else 0
            dzero = zero[first + j].data_ptr() + m * rows if zero is not None else 0
            fsc, fpitch = (p.scale_inv.data_ptr(), p.scale_inv.stride(0) * 4) if fp8 else (0, 0)
            fields += (w.data_ptr(), w.stride(0) * esize, fsc, fpitch, dst, dscale, dzero, 0)
    table = (ctypes.c_int64 * len(fields))(*fields)
    with immediate_launches():  # (the sources may be freed right after)
        ARGS.run(get_kernel(spec), len(parts) * (rows // ROWS), keep=(table,), table=ctypes.addressof(table),
                 bps=rows // ROWS, k=k, gs=gs, gstride=n * 4, bn=block[0] or 1)

"""AMX tile emission with explicit tile ids, plus an IR-level emulator of the same instructions.

Kernels call :class:`Tiles` methods; with ``emulate=False`` they become the non-``.internal``
intrinsics (``llvm.x86.tileloadd64(i8 immarg, ...)`` etc.) so the tile allocation is exactly the
schedule's. With ``emulate=True`` the very same calls go to small IR functions that keep the eight
tile registers and the 64-byte tile config in a per-thread memory block, interpreting rows/colsb
from the config exactly as the hardware does. That lets the AMX kernels' addressing, tails and
tile config be tested numerically on CPUs without AMX.
"""

from __future__ import annotations

from dataclasses import dataclass

from .ir import Function, Module

TILE_BYTES = 1024
TILEFILE_BYTES = 8 * TILE_BYTES + 64  # 8 tiles + config


@dataclass(frozen=True)
class TileConfig:
    """Palette-1 tile configuration: rows (<=16) and bytes per row (<=64) of tiles 0..7."""

    rows: tuple[int, ...]
    colsb: tuple[int, ...]

    @staticmethod
    def uniform(n_tiles: int = 8, rows: int = 16, colsb: int = 64) -> TileConfig:
        return TileConfig(tuple([rows] * n_tiles + [0] * (8 - n_tiles)),
                          tuple([colsb] * n_tiles + [0] * (8 - n_tiles)))

    def to_bytes(self) -> bytes:
        b = bytearray(64)
        b[0] = 1  # palette 1
        for t in range(8):
            b[16 + 2 * t: 18 + 2 * t] = int(self.colsb[t]).to_bytes(2, "little")
            b[48 + t] = self.rows[t]
        return bytes(b)


class Tiles:
    """Emits tile operations into ``fn`` (real intrinsics, or calls into the emulator)."""

    def __init__(self, fn: Function, emulate: bool) -> None:
        self.fn, self.emulate = fn, emulate
        self.tilefile = "null"
        if emulate:
            _define_emulator(fn.module)
            self.tilefile = fn.alloca("i8", 64, TILEFILE_BYTES)

    def _call(self, name: str, sig: str, args: str) -> None:
        m = self.fn.module
        if self.emulate:
            self.fn.emit(f"call void @kt_emu_{name}(ptr {self.tilefile}{', ' if args else ''}{args})")
        else:
            m.declare(f"llvm.x86.{name}", f"declare void @llvm.x86.{name}({sig})")
            self.fn.emit(f"call void @llvm.x86.{name}({args})")

    def configure(self, cfg: TileConfig) -> None:
        m = self.fn.module
        gname = m.unique("kt_tilecfg")
        data = ", ".join(f"i8 {x}" for x in cfg.to_bytes())
        m.add_global(f"@{gname} = private unnamed_addr constant [64 x i8] [{data}], align 64")
        self._call("ldtilecfg", "ptr", f"ptr @{gname}")

    def zero(self, t: int) -> None:
        self._call("tilezero", "i8 immarg", f"i8 {t}")

    def load(self, t: int, ptr: str, stride: str | int) -> None:
        self._call("tileloadd64", "i8 immarg, ptr, i64", f"i8 {t}, ptr {ptr}, i64 {stride}")

    def store(self, t: int, ptr: str, stride: str | int) -> None:
        self._call("tilestored64", "i8 immarg, ptr, i64", f"i8 {t}, ptr {ptr}, i64 {stride}")

    def dp_bf16(self, c: int, a: int, b: int) -> None:
        """C[m][n] += sum_k A[m][2k]*B[k][2n] + A[m][2k+1]*B[k][2n+1] (bf16 -> fp32)."""
        self._call("tdpbf16ps", "i8 immarg, i8 immarg, i8 immarg", f"i8 {c}, i8 {a}, i8 {b}")

    def dp_s8s8(self, c: int, a: int, b: int) -> None:
        """C[m][n] += sum_k sum_{j<4} A[m][4k+j]*B[k][4n+j] (int8 x int8 -> int32)."""
        self._call("tdpbssd", "i8 immarg, i8 immarg, i8 immarg", f"i8 {c}, i8 {a}, i8 {b}")

    def release(self) -> None:
        self._call("tilerelease", "", "")


# ---------------------------------------------------------------------------------------------
# The emulator: tile t lives at tilefile + 1024*t (row stride 64), the config at tilefile + 8192.

def _define_emulator(m: Module) -> None:
    if "kt_emu_defined" in m._names:
        return
    m._names.add("kt_emu_defined")
    cfg = 8 * TILE_BYTES

    def header(name: str, extra: list[tuple[str, str]]) -> Function:
        return m.function(f"kt_emu_{name}", [("ptr", "%tf")] + extra, linkage="internal")

    def shape(fn: Function, t: str) -> tuple[str, str]:
        tz = fn.val(f"zext i8 {t} to i64")
        rows = fn.val(f"zext i8 {fn.load('i8', fn.gep('%tf', fn.add(cfg + 48, tz)))} to i64")
        colsb = fn.val(f"zext i16 {fn.load('i16', fn.gep('%tf', fn.add(cfg + 16, fn.mul(tz, 2))))} to i64")
        return rows, colsb

    def tile(fn: Function, t: str) -> str:
        return fn.gep("%tf", fn.mul(fn.val(f"zext i8 {t} to i64"), TILE_BYTES))

    fn = header("ldtilecfg", [("ptr", "%cfg")])
    with fn.loop(0, 64) as i:
        fn.store("i8", fn.load("i8", fn.gep("%cfg", i)), fn.gep("%tf", fn.add(cfg, i)))
    fn.ret()

    fn = header("tilerelease", [])
    fn.ret()

    fn = header("tilezero", [("i8", "%t")])
    base = tile(fn, "%t")
    with fn.loop(0, TILE_BYTES) as i:
        fn.store("i8", "0", fn.gep(base, i))
    fn.ret()

    for name, to_tile in (("tileloadd64", True), ("tilestored64", False)):
        fn = header(name, [("i8", "%t"), ("ptr", "%mem"), ("i64", "%stride")])
        rows, colsb = shape(fn, "%t")
        base = tile(fn, "%t")
        with fn.loop(0, rows, name="r") as r, fn.loop(0, colsb, name="c") as c:
            t_ptr = fn.gep(base, fn.add(fn.mul(r, 64), c))
            m_ptr = fn.gep("%mem", fn.add(fn.mul(r, "%stride"), c))
            src, dst = (m_ptr, t_ptr) if to_tile else (t_ptr, m_ptr)
            fn.store("i8", fn.load("i8", src), dst)
        fn.ret()

    def dot(name: str, elem: str, acc: str, per: int) -> None:
        fn = header(name, [("i8", "%c"), ("i8", "%a"), ("i8", "%b")])
        rows, colsb = shape(fn, "%c")
        _, a_colsb = shape(fn, "%a")
        cb, ab, bb = tile(fn, "%c"), tile(fn, "%a"), tile(fn, "%b")
        ncols = fn.val(f"udiv i64 {colsb}, 4")
        kdim = fn.val(f"udiv i64 {a_colsb}, 4")
        esz = 2 if elem == "bfloat" else 1
        with fn.loop(0, rows, name="m") as mi, fn.loop(0, ncols, name="n") as ni:
            c_ptr = fn.gep(cb, fn.add(fn.mul(mi, 64), fn.mul(ni, 4)))
            s = fn.var(acc, fn.load(acc, c_ptr, 4))
            with fn.loop(0, kdim, name="k") as ki:
                for j in range(per):
                    a = fn.load(elem, fn.gep(ab, fn.add(fn.mul(mi, 64), fn.add(fn.mul(ki, 4), j * esz))))
                    b = fn.load(elem, fn.gep(bb, fn.add(fn.mul(ki, 64), fn.add(fn.mul(ni, 4), j * esz))))
                    if elem == "bfloat":
                        p = fn.val(f"fmul float {fn.val(f'fpext bfloat {a} to float')}, "
                                   f"{fn.val(f'fpext bfloat {b} to float')}")
                        s.set(fn.val(f"fadd float {s.get()}, {p}"))
                    else:
                        p = fn.val(f"mul i32 {fn.val(f'sext i8 {a} to i32')}, {fn.val(f'sext i8 {b} to i32')}")
                        s.set(fn.val(f"add i32 {s.get()}, {p}"))
            fn.store(acc, s.get(), c_ptr, 4)
        fn.ret()

    dot("tdpbf16ps", "bfloat", "float", 2)
    dot("tdpbssd", "i8", "i32", 4)

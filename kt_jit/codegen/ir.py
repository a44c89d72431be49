"""A small builder for LLVM IR *text*.

Kernels are emitted as textual IR (as tinygrad does) rather than through llvmlite.ir: the text form
has ``bfloat``, ``x86_amx`` and ``immarg`` intrinsics that llvmlite.ir lacks, and what is emitted is
exactly what LLVM parses. Values are strings (``"%t12"``, ``"0"``); every instruction names its
types. Loop counters and accumulators live in entry-block allocas that LLVM's SROA pass promotes
to registers, so the builder never has to place phi nodes.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence

F32x16 = "<16 x float>"
BF16x32 = "<32 x bfloat>"
I32x16 = "<16 x i32>"
I16x32 = "<32 x i16>"
I8x64 = "<64 x i8>"


def vec_const(elem_type: str, values: Sequence[int | float]) -> str:
    """Constant vector literal, e.g. ``<16 x i32> <i32 0, ...>`` (without the type prefix)."""
    return _vec_const(elem_type, tuple(values))


@functools.lru_cache(maxsize=1024)
def _vec_const(elem_type: str, values: tuple[int | float, ...]) -> str:
    return "<" + ", ".join(f"{elem_type} {v}" for v in values) + ">"


PIPELINE_MARK = "; kt_jit pipeline: "  # a module line naming its optimisation pipeline
PART_MARK = "; kt_jit part: "  # the line that starts each further part of a module's text


def split_parts(ir_text: str) -> list[str]:
    """The IR texts of a rendered module's parts (:meth:`Module.part`), the main module first."""
    texts = ir_text.split("\n" + PART_MARK)
    # each further text starts with the rest of its mark line (the part's name)
    return [texts[0] + "\n"] + [t.partition("\n")[2] for t in texts[1:]] if len(texts) > 1 else texts


def shuffle_mask(indices: Sequence[int]) -> str:
    return f"<{len(indices)} x i32> " + vec_const("i32", indices)


class Module:
    """A module: declarations, globals and functions, rendered to one IR text."""

    def __init__(self, name: str, fn_attrs: str) -> None:
        self.name = name
        self.fn_attrs = fn_attrs  # body of "attributes #0 = { ... }"
        self._decls: dict[str, str] = {}
        self._globals: list[str] = []
        self._functions: list[Function] = []
        self._names: set[str] = set()
        self._parts: list[Module] = []
        self._root = self
        self.pipeline = "default"  # optimisation pipeline (codegen/compile.py), named in the text

    def declare(self, symbol: str, text: str) -> str:
        """Add ``declare ...`` once; return ``@symbol``."""
        self._decls.setdefault(symbol, text)
        return "@" + symbol

    def add_global(self, text: str) -> None:
        self._globals.append(text)

    def unique(self, base: str) -> str:
        name, i = base, 0
        while name in self._names:
            i += 1
            name = f"{base}.{i}"
        self._names.add(name)
        return name

    def function(self, name: str, args: Sequence[tuple[str, str]], ret: str = "void",
                 linkage: str = "") -> Function:
        fn = Function(self, name, args, ret, linkage)
        self._functions.append(fn)
        return fn

    def part(self, name: str) -> Module:
        """A further module, rendered after this one (each after a PART_MARK line; see
        :func:`split_parts`), compiled on its own (codegen/compile.py: on another core) and linked
        with it: code this module calls through a declared function. Its pipeline is this module's."""
        part = Module(name, self.fn_attrs)
        part._root = self._root
        self._root._parts.append(part)  # (a part's parts are the main module's)
        return part

    def render(self) -> str:
        text = self._render_one(self.pipeline)
        for part in self._parts:
            text += f"{PART_MARK}{part.name}\n{part._render_one(self.pipeline)}"
        return text

    def _render_one(self, pipeline: str) -> str:
        parts = [f"; ModuleID = '{self.name}'"]
        if pipeline != "default":
            parts.append(f"{PIPELINE_MARK}{pipeline}")
        parts += self._globals
        parts += [f.render() for f in self._functions]
        parts += list(self._decls.values())
        parts.append(f"attributes #0 = {{ {self.fn_attrs} }}")
        return "\n".join(parts) + "\n"


class Function:
    """One function under construction. ``val`` emits ``%tN = <rhs>`` and returns ``%tN``."""

    def __init__(self, module: Module, name: str, args: Sequence[tuple[str, str]], ret: str,
                 linkage: str) -> None:
        self.module = module
        self.name = name
        self.args = list(args)
        self.ret_type = ret
        self.linkage = linkage
        self._n = 0
        self._allocas: list[str] = []
        self._blocks: list[tuple[str, list[str]]] = [("entry", [])]
        self._cur = self._blocks[0][1]
        self._lines = {"entry": self._cur}  # label -> its lines
        self._label_count: dict[str, int] = {}  # base name -> suffixes handed out (new_block)

    # -- basic emission -------------------------------------------------------------------
    def tmp(self, prefix: str = "t") -> str:
        self._n += 1
        return f"%{prefix}{self._n}"

    def emit(self, line: str) -> None:
        self._cur.append("  " + line)

    def val(self, rhs: str, prefix: str = "t") -> str:
        # (tmp and emit written out: this runs once per instruction, ~12,000 times for the transposed GEMM)
        self._n += 1
        name = f"%{prefix}{self._n}"
        self._cur.append(f"  {name} = {rhs}")
        return name

    def new_block(self, base: str) -> str:
        i = self._label_count.get(base, 0)
        label = base if i == 0 else f"{base}{i}"
        while label in self._lines:  # a base ending in digits can meet another base's suffixed label
            i += 1
            label = f"{base}{i}"
        self._label_count[base] = i + 1
        self._lines[label] = []
        self._blocks.append((label, self._lines[label]))
        return label

    def set_block(self, label: str) -> None:
        self._cur = self._lines[label]

    def br(self, label: str) -> None:
        self.emit(f"br label %{label}")

    def cbr(self, cond: str, then: str, other: str) -> None:
        self.emit(f"br i1 {cond}, label %{then}, label %{other}")

    def ret(self, value: str | None = None) -> None:
        self.emit("ret void" if value is None else f"ret {self.ret_type} {value}")

    # -- memory -------------------------------------------------------------------------------
    def alloca(self, ty: str, align: int = 8, count: int = 1) -> str:
        name = self.tmp("a")
        extra = f", i64 {count}" if count != 1 else ""
        self._allocas.append(f"  {name} = alloca {ty}{extra}, align {align}")
        return name

    def gep(self, ptr: str, byte_offset: str | int) -> str:
        if byte_offset in (0, "0"):
            return ptr
        return self.val(f"getelementptr inbounds i8, ptr {ptr}, i64 {byte_offset}", "p")

    def gep_unseen(self, ptr: str, byte_offset: str | int) -> str:
        """``ptr + byte_offset`` through an integer round trip, which scalar evolution does not follow:
        loop strength reduction leaves the addresses based on it alone. Used where a loop body holds
        many addresses that x86 addressing modes cover anyway (base + index + displacement), so the
        pass only costs compile time; the generated code is the same or as fast (measured)."""
        at = self.val(f"add i64 {self.val(f'ptrtoint ptr {ptr} to i64')}, {byte_offset}")
        return self.val(f"inttoptr i64 {at} to ptr", "p")

    def load(self, ty: str, ptr: str, align: int = 1) -> str:
        return self.val(f"load {ty}, ptr {ptr}, align {align}")

    def store(self, ty: str, value: str, ptr: str, align: int = 1) -> None:
        self.emit(f"store {ty} {value}, ptr {ptr}, align {align}")

    def var(self, ty: str, init: str | None = None, align: int = 8) -> Var:
        v = Var(self, ty, self.alloca(ty, align), align)
        if init is not None:
            v.set(init)
        return v

    def call_in_part(self, name: str, operands: Sequence[tuple[str, str | None]], emit) -> None:
        """Call ``void name(...)`` here with ``operands`` ((type, value) pairs; None values are not
        passed); its body, ``emit(g, *values)`` (the values as g's parameters, None where they were
        None), goes into a further part of this module (:meth:`Module.part`: compiled on another core)."""
        passed = [(t, v) for t, v in operands if v is not None]
        g = self.module.part(name).function(name, [(t, f"%arg{i}") for i, (t, _) in enumerate(passed)])
        params = iter(g.args)
        emit(g, *(None if v is None else next(params)[1] for _, v in operands))
        g.ret()
        sym = self.module.declare(name, f"declare void @{name}({', '.join(t for t, _ in passed)}) #0")
        self.emit(f"call void {sym}({', '.join(f'{t} {v}' for t, v in passed)})")

    # -- integer helpers ----------------------------------------------------------------------
    def add(self, a: str | int, b: str | int) -> str:
        return self.val(f"add i64 {a}, {b}")

    def mul(self, a: str | int, b: str | int) -> str:
        return self.val(f"mul i64 {a}, {b}")

    def sub(self, a: str | int, b: str | int) -> str:
        return self.val(f"sub i64 {a}, {b}")

    def icmp(self, pred: str, a: str | int, b: str | int) -> str:
        return self.val(f"icmp {pred} i64 {a}, {b}")

    def min(self, a: str | int, b: str | int) -> str:
        c = self.icmp("slt", a, b)
        return self.val(f"select i1 {c}, i64 {a}, i64 {b}")

    # -- structured control flow --------------------------------------------------------------
    @contextlib.contextmanager
    def loop(self, lo: str | int, hi: str | int, step: str | int = 1, name: str = "i") -> Iterator[str]:
        """``for (i = lo; i < hi; i += step)`` with a signed i64 counter (``step`` > 0, a constant or a
        run-time value); yields ``i``."""
        iv = self.var("i64", str(lo))
        head, body, done = self.new_block(f"{name}.head"), self.new_block(f"{name}.body"), \
            self.new_block(f"{name}.done")
        self.br(head)
        self.set_block(head)
        i = iv.get()
        self.cbr(self.icmp("slt", i, hi), body, done)
        self.set_block(body)
        yield i
        iv.set(self.add(i, step))
        self.br(head)
        self.set_block(done)

    @contextlib.contextmanager
    def if_then(self, cond: str, name: str = "if") -> Iterator[None]:
        then, done = self.new_block(f"{name}.then"), self.new_block(f"{name}.end")
        self.cbr(cond, then, done)
        self.set_block(then)
        yield
        self.br(done)
        self.set_block(done)

    def switch(self, value: str, cases: Sequence[int], name: str = "sw") -> Iterator[int]:
        """Emit ``switch i64 value``; yields each case constant with the builder inside its block."""
        done = self.new_block(f"{name}.end")
        labels = [self.new_block(f"{name}.c{c}") for c in cases]
        arms = " ".join(f"i64 {c}, label %{lab}" for c, lab in zip(cases, labels, strict=True))
        self.emit(f"switch i64 {value}, label %{done} [ {arms} ]")
        for c, lab in zip(cases, labels, strict=True):
            self.set_block(lab)
            yield c
            self.br(done)
        self.set_block(done)

    # -- rendering ----------------------------------------------------------------------------
    def render(self) -> str:
        args = ", ".join(f"{t} {n}" for t, n in self.args)
        link = f"{self.linkage} " if self.linkage else ""
        out = [f"define {link}{self.ret_type} @{self.name}({args}) #0 {{"]
        for i, (label, lines) in enumerate(self._blocks):
            out.append(f"{label}:")
            if i == 0:
                out += self._allocas
            out += lines
        out.append("}")
        return "\n".join(out)


class Var:
    """A mutable local (an alloca that SROA turns into SSA registers)."""

    def __init__(self, fn: Function, ty: str, ptr: str, align: int) -> None:
        self.fn, self.ty, self.ptr, self.align = fn, ty, ptr, align

    def get(self) -> str:
        return self.fn.load(self.ty, self.ptr, self.align)

    def set(self, value: str) -> None:
        self.fn.store(self.ty, value, self.ptr, self.align)

"""A small lock-step simulator of the PTX that ``mma_gemv`` emits, for CPU tests of its decoders and mma
fragment mapping (the instructions it uses and nothing more).

32 lanes run the straight-line PTX together; registers hold 32-bit patterns (``.b16`` ones 16); ``mma``
gathers the fragments of all lanes as the PTX ISA lays them out for m16n8k16 and computes in float64.
"""

from __future__ import annotations

import re

import numpy as np
import torch


def _f32(bits: int) -> float:
    return float(np.array([bits & 0xFFFFFFFF], dtype=np.uint32).view(np.float32)[0])


def _bits32(value: float) -> int:
    return int(np.array([value], dtype=np.float32).view(np.uint32)[0])


def _bf16_to_f(h: int) -> float:
    return _f32((h & 0xFFFF) << 16)


def _f_to_bf16(value: float) -> int:
    b = _bits32(value)
    return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) & 0xFFFF  # round to nearest even


def _f16_to_f(h: int) -> float:
    return float(np.array([h & 0xFFFF], dtype=np.uint16).view(np.float16)[0])


def _f_to_f16(value: float) -> int:
    return int(np.array([value], dtype=np.float16).view(np.uint16)[0])


def _e4m3_to_f16(byte: int) -> int:
    v = torch.tensor([byte & 0xFF], dtype=torch.uint8).view(torch.float8_e4m3fn).float().item()
    return _f_to_f16(v)


def _f_to_e4m3(value: float) -> int:
    """Round to e4m3 (nearest even), saturating at +-448."""
    v = torch.tensor([max(-448.0, min(448.0, value))], dtype=torch.float32)
    return int(v.to(torch.float8_e4m3fn).view(torch.uint8).item())


def _prmt(a: int, b: int, sel: int) -> int:
    pool = [(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF for i in range(4)]
    out = 0
    for k in range(4):
        nib = (sel >> (4 * k)) & 0xF
        byte = pool[nib & 7]
        if nib & 8:  # sign replicate
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * k)
    return out


def _lop3(a: int, b: int, c: int, lut: int) -> int:
    out = 0
    for bit in range(32):
        idx = (((a >> bit) & 1) << 2) | (((b >> bit) & 1) << 1) | ((c >> bit) & 1)
        # lut index: a is 0xF0, b 0xCC, c 0xAA
        out |= ((lut >> idx) & 1) << bit
    return out


def _imm(tok: str) -> int | None:
    tok = tok.strip()
    if re.fullmatch(r"0f[0-9A-Fa-f]{8}", tok):
        return int(tok[2:], 16)
    if re.fullmatch(r"-?0x[0-9A-Fa-f]+|-?\d+", tok):
        return int(tok, 0) & 0xFFFFFFFF
    return None


class Lanes:
    """Registers of 32 lanes; ``operands[lane][n]`` is the value of ``$n`` (ints; 64-bit addresses)."""

    def __init__(self, operands: list[list[int]], memory: dict[int, int]) -> None:
        self.regs = [{f"${i}": v for i, v in enumerate(ops)} for ops in operands]
        self.memory = memory  # byte address -> byte

    def get(self, lane: int, tok: str) -> int:
        imm = _imm(tok)
        return imm if imm is not None else self.regs[lane][tok.strip()]

    def set(self, lane: int, name: str, value: int) -> None:
        self.regs[lane][name.strip()] = value & 0xFFFFFFFF

    def _address(self, lane: int, operand: str) -> int:
        """The byte address of a memory operand ``[reg]`` or ``[reg+offset]``."""
        m = re.fullmatch(r"\[(\$\d+|[a-z0-9]+)(?:\+(\d+))?\]", operand)
        return self.regs[lane][m.group(1)] + int(m.group(2) or 0)

    def load32(self, addr: int) -> int:
        return sum(self.memory.get(addr + i, 0) << (8 * i) for i in range(4))

    def run(self, asm: str) -> None:
        for raw in asm.splitlines():
            line = raw.strip().rstrip(";")
            if not line or line in "{}" or line.startswith(".reg"):
                continue
            self.step(line)

    def step(self, line: str) -> None:
        pred = None
        if line.startswith("@"):
            pred, line = line[1:].split(None, 1)
        op, _, rest = line.partition(" ")
        if op.startswith("mma.sync"):
            self._mma(op, rest)
            return
        args = [a.strip() for a in re.split(r",(?![^{]*})", rest)]
        for lane in range(32):
            if pred is not None and not self.regs[lane][pred]:
                continue
            self._lane(lane, op, args)

    def _lane(self, lane: int, op: str, args: list[str]) -> None:
        g = lambda i: self.get(lane, args[i])  # noqa: E731
        d = args[0]
        if op in ("mov.b32", "mov.f32", "mov.u32"):
            if d.startswith("{"):  # split into 16-bit halves
                lo, hi = (s.strip() for s in d.strip("{}").split(","))
                v = g(1)
                self.set(lane, lo, v & 0xFFFF)
                self.set(lane, hi, v >> 16)
            else:
                self.set(lane, d, g(1))
        elif op == "shr.u32":
            self.set(lane, d, g(1) >> g(2))
        elif op == "shl.b32":
            self.set(lane, d, g(1) << g(2))
        elif op == "and.b32":
            self.set(lane, d, g(1) & g(2))
        elif op == "xor.b32":
            self.set(lane, d, g(1) ^ g(2))
        elif op == "prmt.b32":
            self.set(lane, d, _prmt(g(1), g(2), g(3)))
        elif op == "lop3.b32":
            self.set(lane, d, _lop3(g(1), g(2), g(3), g(4)))
        elif op == "setp.ne.b32":
            self.regs[lane][d] = g(1) != g(2)
        elif op == "fma.rn.bf16x2":
            a, b, c = g(1), g(2), g(3)
            halves = [
                _f_to_bf16(_bf16_to_f(a >> s) * _bf16_to_f(b >> s) + _bf16_to_f(c >> s)) for s in (0, 16)
            ]
            self.set(lane, d, halves[0] | (halves[1] << 16))
        elif op == "add.rn.f16x2":
            a, b = g(1), g(2)
            halves = [_f_to_f16(_f16_to_f(a >> s) + _f16_to_f(b >> s)) for s in (0, 16)]
            self.set(lane, d, halves[0] | (halves[1] << 16))
        elif op == "mul.f32":
            self.set(lane, d, _bits32(_f32(g(1)) * _f32(g(2))))
        elif op == "max.f32":
            self.set(lane, d, _bits32(max(_f32(g(1)), _f32(g(2)))))
        elif op == "min.f32":
            self.set(lane, d, _bits32(min(_f32(g(1)), _f32(g(2)))))
        elif op == "abs.f32":
            self.set(lane, d, g(1) & 0x7FFFFFFF)
        elif op == "cvt.rni.f32.f32":
            self.set(lane, d, _bits32(float(np.rint(np.float32(_f32(g(1)))))))
        elif op == "setp.ge.f32":
            self.regs[lane][d] = _f32(g(1)) >= _f32(g(2))
        elif op == "selp.f32":
            self.set(lane, d, g(1) if self.regs[lane][args[3]] else g(2))
        elif op == "cvt.rn.satfinite.e4m3x2.f32":  # d.hi = a, d.lo = b
            self.set(lane, d, _f_to_e4m3(_f32(g(2))) | (_f_to_e4m3(_f32(g(1))) << 8))
        elif op == "sub.f32":
            self.set(lane, d, _bits32(_f32(g(1)) - _f32(g(2))))
        elif op == "cvt.rn.bf16x2.f32":  # d.hi = a, d.lo = b
            self.set(lane, d, _f_to_bf16(_f32(g(2))) | (_f_to_bf16(_f32(g(1))) << 16))
        elif op == "cvt.rn.f16x2.f32":
            self.set(lane, d, _f_to_f16(_f32(g(2))) | (_f_to_f16(_f32(g(1))) << 16))
        elif op == "cvt.f32.f16":
            self.set(lane, d, _bits32(_f16_to_f(g(1))))
        elif op == "cvt.rn.f16x2.e4m3x2":
            v = g(1)
            self.set(lane, d, _e4m3_to_f16(v) | (_e4m3_to_f16(v >> 8) << 16))
        elif op == "mad.lo.u32":
            self.set(lane, d, g(1) * g(2) + g(3))
        elif op.startswith(("ld.global", "ld.shared")):
            addr = self._address(lane, args[1])
            dsts = [s.strip() for s in d.strip("{}").split(",")]
            for i, name in enumerate(dsts):
                self.set(lane, name, self.load32(addr + 4 * i))
        elif op.startswith("st.shared"):
            addr = self._address(lane, args[0])
            for i, src in enumerate(s.strip() for s in args[1].strip("{}").split(",")):
                value = self.get(lane, src)
                for byte in range(4):
                    self.memory[addr + 4 * i + byte] = (value >> (8 * byte)) & 0xFF
        else:
            raise NotImplementedError(op)

    def _mma(self, op: str, rest: str) -> None:
        groups = re.findall(r"\{([^}]*)\}", rest)
        dn, an, bn, cn = ([s.strip() for s in grp.split(",")] for grp in groups)
        half = _bf16_to_f if ".bf16.bf16." in op else _f16_to_f
        a = np.zeros((16, 16))
        b = np.zeros((16, 8))
        c = np.zeros((16, 8))
        for lane in range(32):
            gid, t = lane // 4, lane % 4
            r = [self.regs[lane][n] for n in an]
            for k, (row, col) in enumerate(
                ((gid, 2 * t), (gid + 8, 2 * t), (gid, 2 * t + 8), (gid + 8, 2 * t + 8))
            ):
                a[row, col] = half(r[k])
                a[row, col + 1] = half(r[k] >> 16)
            rb = [self.regs[lane][n] for n in bn]
            for k, krow in enumerate((2 * t, 2 * t + 8)):
                b[krow, gid] = half(rb[k])
                b[krow + 1, gid] = half(rb[k] >> 16)
            rc = [_f32(self.regs[lane][n]) for n in cn]
            c[gid, 2 * t], c[gid, 2 * t + 1], c[gid + 8, 2 * t], c[gid + 8, 2 * t + 1] = rc
        out = a @ b + c
        for lane in range(32):
            gid, t = lane // 4, lane % 4
            vals = (out[gid, 2 * t], out[gid, 2 * t + 1], out[gid + 8, 2 * t], out[gid + 8, 2 * t + 1])
            for name, v in zip(dn, vals, strict=True):
                self.set(lane, name, _bits32(v))

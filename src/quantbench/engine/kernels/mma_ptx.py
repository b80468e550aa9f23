"""PTX text of ``mma_gemv``'s inline assembly (no Triton import: ``tests/test_mma_asm.py`` runs it on
the CPU through a PTX simulator).

Operands of the step (``step_asm``): $0..$7 the step's fp32 results (token blocks 0 / 1, c0..c3 each);
$8..$11 the lane's code words of row g, $12..$15 of row g + 8; $16 / $17 the activation addresses of
token blocks 0 / 1 and $18 / $19 their load flags; $20 / $21 the zero operands of rows g / g + 8;
$22..$29 the 16-bit table's byte planes (NF4 / FP4); $48 the lane's copy of the shared-memory pair
table (``lut_copies``).
"""

from __future__ import annotations

import torch

# decoder kinds
D_INT4 = 0
D_TABLE = 1
D_INT8_F32 = 2  # int8 codes through fp32 into bf16 pairs
D_INT8_F16 = 3
D_FP8 = 4
D_PLAIN = 5  # plain 16-bit weights of the compute dtype: the code words are the mma's A registers as they are

_MMA = {
    "bf16": "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32",
    "f16": "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32",
}

# operand numbers of the step asm
_OUT = 8  # $0..$7: d of token blocks 0 / 1 (c0..c3 each)
_WG = 8  # $8..$11: words of row g; $12..$15: row g + 8
_WH = 12
_XA = 16  # $16, $17: activation addresses (int64) of token blocks 0 / 1
_XV = 18  # $18, $19: their load flags
_ZG = 20  # $20, $21: zero constants of rows g / g + 8
_ZH = 21
_TP = 22  # $22..$29: table byte planes
_XINV = 30  # $30: the activation quantization's 1 / scale (fp32 bits; token 0 only)
_XTHR = 31  # $31: LLM.int8's outlier threshold (fp32 bits)
_XIN = 32  # $32..$47: the step's activation words when loaded by the caller (``x_regs``)
X_REGS = 16  # activation words per lane per step of a 4-bit format (words = 4, one token block)
_LUT = 48  # $48: the lane's copy of the shared pair table

# what the step does to the loaded activation pairs (bf16 in memory)
X_KEEP = 0
X_F16 = 1  # to fp16 (e4m3-valued activations: exact)
X_FP8 = 2  # quantize: e4m3(x / scale) (saturating), as fp16
X_INT8 = 3  # quantize: round(x / scale) clamped to +-127 (SmoothQuant), as bf16
X_LLM = 4  # LLM.int8: round(x * 127 / amax) clamped, outlier columns (|x| >= threshold) keep x * 127 / amax


def _decode(kind: int, word: str, pre: str, zero: str, dt: str, lut_copies: int = 0) -> list[str]:
    """PTX lines decoding register ``word`` into pairs ``{pre}0..`` (column order, low half first)."""
    if kind == D_TABLE and lut_copies:
        # byte i of the word is a code pair: its 16-bit pair is entry (byte, copy) of the shared table
        lines = []
        for i in range(4):
            lines += [
                f"prmt.b32 y, {word}, 0, {hex(0x4440 | i)};",
                f"mad.lo.u32 y, y, {4 * lut_copies}, ${_LUT};",
                f"ld.shared.b32 {pre}{i}, [y];",
            ]
        return lines
    if kind == D_INT4:
        lines = [f"shr.u32 s4, {word}, 4;"]
        for i in range(4):
            fix = (
                f"fma.rn.bf16x2 {pre}{i}, y, kone, {zero};"
                if dt == "bf16"
                else f"add.rn.f16x2 {pre}{i}, y, {zero};"
            )
            lines += [
                f"prmt.b32 y, {word}, s4, {hex(((4 + i) << 8) | i)};",
                "lop3.b32 y, y, kmask, kmag, 0xEA;",
                fix,
            ]
        return lines
    if kind == D_TABLE:
        body = []
        for half, (src, sel) in enumerate((("sa", "0x1100"), ("sb", "0x3322"))):
            p0, p1 = f"{pre}{2 * half}", f"{pre}{2 * half + 1}"
            body += [
                f"prmt.b32 ya, {word}, 0, {sel};",
                "shl.b32 tt, ya, 4;",
                "lop3.b32 mm, tt, ya, kff, 0xE4;",
                "prmt.b32 ma, mm, 0, 0xBA98;",
                f"prmt.b32 a0, $22, $23, {src};",
                f"prmt.b32 a1, $24, $25, {src};",
                "lop3.b32 lo, a0, a1, ma, 0xD8;",
                f"prmt.b32 a0, $26, $27, {src};",
                f"prmt.b32 a1, $28, $29, {src};",
                "lop3.b32 hi, a0, a1, ma, 0xD8;",
                # bnb order: byte b = (column 2b) << 4 | column 2b + 1; lo/hi byte k follows nibble k
                f"prmt.b32 {p0}, lo, hi, 0x4051;",
                f"prmt.b32 {p1}, lo, hi, 0x6273;",
            ]
        return [
            f"and.b32 sa, {word}, 0x7777;",
            f"shr.u32 sb, {word}, 16;",
            "and.b32 sb, sb, 0x7777;",
            *body,
        ]
    if kind == D_INT8_F32:
        lines = []
        for i in range(4):
            lines += [f"prmt.b32 f{i}, {word}, kmag, {hex(0x7650 | i)};", f"sub.f32 f{i}, f{i}, {zero};"]
        return lines + [f"cvt.rn.bf16x2.f32 {pre}0, f1, f0;", f"cvt.rn.bf16x2.f32 {pre}1, f3, f2;"]
    if kind == D_INT8_F16:
        return [
            f"prmt.b32 {pre}0, {word}, kmag, 0x4140;",
            f"prmt.b32 {pre}1, {word}, kmag, 0x4342;",
            f"add.rn.f16x2 {pre}0, {pre}0, {zero};",
            f"add.rn.f16x2 {pre}1, {pre}1, {zero};",
        ]
    return [  # e4m3
        f"mov.b32 {{e0, e1}}, {word};",
        f"cvt.rn.f16x2.e4m3x2 {pre}0, e0;",
        f"cvt.rn.f16x2.e4m3x2 {pre}1, e1;",
    ]


def _x_convert(reg: str, mode: int, dt: str) -> list[str]:
    """PTX turning the activation pair in ``reg`` (compute dtype ``dt``) into the mma's B operand
    (``X_*`` modes). The quantizing modes multiply by the reciprocal scale ($30) where the torch
    reference divides; the int8 ones give pairs of ``dt`` (the mma of the int8 decoders)."""
    if dt == "bf16":
        lines = [
            f"shl.b32 cl, {reg}, 16;",
            f"and.b32 ch, {reg}, 0xFFFF0000;",
            "mov.b32 fl, cl;",
            "mov.b32 fh, ch;",
        ]
    else:
        lines = [f"mov.b32 {{e0, e1}}, {reg};", "cvt.f32.f16 fl, e0;", "cvt.f32.f16 fh, e1;"]
    if mode == X_F16:
        return lines + [f"cvt.rn.f16x2.f32 {reg}, fh, fl;"]
    lines += ["mul.f32 sl, fl, finv;", "mul.f32 sh, fh, finv;"]
    if mode == X_FP8:
        return lines + ["cvt.rn.satfinite.e4m3x2.f32 e0, sh, sl;", f"cvt.rn.f16x2.e4m3x2 {reg}, e0;"]
    for half in ("l", "h"):
        lines += [
            f"cvt.rni.f32.f32 r{half}, s{half};",
            f"max.f32 r{half}, r{half}, 0fC2FE0000;",  # -127
            f"min.f32 r{half}, r{half}, 0f42FE0000;",  # 127
        ]
        if mode == X_LLM:
            lines += [f"abs.f32 a{half}, f{half};", f"setp.ge.f32 o{half}, a{half}, fthr;"]
            lines.append(f"selp.f32 r{half}, s{half}, r{half}, o{half};")
    return lines + [f"cvt.rn.{dt}x2.f32 {reg}, rh, rl;"]


def step_asm(
    kind: int,
    bits: int,
    words: int,
    blocks: int,
    dt: str,
    x_mode: int,
    signed8: bool,
    x_regs: bool = False,
    lut_copies: int = 0,
    subs: int = 1,
    lut_permute: int = 0,
) -> str:
    """PTX of one warp step: load the activations (and convert or quantize them, ``x_mode``), decode
    ``words`` code words of rows g and g + 8 and run the mmas of ``blocks`` token blocks; writes the
    step's fp32 results to $0..$7. ``x_regs`` (one token block): the activation words arrive in
    $32.. (loaded by ``x_load_asm`` an iteration earlier) instead of being loaded here.

    ``subs`` = 2 (one token block): the step is two consecutive sub-steps of ``words / 2`` words each
    (two quantization groups); sub-step u's activations lie ``sub_x_bytes`` further on and its
    results go to $4u..$4u + 3, to be scaled apart. ``lut_permute``: that many of the step's code words
    (last words first, row g + 8 before row g) take the byte-permute decoder (ALU) instead of the shared
    table (the L1 data pipe), to balance the two."""
    vals = 32 // bits
    xregs = words * vals // 2  # 32-bit activation pairs per token block
    if x_regs and (blocks != 1 or xregs > X_REGS):
        raise ValueError("x_regs takes one token block of at most X_REGS words")
    if subs not in (1, 2) or (subs == 2 and (blocks != 1 or words % 2)):
        raise ValueError("two sub-steps take one token block and an even number of words")
    sub_x = sub_x_bytes(words // subs, bits)
    lines = [
        "{",
        ".reg .b32 s4, y, sa, sb, ya, tt, mm, ma, a0, a1, lo, hi, kmask, kmag, kone, kff, w, v, cl, ch;",
        ".reg .b32 pg<4>, ph<4>, x<32>;",
        ".reg .b16 e0, e1;",
        ".reg .f32 f<4>, zg, zh, fl, fh, sl, sh, rl, rh, al, ah, finv, fthr;",
        ".reg .pred q0, q1, ol, oh;",
        f"mov.b32 finv, ${_XINV};",
        f"mov.b32 fthr, ${_XTHR};",
        "mov.b32 kmask, 0x000F000F;",
        "mov.b32 kone, 0x3F803F80;",
        "mov.b32 kff, 0x00FF00FF;",
    ]
    if kind == D_INT4:
        lines.append(f"mov.b32 kmag, {'0x43004300' if dt == 'bf16' else '0x64006400'};")
    elif kind == D_INT8_F32:
        lines += ["mov.b32 kmag, 0x4B000000;", f"mov.b32 zg, ${_ZG};", f"mov.b32 zh, ${_ZH};"]
    elif kind == D_INT8_F16:
        lines.append("mov.b32 kmag, 0x64646464;")
    for r in range(_OUT):
        lines.append(f"mov.f32 ${r}, 0f00000000;")
    # activations of each token block: zero unless the block's token exists
    for b in range(blocks):
        if x_regs:
            lines += [f"mov.b32 x{r}, ${_XIN + r};" for r in range(xregs)]
        else:
            lines.append(f"setp.ne.b32 q{b}, ${_XV + b}, 0;")
            for r in range(xregs):
                lines.append(f"mov.b32 x{b * xregs + r}, 0;")
            regs = [f"x{b * xregs + r}" for r in range(xregs)]
            lines += _activation_loads(regs, f"q{b}", f"${_XA + b}", subs, sub_x)
        if x_mode != X_KEEP:
            for r in range(xregs):
                lines += _x_convert(f"x{b * xregs + r}", x_mode, dt)
    mma = _MMA["f16" if kind == D_FP8 else dt]
    if kind == D_PLAIN:  # word j of a row is one column pair: two words of rows g and g + 8 make one A
        if words % 2 or subs != 1:
            raise ValueError("16-bit weights take an even number of words per lane and one group per step")
        for j in range(0, words, 2):
            a = f"{{${_WG + j}, ${_WH + j}, ${_WG + j + 1}, ${_WH + j + 1}}}"
            for b in range(blocks):
                d = ", ".join(f"${4 * b + i}" for i in range(4))
                base = b * xregs + j
                lines.append(f"{mma} {{{d}}}, {a}, {{x{base}, x{base + 1}}}, {{{d}}};")
        lines.append("}")
        return "\n".join(lines)
    zero_g, zero_h = ("zg", "zh") if kind == D_INT8_F32 else (f"${_ZG}", f"${_ZH}")
    permuted = [(j, row) for j in reversed(range(words)) for row in ("h", "g")][:lut_permute]
    for j in range(words):
        for row, pre, zero in (("g", "pg", zero_g), ("h", "ph", zero_h)):
            src = f"${(_WG if row == 'g' else _WH) + j}"
            if signed8:  # two's complement -> offset binary (zero 128)
                lines.append(f"xor.b32 w, {src}, 0x80808080;")
                src = "w"
            lines += _decode(kind, src, pre, zero, dt, 0 if (j, row) in permuted else lut_copies)
        halves = 2 if bits == 4 else 1
        for h in range(halves):
            a = f"{{pg{2 * h}, ph{2 * h}, pg{2 * h + 1}, ph{2 * h + 1}}}"
            for b in range(blocks):
                base = b * xregs + (4 * j + 2 * h if bits == 4 else 2 * j)
                out = b if subs == 1 else j * subs // words  # token block, or sub-step
                d = ", ".join(f"${4 * out + i}" for i in range(4))
                lines.append(f"{mma} {{{d}}}, {a}, {{x{base}, x{base + 1}}}, {{{d}}};")
    lines.append("}")
    return "\n".join(lines)


def _vector(regs: list[str]) -> tuple[str, str]:
    """The vector suffix and destination operand of one load into 1, 2 or 4 consecutive registers."""
    vec = {4: ".v4", 2: ".v2", 1: ""}[len(regs)]
    return vec, f"{{{', '.join(regs)}}}" if len(regs) > 1 else regs[0]


def _activation_loads(regs: list[str], pred: str, addr: str, subs: int, sub_x: int) -> list[str]:
    """Predicated vector loads of activation words into ``regs`` (column order): ``len(regs) / subs``
    consecutive words per sub-step, the sub-steps ``sub_x`` bytes apart from ``addr``."""
    per_sub = len(regs) // subs
    lines = []
    for u in range(subs):
        for c in range(0, per_sub, 4):
            vec, dst = _vector(regs[u * per_sub + c : u * per_sub + min(c + 4, per_sub)])
            lines.append(f"@{pred} ld.global{vec}.b32 {dst}, [{addr}+{u * sub_x + 4 * c}];")
    return lines


def sub_x_bytes(sub_words: int, bits: int) -> int:
    """Bytes of 16-bit activations between two sub-steps of ``sub_words`` words per lane (4 lanes)."""
    return 4 * sub_words * (32 // bits) * 2


def x_load_asm(xregs: int, subs: int = 1, sub_x: int = 0) -> str:
    """PTX loading ``xregs`` activation words at address $16 (flag $17) into $0..; every output of the
    ``X_REGS`` is zero where not loaded. ``subs`` = 2: the second half at ``sub_x`` bytes further on."""
    lines = ["{", ".reg .pred q;", f"setp.ne.b32 q, ${X_REGS + 1}, 0;"]
    lines += [f"mov.b32 ${r}, 0;" for r in range(X_REGS)]
    lines += _activation_loads([f"${r}" for r in range(xregs)], "q", f"${X_REGS}", subs, sub_x)
    lines.append("}")
    return "\n".join(lines)


def load_asm(words: int, subs: int = 1, sub_bytes: int = 0) -> str:
    """PTX loading ``words`` consecutive code words at each of two addresses ($16, $17; flags $18, $19)
    into $0..$3 (row g) and $4..$7 (row g + 8); zeros where the flag is 0. The codes are read once: no L1
    allocation. ``subs`` = 2: ``words / 2`` words at each address and as many ``sub_bytes`` further on."""
    per = words // subs
    lines = ["{", ".reg .pred q0, q1;", "setp.ne.b32 q0, $10, 0;", "setp.ne.b32 q1, $11, 0;"]
    for r in range(8):
        lines.append(f"mov.b32 ${r}, 0;")
    for half, addr, flag in ((0, "$8", "q0"), (4, "$9", "q1")):
        for u in range(subs):
            vec, dst = _vector([f"${half + u * per + i}" for i in range(per)])
            at = f"{addr}+{u * sub_bytes}" if u else addr
            lines.append(f"@{flag} ld.global.nc.L1::no_allocate{vec}.b32 {dst}, [{at}];")
    lines.append("}")
    return "\n".join(lines)


_PLANES: dict[tuple, list[int]] = {}
_PAIRS: dict[tuple, list[int]] = {}


def _table_bits(table: torch.Tensor, dtype: torch.dtype) -> list[int]:
    """The 16 table values rounded to ``dtype``, as 16-bit patterns."""
    return [int(v) & 0xFFFF for v in table.float().cpu().to(dtype).view(torch.int16).tolist()]


def lut_alloc_asm(copies: int) -> str:
    """PTX declaring the kernel's shared pair table (``copies`` copies of 256 words, entry ``(byte, copy)``
    at word ``byte * copies + copy``: lane l reads copy ``l % copies``, so lanes of different copies never
    share a bank) and writing its address to $0. Function scope: the kernel must use it once."""
    return f".shared .align 16 .b8 qb_pair_lut[{1024 * copies}];\nmov.u32 $0, qb_pair_lut;"


def lut_store_asm(copies: int) -> str:
    """PTX storing word $1 as every copy of one table entry, at shared address $2 ($0: a dummy output)."""
    stores = [f"st.shared.v4.b32 [$2+{16 * i}], {{$1, $1, $1, $1}};" for i in range(copies // 4)]
    return "\n".join([*stores, "mov.b32 $0, 0;"])


def lut_pairs(table: torch.Tensor, dtype: torch.dtype) -> list[int]:
    """The 256 code-pair entries: for byte ``b`` (first code in the high nibble, as bitsandbytes packs),
    the table values of ``b >> 4`` (low half) and ``b & 15`` (high half) in ``dtype``, as int32."""
    key = (table.data_ptr(), dtype)
    if key not in _PAIRS:
        bits = _table_bits(table, dtype)
        words = [bits[b >> 4] | (bits[b & 15] << 16) for b in range(256)]
        _PAIRS[key] = [w - (1 << 32) if w >= 1 << 31 else w for w in words]
    return _PAIRS[key]


def table_planes(table: torch.Tensor, dtype: torch.dtype) -> list[int]:
    """The 16 table values in ``dtype`` as 8 byte planes (low / high byte of entries 0-3, 4-7, ...)."""
    key = (table.data_ptr(), dtype)
    if key not in _PLANES:
        bits = _table_bits(table, dtype)
        planes = []
        for shift in (0, 8):
            for first in (0, 4, 8, 12):
                word = 0
                for b in range(4):
                    word |= ((bits[first + b] >> shift) & 0xFF) << (8 * b)
                planes.append(word - (1 << 32) if word >= 1 << 31 else word)
        _PLANES[key] = planes
    return _PLANES[key]

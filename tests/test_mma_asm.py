"""The PTX of ``mma_gemv`` (decoders, activation loads, mma fragment mapping) run on the CPU by a lock-step
simulator (``ptx_sim``) against a float64 product of the decoded codes: exact, since every product
of a small integer / table value and a 16-bit activation is exact in fp32 and the simulator sums in
float64 (tolerance 1e-6 relative for the fp32 rounding of the sums)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ptx_sim import Lanes
from quantbench.engine.kernels import mma_ptx as mg
from quantbench.quant import bnb4

X_BASE = 1 << 20


def _half_bits(values: np.ndarray, dt: str) -> np.ndarray:
    t = torch.tensor(values, dtype=torch.float32).to(torch.bfloat16 if dt == "bf16" else torch.float16)
    return t.view(torch.int16).numpy().astype(np.int64) & 0xFFFF


def _pack_words(codes: np.ndarray, bits: int, high_first: bool) -> np.ndarray:
    """[rows, cols] codes -> [rows, cols * bits / 32] uint32 words (column c in slot c of its word)."""
    vals = 32 // bits
    rows, cols = codes.shape
    words = np.zeros((rows, cols // vals), dtype=np.int64)
    for s in range(vals):
        c = codes[:, s::vals].astype(np.int64)
        if bits == 4 and high_first:
            shift = (s // 2) * 8 + (1 - s % 2) * 4
        else:
            shift = s * bits
        words |= c << shift
    return words


def _zero_operand(kind: int, z: float, dt: str) -> int:
    if kind == mg.D_INT8_F32:
        return int(np.array([z + 8388608.0], dtype=np.float32).view(np.uint32)[0])
    if kind == mg.D_INT4 and dt == "bf16":
        h = int(_half_bits(np.array([-(128.0 + z)]), "bf16")[0])
    else:
        h = int(_half_bits(np.array([-(1024.0 + z)]), "f16")[0])
    return h | (h << 16)


def _f32_bits(value: float) -> int:
    return int(np.array([value], dtype=np.float32).view(np.uint32)[0])


def _run_step(asm: str, packed: np.ndarray, words: int, vals: int, row_bytes: int, tokens: int, memory: dict,
              zero_word: int, planes: list[int], inv: float = 1.0, thr: float = 0.0,
              x_words: list | None = None, lut: tuple[int, int] | None = None,
              lane_cols: int | None = None) -> Lanes:  # fmt: skip
    """Run one step's PTX with the operands the kernel passes lane (g, t): its words of rows g and g + 8,
    the addresses of its activation columns for tokens g and g + 8 (loaded if below ``tokens``)."""
    operands = []
    for lane in range(32):
        g, t = lane // 4, lane % 4
        ops = [0] * (32 + mg.X_REGS)
        if x_words is not None:
            ops[mg._XIN : mg._XIN + mg.X_REGS] = x_words[lane]
        for j in range(words):
            ops[mg._WG + j] = int(packed[g, t * words + j])
            ops[mg._WH + j] = int(packed[g + 8, t * words + j])
        col = t * (words * vals if lane_cols is None else lane_cols)
        ops[mg._XA] = X_BASE + g * row_bytes + col * 2
        ops[mg._XA + 1] = X_BASE + (g + 8) * row_bytes + col * 2
        ops[mg._XV] = int(g < tokens)
        ops[mg._XV + 1] = int(g + 8 < tokens)
        ops[mg._ZG] = ops[mg._ZH] = zero_word
        for i, p in enumerate(planes):
            ops[mg._TP + i] = p & 0xFFFFFFFF
        if lut is not None:  # (table address, copies): the lane's copy
            ops.append(lut[0] + (lane % lut[1]) * 4)
        ops[mg._XINV] = _f32_bits(inv)
        ops[mg._XTHR] = _f32_bits(thr)
        operands.append(ops)
    lanes = Lanes(operands, memory)
    lanes.run(asm)
    return lanes


def _check_product(lanes: Lanes, blocks: int, tokens: int, want: np.ndarray) -> None:
    """The step's fp32 results ($0..$7: lane (g, t) holds rows g / g + 8, tokens 2t, 2t + 1 of each token
    block) against ``want [16 rows, tokens]``; columns of tokens that do not exist stay zero."""
    got = np.zeros((16, 16))
    for lane in range(32):
        g, t = lane // 4, lane % 4
        out = [np.array([lanes.regs[lane][f"${i}"]], dtype=np.uint32).view(np.float32)[0] for i in range(8)]
        for b in range(blocks):
            got[g, 8 * b + 2 * t], got[g, 8 * b + 2 * t + 1] = out[4 * b], out[4 * b + 1]
            got[g + 8, 8 * b + 2 * t], got[g + 8, 8 * b + 2 * t + 1] = out[4 * b + 2], out[4 * b + 3]
    np.testing.assert_allclose(got[:, :tokens], want, rtol=1e-6, atol=1e-6 * np.abs(want).max())
    assert not got[:, tokens:].any()


CASES = [
    # (name, kind, bits, dtype, signed8)
    ("int4-bf16", mg.D_INT4, 4, "bf16", False),
    ("int4-f16", mg.D_INT4, 4, "f16", False),
    ("nf4-bf16", mg.D_TABLE, 4, "bf16", False),
    ("fp4-f16", mg.D_TABLE, 4, "f16", False),
    ("int8-bf16", mg.D_INT8_F32, 8, "bf16", False),
    ("int8s-bf16", mg.D_INT8_F32, 8, "bf16", True),
    ("int8-f16", mg.D_INT8_F16, 8, "f16", False),
    ("fp8-bf16", mg.D_FP8, 8, "bf16", False),
]


@pytest.mark.parametrize("words", [4, 2, 1])
@pytest.mark.parametrize("tokens", [1, 8, 13])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_step_asm_matches_float64(case: tuple, tokens: int, words: int) -> None:
    name, kind, bits, dt, signed8 = case
    rng = np.random.default_rng([len(name), ord(name[-1]), tokens, words])
    torch.manual_seed(len(name) * 100 + tokens * 10 + words)
    vals = 32 // bits
    step = 4 * words * vals
    blocks = 1 if tokens <= 8 else 2
    # codes and their values
    if kind == mg.D_FP8:
        codes = rng.integers(0, 256, (16, step))
        codes[(codes & 0x7F) == 0x7F] = 0  # no NaN codes
        weights = torch.tensor(codes, dtype=torch.uint8).view(torch.float8_e4m3fn).double().numpy()
        zero = 0.0
    elif kind == mg.D_TABLE:
        codes = rng.integers(0, 16, (16, step))
        table = bnb4.code_table("nf4" if name.startswith("nf4") else "fp4").float()
        rounded = table.to(torch.bfloat16 if dt == "bf16" else torch.float16).double().numpy()
        weights = rounded[codes]
        zero = 0.0
    else:
        codes = rng.integers(0, 1 << bits, (16, step))
        zero = float(rng.integers(0, 1 << bits)) if not signed8 else 128.0
        weights = codes - zero
    stored = codes ^ 0x80 if signed8 else codes  # two's complement storage flips the top bit
    packed = _pack_words(stored, bits, high_first=kind == mg.D_TABLE)
    # activations: 16-bit values; e4m3-valued for the fp8 (W8A8) path
    if kind == mg.D_FP8:
        xq = torch.randn(16, step).clamp(-400, 400).to(torch.float8_e4m3fn).float()
        x = xq.to(torch.bfloat16)
    else:
        x = (torch.randn(16, step) * 3).to(torch.bfloat16 if dt == "bf16" else torch.float16)
    x_bytes = x.contiguous().view(torch.uint8).numpy().reshape(-1)
    memory = {X_BASE + i: int(b) for i, b in enumerate(x_bytes)}
    row_bytes = step * 2
    x_mode = mg.X_F16 if kind == mg.D_FP8 and dt == "bf16" else mg.X_KEEP
    asm = mg.step_asm(kind, bits, words, blocks, dt, x_mode, signed8)
    planes = (
        mg.table_planes(table, torch.bfloat16 if dt == "bf16" else torch.float16)
        if kind == mg.D_TABLE
        else [0] * 8
    )
    zw = _zero_operand(kind, zero, dt) if kind in (mg.D_INT4, mg.D_INT8_F32, mg.D_INT8_F16) else 0
    lanes = _run_step(asm, packed, words, vals, row_bytes, tokens, memory, zw, planes)
    want = weights @ x.double().numpy()[:tokens].T  # [16 rows, tokens]
    _check_product(lanes, blocks, tokens, want)


def _e4m3(values: np.ndarray) -> np.ndarray:
    t = torch.tensor(values, dtype=torch.float32).clamp(-448, 448)
    return t.to(torch.float8_e4m3fn).double().numpy()


@pytest.mark.parametrize("dtype", ["bf16", "f16"])
@pytest.mark.parametrize("mode", ["fp8", "int8", "llm"])
def test_step_asm_quantizes_activations(mode: str, dtype: str) -> None:
    """One token quantized inside the step (W8A8 at batch 1): e4m3(x / s), round(x / s), LLM.int8 with
    outlier columns, each as x * (1 / s) in fp32 like the PTX, then the same float64 product."""
    rng = np.random.default_rng(len(mode))
    torch.manual_seed(len(mode))
    words, bits, vals = 4, 8, 4
    step = 4 * words * vals
    int8 = mg.D_INT8_F32 if dtype == "bf16" else mg.D_INT8_F16
    kind, x_mode, signed8 = {
        "fp8": (mg.D_FP8, mg.X_FP8, False),
        "int8": (int8, mg.X_INT8, True),
        "llm": (int8, mg.X_LLM, True),
    }[mode]
    dt = dtype
    if kind == mg.D_FP8:
        codes = rng.integers(0, 256, (16, step))
        codes[(codes & 0x7F) == 0x7F] = 0
        weights = torch.tensor(codes, dtype=torch.uint8).view(torch.float8_e4m3fn).double().numpy()
        stored = codes
    else:
        codes = rng.integers(0, 256, (16, step))
        weights = codes - 128.0
        stored = codes ^ 0x80
    packed = _pack_words(stored, bits, high_first=False)
    x = (torch.randn(1, step) * 2).to(torch.bfloat16 if dtype == "bf16" else torch.float16)
    x[0, 3] = 40.0  # an outlier column for LLM.int8 (threshold 6)
    x[0, 7] = -9.0
    xf = x.float().numpy()[0]
    thr = 6.0
    inv = np.float32(127.0 / 3.5) if mode != "fp8" else np.float32(448.0 / 40.0)
    scaled = (xf * inv).astype(np.float32)
    if mode == "fp8":
        q = _e4m3(scaled)
    else:
        q = np.clip(np.rint(scaled), -127, 127).astype(np.float64)
        if mode == "llm":
            keep = np.abs(xf) >= thr
            q[keep] = torch.tensor(scaled[keep]).to(x.dtype).double().numpy()
    want = weights @ q
    x_bytes = x.contiguous().view(torch.uint8).numpy().reshape(-1)
    memory = {X_BASE + i: int(b) for i, b in enumerate(x_bytes)}
    asm = mg.step_asm(kind, bits, words, 1, dt, x_mode, signed8)
    zw = _zero_operand(kind, 128.0, dt) if kind != mg.D_FP8 else 0
    lanes = _run_step(asm, packed, words, vals, step * 2, 1, memory, zw, [0] * 8, inv=inv, thr=thr)
    got = np.zeros(16)
    for lane in range(0, 32, 4):  # token 0: lanes with t = 0 hold column 0 of D
        g = lane // 4
        got[g] = np.array([lanes.regs[lane]["$0"]], dtype=np.uint32).view(np.float32)[0]
        got[g + 8] = np.array([lanes.regs[lane]["$2"]], dtype=np.uint32).view(np.float32)[0]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())


@pytest.mark.parametrize(
    ("bits", "group", "k", "words"),
    [
        (4, 128, 4096, 4),  # int4 g128: 128-column steps, one 16-byte load per row and lane
        (4, 64, 4096, 2),  # NF4 block 64: a step must stay inside one block
        (4, 32, 4096, 1),
        (4, 0, 4096, 4),  # one scale per row
        (8, 0, 4096, 4),  # 8-bit: 64-column steps
        (8, 64, 4096, 4),
        (8, 32, 4096, 2),
        (4, 16, 4096, 0),  # no step fits a 16-column group
        (4, 128, 4000, 0),  # K not a whole number of steps
    ],
)
def test_words_per_lane_keep_steps_inside_groups(bits: int, group: int, k: int, words: int) -> None:
    from quantbench.engine.kernels.layouts import MODE_INT, WQLayout, mma_tile, mma_words_per_lane

    layout = WQLayout(
        in_features=k, out_features=64, bits=bits, mode=MODE_INT, w32=torch.zeros(1, dtype=torch.int32),
        scales=torch.zeros(1), scale_stride=1, group=group,
    )  # fmt: skip
    assert mma_words_per_lane(layout) == words
    assert mma_tile(layout) == ((16, 4 * words) if words else None)


@pytest.mark.parametrize("tokens", [1, 8])
@pytest.mark.parametrize(
    "case", [c for c in CASES if c[1] != mg.D_FP8], ids=[c[0] for c in CASES if c[1] != mg.D_FP8]
)
def test_step_asm_with_preloaded_activations(case: tuple, tokens: int) -> None:
    """``x_regs``: the activation words come in as operands ($32..) loaded by ``x_load_asm``; the same
    results as loading them inside the step."""
    name, kind, bits, dt, signed8 = case
    rng = np.random.default_rng([len(name), tokens])
    words = 4 if bits == 4 else 4
    vals = 32 // bits
    step = 4 * words * vals
    codes = rng.integers(0, 16 if bits == 4 else 256, (16, step))
    packed = _pack_words(codes ^ 0x80 if signed8 else codes, bits, high_first=kind == mg.D_TABLE)
    x = (torch.randn(16, step) * 3).to(torch.bfloat16 if dt == "bf16" else torch.float16)
    x_bytes = x.contiguous().view(torch.uint8).numpy().reshape(-1)
    memory = {X_BASE + i: int(b) for i, b in enumerate(x_bytes)}
    row_bytes = step * 2
    table = bnb4.code_table("nf4" if name.startswith("nf4") else "fp4").float()
    planes = mg.table_planes(table, x.dtype) if kind == mg.D_TABLE else [0] * 8
    zw = _zero_operand(kind, 3.0, dt) if kind in (mg.D_INT4, mg.D_INT8_F32, mg.D_INT8_F16) else 0
    want = _run_step(mg.step_asm(kind, bits, words, 1, dt, mg.X_KEEP, signed8), packed, words, vals, row_bytes,
                     tokens, memory, zw, planes)  # fmt: skip
    # the caller's load: x_load_asm per lane, then its outputs as the step's $32..
    xregs = words * vals // 2
    loads = Lanes(
        [[0] * mg.X_REGS + [X_BASE + (lane // 4) * row_bytes + (lane % 4) * words * vals * 2, int(lane // 4 < tokens)]
         for lane in range(32)],
        memory,
    )  # fmt: skip
    loads.run(mg.x_load_asm(xregs))
    got = _run_step(mg.step_asm(kind, bits, words, 1, dt, mg.X_KEEP, signed8, x_regs=True), packed, words, vals,
                    row_bytes, tokens, {}, zw, planes, x_words=[[loads.regs[lane][f"${r}"] for r in range(mg.X_REGS)]
                                                              for lane in range(32)])  # fmt: skip
    for lane in range(32):
        assert [got.regs[lane][f"${i}"] for i in range(4)] == [want.regs[lane][f"${i}"] for i in range(4)]


def _fill_pair_table(memory: dict, table: torch.Tensor, dtype: torch.dtype, at: int, copies: int) -> None:
    """Write the shared pair table as the kernel fills it: thread v stores entry v's copies at
    ``at + v * copies * 4`` (``lut_store_asm``)."""
    pairs = mg.lut_pairs(table, dtype)
    for first in range(0, 256, 32):
        Lanes([[0, pairs[v], at + v * copies * 4] for v in range(first, first + 32)], memory).run(
            mg.lut_store_asm(copies)
        )


@pytest.mark.parametrize("copies", [4, 8, 32])
@pytest.mark.parametrize("words", [4, 2])
@pytest.mark.parametrize("case", [c for c in CASES if c[1] == mg.D_TABLE], ids=lambda c: c[0])
def test_step_asm_shared_pair_table_matches_permutes(case: tuple, words: int, copies: int) -> None:
    """``lut_copies``: NF4 / FP4 code pairs looked up in the shared pair table (laid out as the kernel
    fills it, ``lut_store_asm``) give the same bits as the byte-permute decoder."""
    name, kind, bits, dt, _ = case
    rng = np.random.default_rng([len(name), words, copies])
    vals = 8
    step = 4 * words * vals
    codes = rng.integers(0, 16, (16, step))
    packed = _pack_words(codes, bits, high_first=True)
    x = (torch.randn(16, step) * 3).to(torch.bfloat16 if dt == "bf16" else torch.float16)
    memory = {X_BASE + i: int(b) for i, b in enumerate(x.contiguous().view(torch.uint8).numpy().reshape(-1))}
    table = bnb4.code_table("nf4" if name.startswith("nf4") else "fp4").float()
    lut_at = 1 << 12
    _fill_pair_table(memory, table, x.dtype, lut_at, copies)
    planes = mg.table_planes(table, x.dtype)
    want = _run_step(mg.step_asm(kind, bits, words, 1, dt, mg.X_KEEP, False), packed, words, vals, step * 2, 8,
                     memory, 0, planes)  # fmt: skip
    got = _run_step(mg.step_asm(kind, bits, words, 1, dt, mg.X_KEEP, False, lut_copies=copies), packed, words, vals,
                    step * 2, 8, memory, 0, [0] * 8, lut=(lut_at, copies))  # fmt: skip
    for lane in range(32):
        assert [got.regs[lane][f"${i}"] for i in range(4)] == [want.regs[lane][f"${i}"] for i in range(4)]


@pytest.mark.parametrize("x_regs", [False, True])
@pytest.mark.parametrize("copies,permute", [(0, 0), (16, 0), (16, 3), (8, 8)])
@pytest.mark.parametrize("tokens", [1, 8])
@pytest.mark.parametrize("case", [c for c in CASES if c[1] == mg.D_TABLE], ids=lambda c: c[0])
def test_step_asm_two_groups_matches_float64(
    case: tuple, tokens: int, copies: int, permute: int, x_regs: bool
) -> None:
    """``subs=2``: a step of two consecutive 64-column groups (2 words per lane each; lane t holds words
    2t, 2t + 1 of each group) writes each group's products to its own four results; with the shared
    pair table, ``permute`` of its words by the byte-permute decoder."""
    name, kind, bits, dt, _ = case
    rng = np.random.default_rng([len(name), tokens, copies, permute, x_regs])
    codes = rng.integers(0, 16, (16, 128))
    packed = _pack_words(codes, bits, high_first=True)  # [16, 16]: words 0-7 group 0, 8-15 group 1
    lane_words = np.zeros((16, 16), dtype=np.int64)  # lane t's four words, as the kernel loads them
    for t in range(4):
        for j in range(4):
            lane_words[:, 4 * t + j] = packed[:, (j // 2) * 8 + 2 * t + j % 2]
    x = (torch.randn(16, 128) * 3).to(torch.bfloat16 if dt == "bf16" else torch.float16)
    memory = {X_BASE + i: int(b) for i, b in enumerate(x.contiguous().view(torch.uint8).numpy().reshape(-1))}
    table = bnb4.code_table("nf4" if name.startswith("nf4") else "fp4").float()
    weights = table.to(x.dtype).double().numpy()[codes]
    lut = None
    planes = mg.table_planes(table, x.dtype)
    if copies:
        lut = (1 << 12, copies)
        _fill_pair_table(memory, table, x.dtype, lut[0], copies)
    sub_x = mg.sub_x_bytes(2, bits)
    assert sub_x == 64 * 2
    x_words = None
    if x_regs:
        loads = Lanes(
            [[0] * mg.X_REGS + [X_BASE + (lane // 4) * 256 + (lane % 4) * 32, int(lane // 4 < tokens)]
             for lane in range(32)],
            memory,
        )  # fmt: skip
        loads.run(mg.x_load_asm(16, subs=2, sub_x=sub_x))
        x_words = [[loads.regs[lane][f"${r}"] for r in range(mg.X_REGS)] for lane in range(32)]
    asm = mg.step_asm(kind, bits, 4, 1, dt, mg.X_KEEP, False, x_regs=x_regs, lut_copies=copies, subs=2,
                      lut_permute=permute)  # fmt: skip
    assert asm.count("ld.shared") == 4 * (8 - permute) if copies else "ld.shared" not in asm
    lanes = _run_step(asm, lane_words, 4, 8, 256, tokens, memory, 0, planes, x_words=x_words, lut=lut,
                      lane_cols=16)  # fmt: skip
    xs = x.double().numpy()
    for u in range(2):
        want = weights[:, 64 * u : 64 * (u + 1)] @ xs[:tokens, 64 * u : 64 * (u + 1)].T
        got = np.zeros((16, 8))
        for lane in range(32):
            g, t = lane // 4, lane % 4
            out = [
                np.array([lanes.regs[lane][f"${4 * u + i}"]], dtype=np.uint32).view(np.float32)[0]
                for i in range(4)
            ]
            got[g, 2 * t], got[g, 2 * t + 1], got[g + 8, 2 * t], got[g + 8, 2 * t + 1] = out
        np.testing.assert_allclose(got[:, :tokens], want, rtol=1e-6, atol=1e-6 * np.abs(want).max())
        assert not got[:, tokens:].any()


def test_load_asm_two_groups_reads_both_tiles() -> None:
    """``load_asm(4, subs=2, sub_bytes)``: two words at each address and two ``sub_bytes`` further on."""
    memory = {a: (a * 7 + 3) & 0xFF for a in range(4096)}
    ops = [[0] * 8 + [64 + lane * 8, 2048 + lane * 8, 1, int(lane % 2 == 0)] for lane in range(32)]
    lanes = Lanes(ops, memory)
    lanes.run(mg.load_asm(4, subs=2, sub_bytes=512))
    for lane in range(32):
        got = [lanes.regs[lane][f"${r}"] for r in range(8)]
        g_at, h_at = 64 + lane * 8, 2048 + lane * 8
        want = [lanes.load32(a) for a in (g_at, g_at + 4, g_at + 512, g_at + 516)]
        want += (
            [lanes.load32(a) for a in (h_at, h_at + 4, h_at + 512, h_at + 516)] if lane % 2 == 0 else [0] * 4
        )
        assert got == want


@pytest.mark.parametrize("xregs,subs,sub_x", [(16, 1, 0), (8, 1, 0), (16, 2, 128), (8, 2, 64), (4, 2, 32)])
def test_x_load_asm_reads_each_sub_step(xregs: int, subs: int, sub_x: int) -> None:
    """``x_load_asm``: exactly ``xregs`` words, ``xregs / subs`` at each of ``subs`` addresses ``sub_x`` apart;
    the other outputs zero, and all zero when the flag is 0."""
    memory = {a: (a * 13 + 5) & 0xFF for a in range(1024)}
    lanes = Lanes([[0] * mg.X_REGS + [64 + 4 * lane, int(lane != 3)] for lane in range(32)], memory)
    lanes.run(mg.x_load_asm(xregs, subs, sub_x))
    per = xregs // subs
    for lane in range(32):
        want = [lanes.load32(64 + 4 * lane + (r // per) * sub_x + 4 * (r % per)) for r in range(xregs)]
        want = (want if lane != 3 else [0] * xregs) + [0] * (mg.X_REGS - xregs)
        assert [lanes.regs[lane][f"${r}"] for r in range(mg.X_REGS)] == want


@pytest.mark.parametrize("x_regs", [False, True])
@pytest.mark.parametrize("words", [4, 2])
@pytest.mark.parametrize("tokens", [1, 8, 13])
@pytest.mark.parametrize("dt", ["bf16", "f16"])
def test_step_asm_plain_weights_match_float64(dt: str, tokens: int, words: int, x_regs: bool) -> None:
    """``D_PLAIN``: 16-bit weights go into the mma as they are (two words of rows g and g + 8 per A
    fragment); the step against the float64 product (16-bit x 16-bit products are exact in fp32)."""
    if x_regs and tokens > 8:
        pytest.skip("preloaded activations take one token block")
    torch.manual_seed(tokens * 10 + words + (dt == "f16"))
    dtype = torch.bfloat16 if dt == "bf16" else torch.float16
    step = 4 * words * 2
    blocks = 1 if tokens <= 8 else 2
    w = (torch.randn(16, step) * 2).to(dtype)
    codes = w.view(torch.int16).numpy().astype(np.int64) & 0xFFFF
    packed = _pack_words(codes, 16, high_first=False)
    x = (torch.randn(16, step) * 3).to(dtype)
    x_bytes = x.contiguous().view(torch.uint8).numpy().reshape(-1)
    memory = {X_BASE + i: int(b) for i, b in enumerate(x_bytes)}
    row_bytes = step * 2
    x_words = None
    if x_regs:  # the caller's load (x_load_asm), its outputs as the step's $32..
        loads = Lanes(
            [[0] * mg.X_REGS + [X_BASE + (lane // 4) * row_bytes + (lane % 4) * words * 4, int(lane // 4 < tokens)]
             for lane in range(32)],
            memory,
        )  # fmt: skip
        loads.run(mg.x_load_asm(words))
        x_words = [[loads.regs[lane][f"${r}"] for r in range(mg.X_REGS)] for lane in range(32)]
    asm = mg.step_asm(mg.D_PLAIN, 16, words, blocks, dt, mg.X_KEEP, False, x_regs=x_regs)
    lanes = _run_step(asm, packed, words, 2, row_bytes, tokens, {} if x_regs else memory, 0, [0] * 8,
                      x_words=x_words)  # fmt: skip
    want = w.double().numpy() @ x.double().numpy()[:tokens].T
    _check_product(lanes, blocks, tokens, want)


def test_step_asm_plain_weights_need_word_pairs() -> None:
    with pytest.raises(ValueError, match="even number of words"):
        mg.step_asm(mg.D_PLAIN, 16, 1, 1, "bf16", mg.X_KEEP, False)

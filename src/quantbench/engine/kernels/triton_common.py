"""Triton helpers shared by the quantized-linear kernels (``wq_matmul``, ``prompt_gemm``, ``gemv_h2``,
``mma_gemv``, ``dequant``) and the fused ops: code-word addressing and decoding, scales, the split-K
epilogue and its workspace, the PTX byte-permute decoder of NF4 / FP4 tables, the RoPE and
online-softmax steps of the attention kernels (decode and extend), and correctly rounded math.

Correctly rounded math: Triton's fp32 ``/`` is an approximation (``div.full``) and it may fuse ``a * b + c``
into one FMA, so activation quantization divides with ``div_rn`` and rounds with libdevice's ``rint``: its
codes and factors are the reference's, bit for bit, for the same input. Triton's interpreter computes with
numpy, exactly, and has no libdevice.
"""

from __future__ import annotations

import warnings

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice
from triton.runtime.interpreter import InterpretedFunction

from quantbench.engine.kernels.layouts import MODE_INT, MODE_TABLE, WQLayout
from quantbench.engine.kernels.mma_ptx import table_planes
from quantbench.engine.options import DEFAULT_OPTIONS, EngineOptions

_INT = tl.constexpr(MODE_INT)
_TABLE = tl.constexpr(MODE_TABLE)


@triton.jit
def _probe(x):
    return x


INTERPRETED = tl.constexpr(isinstance(_probe, InterpretedFunction))
"""Whether Triton runs these kernels in its interpreter (``TRITON_INTERPRET=1``, decided by ``triton.jit``)."""


@triton.jit
def rint(x):
    """Round fp32 ``x`` to the nearest integer, half to even (``torch.round``), as fp32."""
    if INTERPRETED:
        return (x + 12582912.0) - 12582912.0  # 1.5 * 2**23: exact in numpy, whose products are rounded
    else:
        return libdevice.rint(x)


@triton.jit
def rope_rows(x1, x2, c, s):
    """Rotate-half RoPE of two halves (fp32), as HF's ``x * cos + rotate_half(x) * sin``."""
    return x1 * c - x2 * s, x2 * c + x1 * s


@triton.jit
def kv_block(kbase, vbase, s0, s_hi, st, stride_ct, dh, dd, HALF: tl.constexpr, BS: tl.constexpr):
    """Keys (two halves, transposed ``[HALF, BS]``) and values ``[BS, D]`` of positions ``s0 .. s0 + BS``, and
    which of them lie in [st, s_hi) (the others load as 0)."""
    offs_s = s0 + tl.arange(0, BS)
    smask = (offs_s < s_hi) & (offs_s >= st)
    kp = kbase + offs_s[None, :] * stride_ct
    kt1 = tl.load(kp + dh[:, None], mask=smask[None, :], other=0.0)  # [HALF, BS]
    kt2 = tl.load(kp + HALF + dh[:, None], mask=smask[None, :], other=0.0)
    vt = tl.load(vbase + offs_s[:, None] * stride_ct + dd[None, :], mask=smask[:, None], other=0.0)
    return smask, kt1, kt2, vt


@triton.jit
def attend_block(q1r, q2r, kt1, kt2, vt, keep, m_i, l_i, acc, qk_scale):
    """One block of the online softmax (base 2) over the keys ``keep`` (a mask broadcast to ``[rows, keys]``)
    lets each query row see: the running max, sum and weighted values."""
    qk = tl.dot(q1r, kt1) + tl.dot(q2r, kt2)
    qk = tl.where(keep, qk * qk_scale, -float("inf"))
    m_new = tl.maximum(m_i, tl.max(qk, axis=1))
    m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)  # a block with no valid position: no NaN
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(qk - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
    return m_new, l_i, acc


@triton.jit
def silu_gate(g, up):
    """``silu(g) * up`` rounded to the 16-bit dtype of ``g`` after each step, as torch rounds
    ``F.silu(g) * up``; the sigmoid's exp and division are Triton's fast ones (within a few fp32 units in the
    last place of the exact value: whole-row kernels keep their registers)."""
    g32 = g.to(tl.float32)
    s = (g32 / (1.0 + tl.exp(-g32))).to(g.dtype)
    return (s.to(tl.float32) * up.to(tl.float32)).to(g.dtype)


@triton.jit
def codes_slot(words, t_ptr, sub, row_sub, i: tl.constexpr, MODE: tl.constexpr, BITS: tl.constexpr,
                HAS_ZERO: tl.constexpr, GROUP: tl.constexpr, ZERO_CONST: tl.constexpr):  # fmt: skip
    """Values of code slot ``i`` of every word, fp32 [BN, BKV], zero removed and unscaled.

    MODE_INT returns ``(u - zero) * 2**pos`` with ``pos = min(i * BITS, 23 - BITS)``: the code is
    masked in place (while it fits the fp32 mantissa, bits 0..22, else shifted to its top) and
    OR-ed into the exponent of 2**23 (one LOP3), so no shift is needed for most slots; the caller
    multiplies the activations by ``2**-pos`` instead (exact)."""
    MAGIC: tl.constexpr = 8388608.0
    CODE_MASK: tl.constexpr = (1 << BITS) - 1
    if MODE == _TABLE:
        # bitsandbytes order: slot 2b is the high nibble of byte b, slot 2b + 1 the low one; the 16 fp32
        # code values sit in one 64-byte line, so a warp's lookups are a single L1 wavefront
        SH: tl.constexpr = (i // 2) * 8 + (1 - i % 2) * 4
        f = tl.load(t_ptr + ((words >> SH) & 0xF))
    elif MODE == _INT:
        POS: tl.constexpr = i * BITS - (i * BITS - (23 - BITS)) * (i * BITS > 23 - BITS)
        SHIFT: tl.constexpr = i * BITS - POS
        if SHIFT == 0:
            u = words & (CODE_MASK << POS)
        else:
            u = (words >> SHIFT) & (CODE_MASK << POS)
        b = (u | 0x4B000000).to(tl.float32, bitcast=True)  # 2**23 + u * 2**pos, exact
        if HAS_ZERO:
            if GROUP == 0:
                f = b - (row_sub[:, None] - MAGIC) * (1 << POS) - MAGIC
            else:
                f = b - ((sub - MAGIC) * (1 << POS) + MAGIC)
        else:
            f = b - (MAGIC + ZERO_CONST * (1 << POS))
    else:
        u = (words >> (i * BITS)) & CODE_MASK
        f = u.to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float32)
    return f


@triton.jit
def table_prmt(words, ASM: tl.constexpr, P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr, P3: tl.constexpr,
                P4: tl.constexpr, P5: tl.constexpr, P6: tl.constexpr, P7: tl.constexpr):  # fmt: skip
    """The 8 code values (slot order) of bitsandbytes-packed 4-bit words by byte permutes (see
    :func:`table_asm`): no memory lookups. The table's byte planes P0..P7 stay in registers."""
    z = (words * 0).to(tl.int32, bitcast=True)
    return tl.inline_asm_elementwise(
        asm=ASM,
        constraints="=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r,r,r,r,r,r",
        args=[words, z + P0, z + P1, z + P2, z + P3, z + P4, z + P5, z + P6, z + P7],
        dtype=(
            tl.float32,
            tl.float32,
            tl.float32,
            tl.float32,
            tl.float32,
            tl.float32,
            tl.float32,
            tl.float32,
        ),
        is_pure=True,
        pack=1,
    )


@triton.jit
def word_off(rows, wcols, stride_wn, KW, TN: tl.constexpr, TKV: tl.constexpr):
    """Offsets of code words (``rows`` int64, word columns ``wcols``, broadcast) in row-major storage
    (TN == 0) or tile-major storage ``[N / TN, KW / TKV, TN, TKV]`` (``layouts.WQLayout.tile_n``)."""
    if TN == 0:
        return rows * stride_wn + wcols
    return ((rows // TN) * (KW // TKV) + wcols // TKV) * (TN * TKV) + (rows % TN) * TKV + wcols % TKV


@triton.jit
def split_tile(M, K, k_split, BM: tl.constexpr, SPLIT_K: tl.constexpr):
    """``(tile, split, token tile, row tile, k_lo, k_hi)`` of this program. Programs are (tile, split) with
    a tile's splits adjacent and the token tiles of one row tile side by side (its codes read once)."""
    pid = tl.program_id(0)
    tile = pid // SPLIT_K
    ks = pid % SPLIT_K
    num_m = tl.cdiv(M, BM)
    k_lo = ks * k_split
    return tile, ks, tile % num_m, tile // num_m, k_lo, tl.minimum(K, k_lo + k_split)


@triton.jit
def load_words(w_ptr, rows, mask_n, k, k_hi, offs_j, stride_wn, KW, VALS: tl.constexpr, TN: tl.constexpr,
               TKV: tl.constexpr):  # fmt: skip
    """Code words ``[BN, BKV]`` of the step at column ``k``; zeros from ``k_hi`` on (a prefetch past the end)."""
    return tl.load(
        w_ptr + word_off(rows[:, None], (k // VALS + offs_j)[None, :], stride_wn, KW, TN, TKV),
        mask=mask_n[:, None] & ((k + offs_j * 0) < k_hi)[None, :],
        other=0,
    )


@triton.jit
def row_stats(s_ptr, z_ptr, rows, mask_n, stride_sn, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr,
              SCALE_MUL: tl.constexpr):  # fmt: skip
    """One scale per output row (GROUP == 0): the fp32 scale and, for MODE_INT with zeros, zero + 2**23
    (what ``codes_slot`` subtracts); ``(1.0, 0.0)`` for group-wise layouts."""
    row_scale = 1.0
    row_sub = 0.0
    if GROUP == 0:
        row_scale = tl.load(s_ptr + rows * stride_sn, mask=mask_n, other=0.0).to(tl.float32) * SCALE_MUL
        if HAS_ZERO:
            row_sub = tl.load(z_ptr + rows * stride_sn, mask=mask_n, other=0).to(tl.float32) + 8388608.0
    return row_scale, row_sub


@triton.jit
def group_off(rows, g, stride_sn, n_groups, TN: tl.constexpr):
    """Offsets of per-(row, group) scales / zeros: row-major, or ``[N / TN, groups, TN]`` when tiled."""
    if TN == 0:
        return rows * stride_sn + g
    return ((rows // TN) * n_groups + g) * TN + rows % TN


@triton.jit
def group_scale(raw, rows, mask_n, k0, offs_j, stride_sn, dqc_ptr, dqn_ptr, dqo_ptr, GROUP: tl.constexpr,
                VALS: tl.constexpr, TILE_SCALE: tl.constexpr, NESTED: tl.constexpr, SCALE_MUL: tl.constexpr):  # fmt: skip
    """fp32 scales of step k0 from the raw stored values; double-quantized absmax codes are decoded with
    the nested absmax of their logical (row-major) block number."""
    if NESTED:
        if TILE_SCALE:
            bidx = (rows * stride_sn + k0 // GROUP)[:, None]
        else:
            bidx = rows[:, None] * stride_sn + ((k0 + offs_j * VALS) // GROUP)[None, :]
        nest = tl.load(dqn_ptr + bidx // 256, mask=mask_n[:, None], other=0.0)
        return tl.load(dqc_ptr + raw.to(tl.int32)) * nest + tl.load(dqo_ptr)
    return raw.to(tl.float32) * SCALE_MUL


@triton.jit
def load_scale(s_ptr, z_ptr, rows, mask_n, k0, k_hi, offs_j, stride_sn, n_groups, GROUP: tl.constexpr,
                VALS: tl.constexpr, TILE_SCALE: tl.constexpr, ZERO: tl.constexpr, TN: tl.constexpr):  # fmt: skip
    """Raw stored scales (and zero + 2**23) of step k0: [BN, 1] (tile inside one group) or [BN, BKV]."""
    if TILE_SCALE:
        sidx = group_off(rows, k0 // GROUP, stride_sn, n_groups, TN)[:, None]
        mask = (mask_n & ((k0 + rows * 0) < k_hi))[:, None]
    else:
        sidx = group_off(rows[:, None], ((k0 + offs_j * VALS) // GROUP)[None, :], stride_sn, n_groups, TN)
        mask = mask_n[:, None] & ((k0 + offs_j * 0) < k_hi)[None, :]
    raw = tl.load(s_ptr + sidx, mask=mask, other=0)
    if ZERO:
        sub = tl.load(z_ptr + sidx, mask=mask, other=0).to(tl.float32) + 8388608.0
    else:
        sub = 0.0
    return raw, sub


@triton.jit
def bias_like(out, b_ptr, offs_n, mask_n):
    """The bias broadcast to ``out``'s shape: ``offs_n`` indexes ``out``'s rows ([BN], for [BN] or [BN, BM])
    or, with ``out``'s own shape, each element."""
    b = tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    if len(offs_n.shape) == len(out.shape):
        full = b + tl.zeros_like(out)
    else:  # (no early return: Triton 3.6 still compiles the statements after one)
        full = tl.reshape(b, (out.shape[0],) + (1,) * (len(out.shape) - 1)) + tl.zeros_like(out)
    return full


@triton.jit
def store_out(out, omask, o_off, ws_off, plane, offs_n, mask_n, b_ptr, o_ptr, ws_ptr, cnt_ptr, tile, ks,
               HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr):  # fmt: skip
    """Write a tile's fp32 result (+ bias). With split-K, each split writes its partial to the workspace
    and the last one to finish the tile (atomic counter, reset afterwards) sums them in split order."""
    if SPLIT_K == 1:
        if HAS_BIAS:
            out += bias_like(out, b_ptr, offs_n, mask_n)
        tl.store(o_ptr + o_off, out.to(o_ptr.dtype.element_ty), mask=omask)
    else:
        # plane = M * N < 2**31 (the launcher checks the workspace size)
        tl.store(ws_ptr + ks * plane + ws_off, out, mask=omask)
        tl.debug_barrier()  # every thread's partial is written before the counter is released
        done = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
        if done == SPLIT_K - 1:  # the last split of this tile: sum all partials in order
            total = tl.load(ws_ptr + ws_off, mask=omask, other=0.0, cache_modifier=".cg")
            for s in range(1, SPLIT_K):
                total += tl.load(ws_ptr + s * plane + ws_off, mask=omask, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                total += bias_like(total, b_ptr, offs_n, mask_n)
            tl.store(o_ptr + o_off, total.to(o_ptr.dtype.element_ty), mask=omask)
            tl.atomic_xchg(cnt_ptr + tile, 0)


_ASM_TEMPLATE = """
{
.reg .b32 w, sa, sb, ya, yb, t, m, ma, mb, a0, a1, lo, hi, p0, p1, p2, p3, c;
.reg .b16 h0, h1, h2, h3, h4, h5, h6, h7;
mov.b32 w, $8;
and.b32 sa, w, 0x7777;
shr.u32 sb, w, 16;
and.b32 sb, sb, 0x7777;
mov.b32 c, 0x00FF00FF;
prmt.b32 ya, w, 0, 0x1100;
shl.b32 t, ya, 4;
lop3.b32 m, t, ya, c, 0xE4;
prmt.b32 ma, m, 0, 0xBA98;
prmt.b32 yb, w, 0, 0x3322;
shl.b32 t, yb, 4;
lop3.b32 m, t, yb, c, 0xE4;
prmt.b32 mb, m, 0, 0xBA98;
prmt.b32 a0, L0, L1, sa;
prmt.b32 a1, L2, L3, sa;
lop3.b32 lo, a0, a1, ma, 0xD8;
prmt.b32 a0, H0, H1, sa;
prmt.b32 a1, H2, H3, sa;
lop3.b32 hi, a0, a1, ma, 0xD8;
prmt.b32 p0, lo, hi, 0x5140;
prmt.b32 p1, lo, hi, 0x7362;
prmt.b32 a0, L0, L1, sb;
prmt.b32 a1, L2, L3, sb;
lop3.b32 lo, a0, a1, mb, 0xD8;
prmt.b32 a0, H0, H1, sb;
prmt.b32 a1, H2, H3, sb;
lop3.b32 hi, a0, a1, mb, 0xD8;
prmt.b32 p2, lo, hi, 0x5140;
prmt.b32 p3, lo, hi, 0x7362;
mov.b32 {h1, h0}, p0;
mov.b32 {h3, h2}, p1;
mov.b32 {h5, h4}, p2;
mov.b32 {h7, h6}, p3;
cvt.f32.f16 $0, h0;
cvt.f32.f16 $1, h1;
cvt.f32.f16 $2, h2;
cvt.f32.f16 $3, h3;
cvt.f32.f16 $4, h4;
cvt.f32.f16 $5, h5;
cvt.f32.f16 $6, h6;
cvt.f32.f16 $7, h7;
}
"""


_ASM_CACHE: dict[tuple, dict] = {}


def table_decoder(layout: WQLayout, device: torch.device, options: EngineOptions = DEFAULT_OPTIONS) -> dict:
    """Kernel arguments of the PTX table decoder for a MODE_TABLE layout on CUDA (off under the
    interpreter, or with ``table_prmt=False``)."""
    off = {"TABLE_ASM": "", **{f"TP{i}": 0 for i in range(8)}}
    if layout.mode != MODE_TABLE or device.type != "cuda" or not options.table_prmt:
        return off
    key = (layout.table.data_ptr(), str(device))
    if key not in _ASM_CACHE:
        args = table_asm(layout.table)
        _ASM_CACHE[key] = off  # (the self-check below launches with the plain path)
        if not _prmt_selfcheck(layout.table, device, args):
            warnings.warn("PTX table decoder disagrees with the table lookup: using L1 lookups", stacklevel=2)
            return off
        _ASM_CACHE[key] = args
    return _ASM_CACHE[key]


def _prmt_selfcheck(table: torch.Tensor, device: torch.device, args: dict) -> bool:
    """Run ``wq_matmul`` on random codes with both decoders (M = 1 and M = 16): must agree to fp16."""
    from quantbench.engine.kernels.wq_matmul import pick_config, wq_matmul  # (wq_matmul imports this module)

    gen = torch.Generator(device="cpu").manual_seed(0)
    n, k = 64, 256
    layout = WQLayout(
        in_features=k,
        out_features=n,
        bits=4,
        mode=MODE_TABLE,
        w32=torch.randint(-(2**31), 2**31 - 1, (n, k // 8), generator=gen, dtype=torch.int64)
        .to(torch.int32)
        .to(device),
        scales=torch.rand((n, k // 64), generator=gen).to(device),
        scale_stride=k // 64,
        group=64,
        high_first=True,
        table=table,
    )
    for m in (1, 16):
        x = torch.randn((m, k), generator=gen).to(device=device, dtype=torch.bfloat16)
        cfg = pick_config(m, n, k, 4, 64, device)
        ref = wq_matmul(x, layout, config=cfg).float()
        asm = wq_matmul(x, layout, config={**cfg, **args}).float()
        if not bool(torch.allclose(asm, ref, rtol=2e-2, atol=2e-2 * float(ref.abs().max()))):
            return False
    return True


def table_asm(table: torch.Tensor) -> dict:
    """PTX decoding 8 bitsandbytes-packed codes (first of each byte pair in the high nibble) with the
    16-entry ``table`` as fp16 in 8 registers: the low and high bytes of entries 0-7 / 8-15 form
    four byte planes each; ``prmt`` looks up four 3-bit indices at once in a plane pair, bit 3 of every
    code (spread to a byte mask by a sign-replicating ``prmt``) picks the half, two more ``prmt``
    interleave low / high bytes into fp16 pairs, ``cvt`` makes fp32. The table values are rounded to
    fp16 (relative error <= 2**-11, below the bf16 rounding of the weights)."""
    asm = _ASM_TEMPLATE
    for i, name in enumerate(("L0", "L1", "L2", "L3", "H0", "H1", "H2", "H3")):
        asm = asm.replace(name, f"${9 + i}")
    # as int32 constants (Triton constexpr ints become i32 / i64 by value)
    return {"TABLE_ASM": asm, **{f"TP{i}": p for i, p in enumerate(table_planes(table, torch.float16))}}


# ---------------------------------------------------------------------------------------------
# Launch helpers
# ---------------------------------------------------------------------------------------------

_SMS: dict[int, int] = {}
_WORKSPACE: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
WS_FLOATS = 1 << 22  # 16 MiB of fp32 partials per device
WS_TILES = 1 << 14


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SMS:
        _SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SMS[idx]


def workspace(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 partials and zeroed per-tile counters for split-K (kernels leave the counters at zero).

    Allocate outside CUDA-graph capture (the first, eager call does)."""
    key = str(device)
    if key not in _WORKSPACE:
        _WORKSPACE[key] = (
            torch.empty(WS_FLOATS, device=device, dtype=torch.float32),
            torch.zeros(WS_TILES, device=device, dtype=torch.int32),
        )
    return _WORKSPACE[key]


def or_dummy(layout: WQLayout, *tensors: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """``tensors`` with each absent one replaced by the codes (kernels take a pointer they never read)."""
    return tuple(layout.w32 if t is None else t for t in tensors)


def split_columns(split: int, k: int, bk: int) -> tuple[int, int]:
    """``(split, columns per split)`` for about ``split`` K-splits of whole ``bk`` steps, empty ones dropped."""
    k_split = triton.cdiv(k // bk, split) * bk
    return triton.cdiv(k, k_split), k_split


def plan_split(
    split: int, tiles: int, out_elems: int, k: int, bk: int, out: torch.Tensor
) -> tuple[int, int, torch.Tensor, torch.Tensor]:
    """Final split-K for a launch: ``(split, columns per split, workspace, counters)``. Falls back to
    no split when the fp32 partials or the tile counters would not fit the workspace, and drops empty
    splits (each covers a whole number of ``bk`` steps)."""
    if split > 1 and (split * out_elems > WS_FLOATS or tiles > WS_TILES):
        split = 1
    split, k_split = split_columns(split, k, bk)
    ws, cnt = workspace(out.device) if split > 1 else (out, out)
    return split, k_split, ws, cnt


def split_for(M: int, N: int, K: int, cfg: dict, sms: int) -> int:
    """Smallest power-of-two split giving at least two programs per SM (and >= 4 k-steps each)."""
    tiles = triton.cdiv(M, cfg["BM"]) * triton.cdiv(N, cfg["BN"])
    steps = K // cfg["BK"]
    split = 1
    while tiles * split < 2 * sms and steps // (split * 2) >= 4 and split < 32:
        split *= 2
    return split

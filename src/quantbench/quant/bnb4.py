"""NF4 / FP4 block-wise 4-bit weights as in bitsandbytes and QLoRA, with optional double quantization.

The weight is flattened and cut into blocks of ``block`` values; each block is divided by its absmax and
every value is rounded to the nearest of 16 code values (NF4: normal quantiles, FP4: a 1-2-1 float).
Codes are packed two per byte, the *first* value of a pair in the *high* nibble (bitsandbytes' order,
the opposite of ``rtn.pack_int4``). With double quantization (``dq=1``) the fp32 absmax vector has its
mean subtracted (kept as an fp32 ``offset``) and is quantized again to 8 bits with bitsandbytes'
signed dynamic map in blocks of 256, each with an fp32 absmax.

Everything here reproduces bitsandbytes 0.50.2 on CPU bit for bit (codes, absmax, nested state and
dequantized weights), including its quirks, which are commented where they happen. One defect is
not copied: on AVX-512 CPUs its native ``dequantize_4bit`` of an ``[m, n]`` weight reads the absmax of
block ``row * (n // block) + col // block``, wrong when ``n`` is a multiple of 16 but not of ``block``;
here (as in its quantizer, its CUDA kernels and its pure-torch backend) blocks run over the flattened
weight. bitsandbytes is not imported: the tests compare against it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from quantbench.quant.base import Method, QuantLinear
from quantbench.quant.config import COMMON_OPTIONS, Option, QuantConfig, compute_option

BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes accepts
NESTED_BLOCKSIZE = 256  # bitsandbytes quantizes the absmax vector in blocks of 256

# bitsandbytes' NF4 table (QLoRA normal-float quantiles), in code order = value order.
NF4_CODE = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
# bitsandbytes' FP4 (1 sign, 2 exponent, 1 mantissa bit, bias 2) in bit-pattern order; divided by 12 below.
_FP4_RAW = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)
# Code indices in ascending value order, exactly as bitsandbytes gets them from an (unstable)
# torch.argsort of the FP4 table. The tie between +0 (code 0) and -0 (code 8) is resolved as
# [..., 0, 8, ...], so tiny positive values get code 8 (-0) and tiny negative ones code 0 (+0).
_FP4_ORDER = (11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3)


@functools.cache
def code_table(quant_type: str) -> torch.Tensor:
    """The 16 fp32 code values of ``nf4`` or ``fp4``, indexed by code (CPU tensor, do not modify)."""
    if quant_type == "nf4":
        return torch.tensor(NF4_CODE, dtype=torch.float32)
    if quant_type == "fp4":
        raw = torch.tensor(_FP4_RAW, dtype=torch.float32)
        return raw / raw.abs().max()  # fp32 division, as bitsandbytes normalizes
    raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")


@functools.cache
def _bounds_and_order(quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Midpoints between sorted code values (fp32) and sorted position -> code index."""
    code = code_table(quant_type)
    order = torch.arange(16) if quant_type == "nf4" else torch.tensor(_FP4_ORDER)
    ordered = code[order]
    return (ordered[:-1] + ordered[1:]) / 2, order


@functools.cache
def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (``create_dynamic_map()``): 256 sorted fp32 values.

    A dynamic exponent (powers of ten from 1e-6 to 1) with a linear fraction whose width shrinks as
    the exponent grows; ends at exactly 0 and 1 but its most negative value is ~-0.993, not -1.
    """
    max_exponent_bits, non_sign_bits = 7, 7
    data: list[float] = []
    for i in range(max_exponent_bits):
        fraction_items = 2 ** (i + non_sign_bits - max_exponent_bits) + 1
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        # Same fp32 arithmetic as bitsandbytes (python scalar times fp32 tensor).
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data += [0.0, 1.0]
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


@dataclass
class Bnb4State:
    """Everything besides the packed codes needed to dequantize (bitsandbytes' ``QuantState``)."""

    quant_type: str
    blocksize: int
    shape: torch.Size
    absmax: torch.Tensor  # fp32 [n_blocks]; uint8 codes of (absmax - offset) when nested
    offset: torch.Tensor | None = None  # fp32 scalar: mean of the absmax vector (nested only)
    nested_absmax: torch.Tensor | None = None  # fp32 [ceil(n_blocks / 256)] (nested only)

    @property
    def nested(self) -> bool:
        return self.nested_absmax is not None


def n_blocks(numel: int, blocksize: int) -> int:
    return -(-numel // blocksize)


def _scale_blocks(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 absmax per block and the values scaled into [-1, 1], bitsandbytes' default-backend math."""
    n = flat.numel()
    rem = n % blocksize
    full = n - rem
    blocks = flat[:full].reshape(full // blocksize, blocksize)
    absmax = blocks.abs().amax(dim=-1)
    # Full blocks: multiply by the fp32 reciprocal (an all-zero block keeps absmax 0, the
    # reciprocal uses a 1e-38 floor) ...
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    if rem:
        # ... the last partial block divides instead, and its stored absmax is floored at 1e-38.
        tail_max = flat[full:].abs().amax().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max.unsqueeze(0)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / tail_max, -1, 1)])
    return absmax, scaled


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [n] (n even) -> bytes [n/2]: element 2i in the high nibble, 2i+1 in the low one."""
    return (codes[0::2] << 4) | codes[1::2]


def unpack_nibbles(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: bytes -> the first ``numel`` codes (uint8)."""
    flat = packed.reshape(-1)
    return torch.stack((flat >> 4, flat & 0x0F), dim=-1).reshape(-1)[:numel]


@functools.cache
def _pair_table(quant_type: str) -> torch.Tensor:
    """[256, 2] fp32: the two code values a packed byte stands for (high nibble first).

    Looking bytes up directly halves the gather work and skips unpacking when dequantizing.
    """
    code = code_table(quant_type)
    byte = torch.arange(256)
    return torch.stack((code[byte >> 4], code[byte & 0x0F]), dim=-1)


@functools.cache
def _dynamic_lut() -> torch.Tensor:
    """65536-entry table: grid point ``g_k = 2k/65535 - 1`` (fp32) -> count of map midpoints below it.

    bitsandbytes' CPU kernel does not search the map per value: it rounds the scaled value to this
    16-bit grid and looks the code up, so a value within ~1.5e-5 of a midpoint may get the farther
    code. We rebuild the same table to get the same codes.
    """
    code = dynamic_map()
    mids = (code[:-1] + code[1:]) * 0.5
    k = torch.arange(65536, dtype=torch.float32)
    grid = (k + k) / 65535.0 - 1.0  # fp32 ops in the kernel's order
    return torch.searchsorted(mids, grid, right=False).to(torch.uint8)  # strict: a tie keeps the lower code


def quantize_blockwise_8bit(
    x: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a float vector to the dynamic 8-bit map in blocks: (uint8 codes, fp32 absmax per block).

    Mirrors bitsandbytes' native CPU kernel (used for the nested absmax): ``v = x * (1/absmax)`` in
    fp32, clamped to [-1, 1]; grid index ``trunc(fp32(fma(fp32((1 + v) * 0.5), 65535, 0.5)))``; code
    from :func:`_dynamic_lut`. An all-zero block gets absmax 0 and codes 0.
    """
    flat = x.reshape(-1).float()
    n = flat.numel()
    nb = n_blocks(n, blocksize)
    blocks = torch.nn.functional.pad(flat, (0, nb * blocksize - n)).reshape(nb, blocksize)
    absmax = blocks.abs().amax(dim=-1)
    # One fp32 reciprocal per block, then a multiply; all-zero blocks are overwritten below.
    inv = torch.where(absmax == 0, torch.zeros_like(absmax), 1.0 / absmax)
    v = torch.clamp(blocks * inv.view(-1, 1), -1.0, 1.0)
    t = (1.0 + v) * 0.5  # fp32
    # The fused multiply-add rounds once: t * 65535 + 0.5 is exact in float64 whenever it can matter
    # (t >= 2**-13; below that every grid index maps to code 0), then one rounding to fp32.
    grid_index = (t.double() * 65535.0 + 0.5).float().trunc().long()
    codes = _dynamic_lut().to(x.device)[grid_index]
    codes = torch.where((absmax == 0).view(-1, 1), torch.zeros_like(codes), codes)
    return codes.reshape(-1)[:n], absmax


def dequantize_blockwise_8bit(
    codes: torch.Tensor, absmax: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE
) -> torch.Tensor:
    """fp32 values from dynamic-map codes: ``map[code] * absmax[block]``."""
    values = dynamic_map().to(codes.device)[codes.reshape(-1).long()]
    return _times_block_absmax(values, absmax, blocksize)


def _times_block_absmax(values: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """fp32 ``values[i] * absmax[i // blocksize]`` (one rounding, as the kernels do)."""
    n = values.numel()
    nb = absmax.numel()
    if n == nb * blocksize:
        return (values.view(nb, blocksize) * absmax.float().view(-1, 1)).view(-1)
    padded = torch.nn.functional.pad(values, (0, nb * blocksize - n))
    return (padded.view(nb, blocksize) * absmax.float().view(-1, 1)).view(-1)[:n]


def quantize_4bit(
    w: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64, compress_statistics: bool = False
) -> tuple[torch.Tensor, Bnb4State]:
    """Quantize any-shaped fp32/fp16/bf16 ``w`` to packed 4-bit codes ``uint8 [ceil(numel/2)]`` and state.

    ``compress_statistics`` is double quantization: the absmax vector is stored as 8-bit codes plus a
    second-level fp32 absmax per 256 blocks and the fp32 mean ``offset``.
    """
    if blocksize not in BLOCK_SIZES:
        raise ValueError(f"blocksize must be one of {BLOCK_SIZES}, got {blocksize}")
    if w.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"4-bit quantization needs a float16/bfloat16/float32 tensor, got {w.dtype}")
    bounds, order = _bounds_and_order(quant_type)
    absmax, scaled = _scale_blocks(w.detach().reshape(-1).float(), blocksize)
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))  # odd size: the pad nibble is the code of 0.0
    # bucketize (right=False): a value exactly on a midpoint goes to the lower code value.
    sorted_pos = torch.bucketize(scaled, bounds.to(w.device))
    # NF4 codes are already in value order; FP4 maps sorted position -> bit pattern.
    codes = (sorted_pos if quant_type == "nf4" else order.to(w.device)[sorted_pos]).to(torch.uint8)
    packed = pack_nibbles(codes)
    state = Bnb4State(quant_type, blocksize, w.shape, absmax)
    if compress_statistics:
        offset = absmax.mean()
        state.absmax, state.nested_absmax = quantize_blockwise_8bit(absmax - offset, NESTED_BLOCKSIZE)
        state.offset = offset
    return packed, state


def block_absmax(state: Bnb4State) -> torch.Tensor:
    """The fp32 absmax per block, undoing double quantization if used."""
    if not state.nested:
        return state.absmax.float()
    assert state.offset is not None and state.nested_absmax is not None
    return dequantize_blockwise_8bit(state.absmax, state.nested_absmax, NESTED_BLOCKSIZE) + state.offset


def dequantize_4bit(
    packed: torch.Tensor, state: Bnb4State, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Float tensor of ``state.shape``: ``code[q] * absmax[block]`` in fp32, rounded once to ``dtype``."""
    numel = 1
    for size in state.shape:
        numel *= size
    values = _pair_table(state.quant_type).to(packed.device)[packed.reshape(-1).long()].view(-1)[:numel]
    return _times_block_absmax(values, block_absmax(state), state.blocksize).to(dtype).reshape(state.shape)


class Bnb4Linear(QuantLinear):
    """Weight-only NF4/FP4 Linear. Buffers: ``qweight`` (packed codes of the flattened weight),
    ``absmax`` (fp32, or uint8 with ``dq``), and with ``dq`` also ``nested_absmax`` and ``offset``."""

    method = "bnb4"

    def __init__(self, in_features: int, out_features: int, bias: bool, config: QuantConfig) -> None:
        super().__init__(in_features, out_features, bias, config)
        self.quant_type = config.method
        self.blocksize = int(config["block"])
        self.double_quant = bool(config["dq"])
        numel = in_features * out_features
        nb = n_blocks(numel, self.blocksize)
        self.register_buffer("qweight", torch.zeros((numel + 1) // 2, dtype=torch.uint8))
        if self.double_quant:
            self.register_buffer("absmax", torch.zeros(nb, dtype=torch.uint8))
            self.register_buffer(
                "nested_absmax", torch.zeros(n_blocks(nb, NESTED_BLOCKSIZE), dtype=torch.float32)
            )
            self.register_buffer("offset", torch.zeros((), dtype=torch.float32))
        else:
            self.register_buffer("absmax", torch.zeros(nb, dtype=torch.float32))
            self.nested_absmax = None
            self.offset = None

    @classmethod
    def supports(cls, linear: nn.Linear, config: QuantConfig) -> str | None:
        # Blocks run over the flattened weight, so every shape works; only an empty one cannot.
        if linear.weight.numel() == 0:
            return "empty weight"
        return None

    def state(self) -> Bnb4State:
        return Bnb4State(
            self.quant_type,
            self.blocksize,
            torch.Size((self.out_features, self.in_features)),
            self.row_major("absmax"),
            self.offset,
            self.nested_absmax,
        )

    def _quantize_from(self, weight: torch.Tensor) -> None:
        packed, state = quantize_4bit(weight, self.quant_type, self.blocksize, self.double_quant)
        self.qweight.copy_(packed)
        self.absmax.copy_(state.absmax)
        if self.double_quant:
            assert state.nested_absmax is not None and state.offset is not None
            self.nested_absmax.copy_(state.nested_absmax)
            self.offset.copy_(state.offset)

    def dequantize(self) -> torch.Tensor:
        return dequantize_4bit(self.row_major("qweight"), self.state(), self.compute_dtype)


def _options() -> dict[str, Option]:
    return {
        **COMMON_OPTIONS,
        "block": Option(int, 64, choices=BLOCK_SIZES, help="values per absmax block of the flattened weight"),
        "dq": Option(bool, False, help="double quantization: absmax to 8 bits in blocks of 256 (QLoRA)"),
        "compute": compute_option("bf16"),
    }


_ALIASES = {"blocksize": "block", "block_size": "block", "double_quant": "dq", "compress_statistics": "dq"}

NF4 = Method(
    name="nf4",
    options=_options(),
    linear_cls=Bnb4Linear,
    description="bitsandbytes/QLoRA NF4 weight-only 4-bit, block absmax (bit-exact to bitsandbytes)",
    flags={"nodq": ("dq", False)},
    aliases=_ALIASES,
    bits=4,
)

FP4 = Method(
    name="fp4",
    options=_options(),
    linear_cls=Bnb4Linear,
    description="bitsandbytes FP4 (e2m1) weight-only 4-bit, block absmax (bit-exact to bitsandbytes)",
    flags={"nodq": ("dq", False)},
    aliases=_ALIASES,
    bits=4,
)

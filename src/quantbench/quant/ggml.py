"""llama.cpp (GGML) block formats: the registry of types and the one ``QuantLinear`` they all use.

A GGML type cuts every row of a weight into blocks of ``block_size`` consecutive input columns and
stores each block as ``type_size`` bytes (its scales and codes, interleaved as the C struct lays them
out). ``GGMLLinear`` keeps exactly those bytes in one uint8 buffer ``blocks`` of shape
``[out_features, in_features // block_size * type_size]``: row ``r`` of it is llama.cpp's data for
row ``r`` of the weight, and the whole buffer, read row after row, is the tensor's data in a GGUF file
(GGUF's ``ne = [in_features, out_features]``). Export is therefore a byte copy, and "the same codes as
llama.cpp" is byte equality.

Each type is a :class:`GGMLFormat` in :data:`FORMATS`: its sizes (taken from ``gguf``'s table, so they
cannot disagree with the file format) and two pure functions, ``quantize(weight [rows, cols] float)
-> uint8 [rows, cols / block_size * type_size]`` and ``dequantize(bytes) -> float32 [rows, cols]``.
A file of formats (``ggml_legacy.py``: q8_0, q4_0, q4_1, q5_0, q5_1) registers them at import with
:func:`register_format` and makes its spec names with :func:`ggml_method`::

    register_format(GGMLQuantizationType.Q4_0, quantize_q4_0, dequantize_q4_0)
    Q4_0 = ggml_method("q4_0", GGMLQuantizationType.Q4_0, "llama.cpp Q4_0 ...")

A layer of any registered type can also be built directly, whatever the method spec says (for a
per-tensor mix that picks the type layer by layer): ``GGMLLinear.from_linear(linear, config,
ggml_type=GGMLQuantizationType.Q6_K)`` or the empty skeleton ``GGMLLinear(in, out, bias, config,
ggml_type=...)``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from torch import nn

from quantbench.quant.base import Method, QuantLinear, kernel_forward
from quantbench.quant.config import COMMON_OPTIONS, QuantConfig, compute_option

QuantizeFn = Callable[[torch.Tensor], torch.Tensor]
DequantizeFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class GGMLFormat:
    """One registered GGML type: its block geometry and its torch quantize / dequantize functions."""

    ggml_type: GGMLQuantizationType
    block_size: int  # weights per block (along a row)
    type_size: int  # bytes per block
    quantize: QuantizeFn  # float [rows, cols] -> uint8 [rows, cols // block_size * type_size]
    dequantize: DequantizeFn  # uint8 [rows, n_blocks * type_size] -> float32 [rows, n_blocks * block_size]

    @property
    def name(self) -> str:
        return self.ggml_type.name

    @property
    def bits_per_weight(self) -> float:
        """Storage per weight, scales included (q4_0: 18 bytes per 32 weights = 4.5)."""
        return 8.0 * self.type_size / self.block_size

    def row_bytes(self, in_features: int) -> int:
        """Bytes of one quantized row of ``in_features`` weights (a multiple of ``block_size``)."""
        return in_features // self.block_size * self.type_size

    def unsupported(self, in_features: int) -> str | None:
        """Why a row of ``in_features`` weights cannot be stored in this type, or None."""
        if in_features <= 0 or in_features % self.block_size:
            return (
                f"in_features {in_features} is not a multiple of {self.name}'s block size {self.block_size} "
                "(llama.cpp stores whole blocks per row)"
            )
        return None


# Every registered type. Filled at import by the files that implement formats (ggml_legacy.py, ...).
FORMATS: dict[GGMLQuantizationType, GGMLFormat] = {}
# Spec name -> the type its layers use (filled by ggml_method).
METHOD_TYPES: dict[str, GGMLQuantizationType] = {}


def register_format(
    ggml_type: GGMLQuantizationType, quantize: QuantizeFn, dequantize: DequantizeFn
) -> GGMLFormat:
    """Add ``ggml_type`` to :data:`FORMATS` with its two functions; block and byte sizes come from gguf.

    ``quantize`` must return exactly llama.cpp's bytes for each row (see the module docstring for the
    shapes). Registering a type twice is an error, so two files cannot silently disagree about one type.
    """
    ggml_type = GGMLQuantizationType(ggml_type)
    if ggml_type in FORMATS:
        raise ValueError(f"GGML type {ggml_type.name} is already registered")
    block_size, type_size = GGML_QUANT_SIZES[ggml_type]
    fmt = GGMLFormat(ggml_type, block_size, type_size, quantize, dequantize)
    FORMATS[ggml_type] = fmt
    return fmt


def ggml_format(ggml_type: GGMLQuantizationType | str) -> GGMLFormat:
    """The registered format of a type, given as the enum or its name (``"Q4_0"``, ``"q4_0"``)."""
    try:
        key = (
            GGMLQuantizationType[ggml_type.upper()]
            if isinstance(ggml_type, str)
            else GGMLQuantizationType(ggml_type)
        )
    except (KeyError, ValueError):
        key = None
    if key is None or key not in FORMATS:
        known = ", ".join(t.name for t in FORMATS)
        raise ValueError(f"GGML type {ggml_type!r} has no quantbench implementation; registered: {known}")
    return FORMATS[key]


def random_blocks(
    ggml_type: GGMLQuantizationType | str,
    rows: int,
    in_features: int,
    std: float = 0.02,
    seed: int = 0,
    pool: int = 256,
) -> torch.Tensor:
    """llama.cpp blocks ``uint8 [rows, row_bytes]`` of a random weight, for timing runs and tests of large
    layers: every block is drawn (by ``seed``) from ``pool`` blocks of normal weights (standard deviation
    ``std``) quantized once per (type, std, pool) and kept, so a model of any size costs one small quantizer
    run per type (the k-quant quantizers take seconds per million weights on a CPU). Blocks repeat, so
    rows are not independent weights."""
    fmt = ggml_format(ggml_type)
    reason = fmt.unsupported(in_features)
    if reason is not None:
        raise ValueError(reason)
    blocks = _block_pool(fmt.ggml_type, float(std), pool)
    n_blocks = in_features // fmt.block_size
    pick = torch.randint(0, pool, (rows, n_blocks), generator=torch.Generator().manual_seed(seed))
    return blocks[pick].reshape(rows, n_blocks * fmt.type_size)


@functools.lru_cache(maxsize=32)
def _block_pool(ggml_type: GGMLQuantizationType, std: float, pool: int) -> torch.Tensor:
    fmt = FORMATS[ggml_type]
    weight = torch.randn(pool, fmt.block_size, generator=torch.Generator().manual_seed(0)) * std
    return fmt.quantize(weight)  # [pool, type_size]: one block per row


def method_type(method: str) -> GGMLQuantizationType:
    """The GGML type of a spec name made by :func:`ggml_method`."""
    if method not in METHOD_TYPES:
        raise ValueError(f"method {method!r} is not a GGML method; GGML methods: {', '.join(METHOD_TYPES)}")
    return METHOD_TYPES[method]


class GGMLLinear(QuantLinear):
    """A Linear whose weight is one GGML type's blocks, byte for byte as llama.cpp stores them.

    Buffer ``blocks``: uint8 ``[out_features, in_features // block_size * type_size]``. The type is
    ``ggml_type`` when given, else the one the config's method names (:data:`METHOD_TYPES`). On CPU the
    forward is the base class's reference (dequantize, dense matmul in the compute dtype). On CUDA the
    engine's Triton kernels run it (registered through ``base.kernel_forward``): they read a copy of the
    blocks converted once into their own form, with the same float32 weights.
    """

    method = "ggml"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        config: QuantConfig,
        ggml_type: GGMLQuantizationType | str | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, config)
        self.format = ggml_format(method_type(config.method) if ggml_type is None else ggml_type)
        reason = self.format.unsupported(in_features)
        if reason is not None:
            raise ValueError(reason)
        self.register_buffer(
            "blocks", torch.zeros(out_features, self.format.row_bytes(in_features), dtype=torch.uint8)
        )

    @property
    def ggml_type(self) -> GGMLQuantizationType:
        return self.format.ggml_type

    @classmethod
    def supports(cls, linear: nn.Linear, config: QuantConfig) -> str | None:
        if config.method not in METHOD_TYPES:
            return None  # a mix (ggml_mix.py) picks each layer's type, with llama.cpp's fallbacks
        return ggml_format(method_type(config.method)).unsupported(linear.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:  # kernels where registered (base.kernel_forward); None = not handled
            out = kernel_forward(self, x)
            if out is not None:
                return out
        return super().forward(x)

    def _forget_converted(self) -> None:
        # The kernels' form of the blocks is a converted copy (not a view), cached on the module: drop it
        # when the blocks change in place.
        self.__dict__.pop("_qb_layout", None)

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        self._forget_converted()
        super()._load_from_state_dict(*args, **kwargs)

    def _quantize_from(self, weight: torch.Tensor) -> None:
        self._forget_converted()
        # Always on the CPU: llama.cpp's reference quantizers are bit-exact against CPU float32
        # arithmetic, while GPU kernels may compute a division by a constant as a multiplication by
        # its reciprocal, which changes the last bit of a scale and so, at times, a code.
        blocks = self.format.quantize(weight.detach().to("cpu", torch.float32))
        self.blocks.copy_(blocks)

    def dequantize(self) -> torch.Tensor:
        return self.format.dequantize(self.row_major("blocks")).to(self.compute_dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ggml_type={self.format.name}"


def ggml_method(name: str, ggml_type: GGMLQuantizationType, description: str) -> Method:
    """The :class:`Method` entry of a spec name whose layers all use one registered type.

    Records ``name -> ggml_type`` in :data:`METHOD_TYPES` (how a ``GGMLLinear`` built from a config,
    e.g. the empty skeleton a checkpoint load makes, finds its type). Options: ``skip`` and ``compute``,
    fp16 by default: the format's scales are fp16, and llama.cpp's CUDA backend also converts quantized
    weights to fp16 for its cuBLAS matmuls.
    """
    fmt = ggml_format(ggml_type)
    if METHOD_TYPES.get(name, fmt.ggml_type) != fmt.ggml_type:
        raise ValueError(f"method {name!r} already names GGML type {METHOD_TYPES[name].name}")
    METHOD_TYPES[name] = fmt.ggml_type
    return Method(
        name=name,
        options={**COMMON_OPTIONS, "compute": compute_option("fp16")},
        linear_cls=GGMLLinear,
        description=description,
        bits=fmt.bits_per_weight,
    )

"""The GPTQ and AWQ (GEMM) tensor layouts that transformers / vLLM load, as pure functions of a quantized
layer: packing and unpacking codes and zero points (whole checkpoints are exported and imported by
:mod:`quantbench.checkpoint_export`).

GPTQ (``checkpoint_format: gptq``, as AutoGPTQ / GPTQModel / optimum write it), per quantized Linear:

* ``qweight`` int32 ``[in * bits / 32, out]``: codes packed along the *input* dimension,
  input row ``i * (32/bits) + j`` in bits ``bits*j ..`` of word row ``i`` (bits 2, 4, 8);
* ``qzeros`` int32 ``[n_groups, out * bits / 32]``: zero points minus one (the v1 convention),
  packed along the output dimension the same way;
* ``scales`` fp16 ``[n_groups, out]``; ``g_idx`` int32 ``[in]`` (group of each input column);
* ``quantization_config`` in ``config.json`` and the same dict in ``quantize_config.json``.

AWQ GEMM (``quant_method: awq, version: gemm``, as AutoAWQ writes it), 4-bit only:

* ``qweight`` int32 ``[in, out / 8]`` and ``qzeros`` int32 ``[n_groups, out / 8]``: eight output
  columns per word in AWQ's interleaved order: nibble ``i`` holds column ``[0, 2, 4, 6, 1, 3, 5, 7][i]``;
* ``scales`` fp16 ``[n_groups, out]``; zero points stored as they are; no ``g_idx``.

Both are written from RTN's layout (codes, fp16 scales, optional zeros, optional ``g_idx``), so any
``int4``/``int8``/``gptq``/``awq`` checkpoint exports. The original spec rides along in
``quantization_config["quantbench"]`` so that import restores it exactly.

``compressed-tensors`` (llm-compressor's format, served by vLLM) is written and read by
:mod:`quantbench.quant.ct_format`; it also takes ``smoothquant`` (int8 W8A8) and ``fp8`` checkpoints.
"""

from __future__ import annotations

from typing import Any

import torch

from quantbench.errors import CheckpointError
from quantbench.quant.rtn import RTNLinear

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of a word holds column AWQ_ORDER[i] of its 8


# --------------------------------------------------------------------------------------------------
# Packing


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2**32) -> int32 with the same bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _to_uint(words: torch.Tensor) -> torch.Tensor:
    return words.to(torch.int64) & 0xFFFFFFFF


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """GPTQ packing along dim 0: ``[n, m]`` codes -> int32 ``[n * bits / 32, m]``."""
    per = 32 // bits
    n, m = values.shape
    if 32 % bits or n % per:
        raise CheckpointError(f"cannot pack {n} rows of {bits}-bit codes into 32-bit words")
    v = values.to(torch.int64).reshape(n // per, per, m)
    shifts = (torch.arange(per, dtype=torch.int64) * bits).view(1, per, 1)
    return _to_int32((v << shifts).sum(dim=1))


def unpack_rows(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_rows`: int32 ``[r, m]`` -> int64 codes ``[r * 32 / bits, m]``."""
    per = 32 // bits
    w = _to_uint(words).unsqueeze(1)
    shifts = (torch.arange(per, dtype=torch.int64) * bits).view(1, per, 1)
    return ((w >> shifts) & (2**bits - 1)).reshape(-1, words.shape[1])


def pack_cols(values: torch.Tensor, bits: int) -> torch.Tensor:
    """GPTQ packing along dim 1 (``qzeros``): ``[n, m]`` -> int32 ``[n, m * bits / 32]``."""
    return pack_rows(values.t(), bits).t().contiguous()


def unpack_cols(words: torch.Tensor, bits: int) -> torch.Tensor:
    return unpack_rows(words.t(), bits).t().contiguous()


def pack_awq(values: torch.Tensor) -> torch.Tensor:
    """AWQ GEMM packing: 4-bit ``[n, m]`` -> int32 ``[n, m / 8]`` in the interleaved order."""
    n, m = values.shape
    if m % 8:
        raise CheckpointError(f"AWQ packing needs a multiple of 8 output columns, got {m}")
    v = values.to(torch.int64).reshape(n, m // 8, 8)[:, :, list(AWQ_ORDER)]
    shifts = (torch.arange(8, dtype=torch.int64) * 4).view(1, 1, 8)
    return _to_int32((v << shifts).sum(dim=-1))


def unpack_awq(words: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_awq`: int32 ``[n, m / 8]`` -> int64 codes ``[n, m]``."""
    n, cols = words.shape
    shifts = (torch.arange(8, dtype=torch.int64) * 4).view(1, 1, 8)
    nibbles = (_to_uint(words).unsqueeze(-1) >> shifts) & 0xF  # nibble i = column AWQ_ORDER[i]
    out = torch.empty_like(nibbles)
    out[:, :, list(AWQ_ORDER)] = nibbles
    return out.reshape(n, cols * 8)


# --------------------------------------------------------------------------------------------------
# One layer <-> format tensors


def layer_parts(module: RTNLinear) -> dict[str, Any]:
    """Codes ``[out, in]``, scales/zeros ``[out, n_groups]`` (zeros filled in when symmetric), g_idx."""
    codes = module.codes().to(torch.int64)
    if module.bits == 4:
        codes = codes[:, : module.in_features]
    scales = module.scales.detach().to(torch.float16)
    if module.qzeros is None:
        zeros = torch.full(scales.shape, 2 ** (module.bits - 1), dtype=torch.int64)
    else:
        zeros = module.qzeros.to(torch.int64)
    g_idx = getattr(module, "g_idx", None)
    if g_idx is None:
        g_idx = torch.arange(module.in_features, dtype=torch.int32) // module.group
    return {
        "codes": codes,
        "scales": scales,
        "zeros": zeros,
        "g_idx": g_idx.to(torch.int32),
        "bits": module.bits,
    }


def gptq_tensors(module: RTNLinear) -> dict[str, torch.Tensor]:
    parts = layer_parts(module)
    bits = parts["bits"]
    if bits not in (2, 4, 8):
        raise CheckpointError(f"GPTQ export supports 2/4/8-bit codes, this layer has {bits}")
    if bool((parts["zeros"] == 0).any()):
        raise CheckpointError(
            "a zero point is 0, which the GPTQ v1 format (zeros stored minus one) cannot hold"
        )
    return {
        "qweight": pack_rows(parts["codes"].t(), bits),
        "qzeros": pack_cols(parts["zeros"].t() - 1, bits),
        "scales": parts["scales"].t().contiguous(),
        "g_idx": parts["g_idx"],
    }


def awq_tensors(module: RTNLinear) -> dict[str, torch.Tensor]:
    parts = layer_parts(module)
    if parts["bits"] != 4:
        raise CheckpointError(f"AWQ GEMM export needs 4-bit codes, this layer has {parts['bits']}")
    if getattr(module, "g_idx", None) is not None:
        trivial = torch.arange(module.in_features, device=module.g_idx.device) // module.group
        if not torch.equal(module.g_idx.long(), trivial):
            raise CheckpointError(
                "AWQ format has no g_idx: export act_order GPTQ checkpoints with --format gptq"
            )
    return {
        "qweight": pack_awq(parts["codes"].t()),
        "qzeros": pack_awq(parts["zeros"].t()),
        "scales": parts["scales"].t().contiguous(),
    }

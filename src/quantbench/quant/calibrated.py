"""What the calibrated methods (GPTQ, AWQ, SmoothQuant) share: a ``Method`` with a model-level hook,
and the driver that prepares calibration data and walks the decoder blocks.

``quantize(model, "gptq", calib="corpus:128x2048", tokenizer=tok)`` reaches
:func:`calibrated_quantize` through ``Method.quantize_model``. Keyword arguments:

* ``calib``: a spec string (see :mod:`quantbench.quant.calib`), a :class:`CalibData`, or token ids
  ``[n, L]``; default: the project corpus, 128 x 2048 tokens (scaled down on a CPU).
* ``tokenizer``: needed when ``calib`` is text.
* ``device``: where blocks run (default: where the model is); a CPU model with ``device="cuda"``
  moves one block at a time to the GPU.
* ``batch_size``: samples per block forward (default: 4096 tokens' worth).
* ``log``: a callable taking one line of progress (default: the ``quantbench`` logger).

Linears outside the decoder blocks (e.g. ``lm_head`` with ``skip=none``) get the method's
uncalibrated fallback (``linear_cls.from_linear``) and the log says so.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from quantbench.quant.base import Method
from quantbench.quant.blocks import (
    BlockContext,
    decoder_layers,
    layers_prefix,
    quantize_blocks,
    set_submodule,
)
from quantbench.quant.calib import prepare_calibration
from quantbench.quant.config import QuantConfig

logger = logging.getLogger("quantbench")
BATCH_TOKENS = 4096


@dataclass(frozen=True)
class CalibratedMethod(Method):
    """A method that needs calibration data; ``quantize_model(model, config, targets, **kwargs)``
    replaces the target Linears itself and returns ``{name: new module}``."""

    quantize_model: Callable[..., dict[str, nn.Module]] | None = None


def calibrated_quantize(
    model: nn.Module,
    config: QuantConfig,
    targets: dict[str, nn.Linear],
    process_block: Callable[[BlockContext], dict[str, nn.Module]],
    stats: dict[str, Any] | None = None,
    calib: Any = None,
    tokenizer: Any = None,
    device: str | torch.device | None = None,
    batch_size: int | None = None,
    log: Callable[[str], None] | None = None,
    float_inputs: bool = False,
    **_: Any,
) -> dict[str, nn.Module]:
    from quantbench.quant import METHODS

    say = log or logger.info
    start = time.perf_counter()
    data = prepare_calibration(calib, model, tokenizer)
    for note in data.notes:
        say(note)
    say(f"{config.method}: calibration {data.describe()}")
    batch = batch_size or max(1, BATCH_TOKENS // max(1, data.seq_len))
    layers = decoder_layers(model)
    prefix = layers_prefix(model, layers) + "."
    in_blocks = {n: m for n, m in targets.items() if n.startswith(prefix)}
    outside = {n: m for n, m in targets.items() if not n.startswith(prefix)}
    was_training = model.training
    model.eval()
    replaced = quantize_blocks(
        model, data.input_ids, in_blocks, process_block, device, batch, say, float_inputs
    )
    linear_cls = METHODS[config.method].linear_cls
    assert linear_cls is not None
    for name, linear in outside.items():
        new = linear_cls.from_linear(linear, config)
        set_submodule(model, name, new)
        replaced[name] = new
        say(f"{name}: outside the decoder blocks, quantized without calibration")
    model.train(was_training)
    elapsed = time.perf_counter() - start
    say(f"{config.method}: {len(replaced)} layers quantized in {elapsed:.1f}s")
    record: dict[str, Any] = {"calibration": data.to_dict(), "seconds": round(elapsed, 2)}
    for key, value in (stats or {}).items():
        if isinstance(value, (int, float, str, bool)):
            record[key] = round(value, 3) if isinstance(value, float) else value
    model.quantbench_calibration = record
    source = dict(getattr(model, "quantbench_source", {}) or {})
    source["calibration"] = record
    model.quantbench_source = source
    return replaced

"""Run a model one decoder block at a time on calibration data (the engine behind GPTQ/AWQ/SmoothQuant).

1. :func:`capture_inputs` runs the embedding on every calibration sample and stops at the first
   decoder block (a pre-hook raises), keeping the block inputs ``[n, L, d]``. One sample also runs
   through every block once to record each block's keyword arguments (rotary embeddings, masks:
   these differ per block in models that mix sliding and full attention).
2. For each block a method collects what it needs with forward hooks (:func:`run_block`), replaces
   the block's Linears with quantized ones, and the block's *quantized* outputs become the next
   block's inputs.

Peak memory is one block's working set plus the activations ``2 x n x L x d`` (and, when the model
lives on the CPU and ``device`` is a GPU, only the current block is moved to the GPU).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from quantbench.errors import QuantConfigError


@contextmanager
def cpu_single_thread(device: torch.device) -> Iterator[None]:
    """Run thousands of small or elementwise ops on one thread: on a small or busy CPU the OpenMP
    barrier waits of two threads cost far more than they save (measured 2-70x slower here). Large
    matmuls elsewhere keep every thread."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class _Stop(Exception):
    """Raised by a hook to end a forward pass early."""


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder blocks (``model.model.layers`` for Llama/Qwen/Mistral/Gemma)."""
    config = getattr(model, "config", None)
    text_config = getattr(config, "text_config", None) or config
    n_layers = getattr(text_config, "num_hidden_layers", None)
    for path in ("model.layers", "model.language_model.layers", "transformer.h", "model.decoder.layers"):
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(module, nn.ModuleList):
            return module
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            return module
    raise QuantConfigError(f"cannot find the decoder blocks of {type(model).__name__}")


def layers_prefix(model: nn.Module, layers: nn.ModuleList) -> str:
    for name, module in model.named_modules():
        if module is layers:
            return name
    raise ValueError("layers not in model")


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


@dataclass
class BlockInputs:
    """Inputs of the current block: hidden states in batches, and each block's keyword arguments."""

    hidden: list[torch.Tensor]  # batches [b, L, d]
    layer_kwargs: list[dict[str, Any]]
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        return sum(h.shape[0] * h.shape[1] for h in self.hidden)


@torch.no_grad()
def capture_inputs(model: nn.Module, input_ids: torch.Tensor, device: torch.device) -> BlockInputs:
    """Catch the first block's inputs for every sample, and every block's kwargs (one sample).

    Samples go through one at a time, so the recorded kwargs (masks, rotary tables) have batch
    size 1 and broadcast over any batch later."""
    layers = decoder_layers(model)
    n_layers = len(layers)
    # Blocks of one kind (no sliding/full mix) all get the same kwargs: stop at the first block.
    config = getattr(model, "config", None)
    kinds = getattr(getattr(config, "text_config", None) or config, "layer_types", None)
    stop_at = 0 if not kinds or len(set(kinds)) == 1 else n_layers - 1
    hidden: list[torch.Tensor] = []
    layer_kwargs: list[dict[str, Any]] = [{} for _ in range(n_layers)]
    record_all = {"on": True}

    def make_hook(index: int) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if index == 0:
                hidden_states = args[0] if args else kwargs["hidden_states"]
                hidden.append(hidden_states.detach())
            if record_all["on"]:
                kept = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                kept["use_cache"] = False
                for key in ("past_key_value", "past_key_values", "cache"):
                    if key in kept:
                        kept[key] = None
                layer_kwargs[index] = kept
            if index == stop_at or not record_all["on"]:
                if stop_at == 0:
                    for i in range(1, n_layers):
                        layer_kwargs[i] = layer_kwargs[0]
                raise _Stop

        return hook

    handles = [
        layer.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, layer in enumerate(layers)
    ]
    try:
        for start in range(input_ids.shape[0]):
            ids = input_ids[start : start + 1].to(device)
            record_all["on"] = start == 0
            try:
                model(input_ids=ids, use_cache=False)
            except _Stop:
                pass
    finally:
        for handle in handles:
            handle.remove()
    if not hidden:
        raise RuntimeError("the first decoder block was never called")
    return BlockInputs(hidden=hidden, layer_kwargs=layer_kwargs)


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def run_block(
    layer: nn.Module, hidden: list[torch.Tensor], kwargs: dict[str, Any], keep_outputs: bool = True
) -> list[torch.Tensor]:
    """Run ``layer`` on every batch; return the outputs (or ``[]``). A hook may raise ``_Stop`` to
    cut a batch short once it has what it needs."""
    outs: list[torch.Tensor] = []
    for h in hidden:
        try:
            out = _first(layer(h, **kwargs))
        except _Stop:
            continue
        if keep_outputs:
            outs.append(out)
    return outs


@contextmanager
def input_hooks(
    modules: dict[str, nn.Module],
    fn: Callable[[str, torch.Tensor], None],
    stop_after: set[str] | None = None,
) -> Iterator[None]:
    """Call ``fn(name, input_2d)`` on each module's input ``[tokens, in]``; when every module in
    ``stop_after`` has run in the current forward, raise ``_Stop`` to skip the rest of the block."""
    seen: set[str] = set()

    def make(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            fn(name, x.reshape(-1, x.shape[-1]))
            if stop_after is not None:
                seen.add(name)
                if stop_after <= seen:
                    seen.clear()
                    raise _Stop

        return hook

    handles = [m.register_forward_pre_hook(make(n)) for n, m in modules.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


# Linears fed by the same input, in forward order, for the architectures we know (Llama, Qwen2/3,
# Mistral, Gemma): the standard "true sequential" groups.
SEQUENTIAL_GROUPS: list[list[str]] = [
    ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    ["self_attn.o_proj"],
    ["mlp.gate_proj", "mlp.up_proj"],
    ["mlp.down_proj"],
]


def sequential_groups(names: list[str]) -> list[list[str]]:
    """Split a block's target Linear names (relative to the block) into groups that share an input,
    in forward order; names the table does not know come last, one group each."""
    remaining = list(names)
    groups: list[list[str]] = []
    for group in SEQUENTIAL_GROUPS:
        present = [n for n in group if n in remaining]
        if present:
            groups.append(present)
            for n in present:
                remaining.remove(n)
    groups.extend([n] for n in remaining)
    return groups


@dataclass
class BlockContext:
    """What a method's per-block function gets."""

    index: int
    layer: nn.Module
    inputs: BlockInputs
    kwargs: dict[str, Any]
    targets: dict[str, nn.Linear]  # relative name -> Linear to quantize
    device: torch.device
    log: Callable[[str], None]
    prefix: str  # full name of the block, e.g. "model.layers.3"


def quantize_blocks(
    model: nn.Module,
    input_ids: torch.Tensor,
    targets: dict[str, nn.Linear],
    process_block: Callable[[BlockContext], dict[str, nn.Module]],
    device: torch.device | str | None = None,
    batch_size: int = 1,
    log: Callable[[str], None] = print,
    float_inputs: bool = False,
) -> dict[str, nn.Module]:
    """Drive ``process_block`` over every decoder block; return {full name: new module} it made.

    ``process_block`` returns the replacements for (some of) ``ctx.targets`` (relative names); they
    are swapped in before the block is re-run to produce the next block's inputs (so each block
    calibrates on what the quantized blocks before it produce). With ``float_inputs`` the next
    block's inputs are the block's float outputs instead, computed before the swap (AutoAWQ's way).
    """
    layers = decoder_layers(model)
    prefix = layers_prefix(model, layers)
    home = next(model.parameters()).device
    dev = torch.device(device) if device is not None else home
    offload = dev != home
    use_cache = getattr(model.config, "use_cache", None)
    if use_cache is not None:
        model.config.use_cache = False
    replaced: dict[str, nn.Module] = {}
    start = time.perf_counter()
    # Everything outside the blocks (embeddings, rotary) goes to the device for the capture.
    outside = [m for m in model.children()]
    if offload:
        for m in outside:
            m.to(dev)
        for layer in layers:
            layer.to(home)
    try:
        inputs = capture_inputs(model, input_ids, dev)
    finally:
        if offload:
            model.to(home)
    # One concatenation, split into batch views (concatenating once per batch kept a full copy
    # alive per batch: 64 x 2 GiB for 128 x 2048 tokens of a 7B model).
    inputs.hidden = list(torch.cat(inputs.hidden).split(batch_size))
    log(
        f"captured block inputs: {len(input_ids)} x {input_ids.shape[1]} tokens ({time.perf_counter() - start:.1f}s)"
    )
    for index, layer in enumerate(layers):
        block_start = time.perf_counter()
        name = f"{prefix}.{index}"
        block_targets = {
            full[len(name) + 1 :]: mod for full, mod in targets.items() if full.startswith(name + ".")
        }
        if offload:
            layer.to(dev)
        kwargs = _to(inputs.layer_kwargs[index], dev)
        ctx = BlockContext(index, layer, inputs, kwargs, block_targets, dev, log, name)
        new_modules = process_block(ctx) if block_targets else {}
        if float_inputs:
            next_hidden = run_block(layer, inputs.hidden, kwargs)
        for rel, module in new_modules.items():
            set_submodule(layer, rel, module)
            replaced[f"{name}.{rel}"] = module
        inputs.hidden = next_hidden if float_inputs else run_block(layer, inputs.hidden, kwargs)
        if offload:
            layer.to(home)
        log(
            f"block {index + 1}/{len(layers)}: {len(new_modules)} layers ({time.perf_counter() - block_start:.1f}s)"
        )
    if use_cache is not None:
        model.config.use_cache = use_cache
    return replaced

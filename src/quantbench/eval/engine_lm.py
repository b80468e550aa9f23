"""Evaluation through quantbench's engine: the same requests, batches and answers as :class:`HFLM`, with the
forwards run by :class:`quantbench.engine.model.EngineModel` (fused q/k/v and gate/up products, the Triton
quantized-matmul kernels on CUDA, pure-torch reference ops on CPU) instead of the Hugging Face module.

:class:`EngineLM` is an :class:`HFLM`: planning, batching, choice scoring, greedy generation and the float32
logits rule are HFLM's; only the forwards differ.

* ``prefix_state``: the shared prefixes (a wave's few-shot prompts) run once, right-padded in one batch,
  and their keys/values are kept (a :class:`~quantbench.engine.model.KVBlock`).
* ``_forward``: a batch of rows (right-padded, explicit positions continuing their prefix) attends to its
  prefix's real keys and causally to its own tokens; the final norm and the LM head run only on the scored
  positions. Logits of 16-bit models are recomputed in float32 from the head's input exactly as HFLM does.
* ``_step``: a greedy step extends the batch's keys/values by one token.

Attention masks are built from which keys are real, not from column distances, so padding between a prefix
and its row changes nothing as long as no sliding window applies. Hence, for a sliding-window model, a
batch whose longest sequence (prefix + row + tokens to generate) exceeds the window runs on the HF forward
with its prefix inline (HFLM's exact path); ``hf_batches`` counts them.

:func:`scoring_lm` chooses the LM: the engine on CUDA when it runs the architecture, HF forward on CPU
(the reference) unless asked otherwise; ``lm.scoring`` says which ran. :func:`window_logits` does the same
for perplexity windows.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from typing import Any

import torch
from torch import nn

from quantbench.engine.model import EngineModel, KVBlock, sliding_window, unsupported_reason
from quantbench.engine.options import DEFAULT_OPTIONS, EngineOptions
from quantbench.eval.lm import HFLM, PrefixState, is_windowed, scored_positions


def engine_unsupported(model: nn.Module) -> str | None:
    """None when the engine can score ``model``, else why not."""
    reason = unsupported_reason(model)
    config = getattr(model, "config", None)
    if reason is None and is_windowed(config) and sliding_window(config) is None:
        return "windowed attention of a kind the engine does not run"
    return reason


def _kernels_planned(model: nn.Module, use_kernels: bool | None) -> bool:
    if use_kernels is not None:
        return use_kernels
    from quantbench.engine.kernels import triton_available

    return next(model.parameters()).device.type == "cuda" and triton_available()


def engine_description(model: nn.Module, use_kernels: bool | None = None) -> str:
    """``engine (Triton kernels)`` or ``engine (pure-torch reference ops)``."""
    return (
        "engine (Triton kernels)"
        if _kernels_planned(model, use_kernels)
        else "engine (pure-torch reference ops)"
    )


class EngineLM(HFLM):
    """:class:`HFLM` with its forwards run by the engine (see the module docstring).

    ``use_kernels``: None picks the Triton kernels on CUDA when Triton is installed; ``options``: the
    engine's kernel choices (:class:`~quantbench.engine.options.EngineOptions`). The engine model is
    built on the first forward (it fuses the q/k/v and gate/up weights of ``model`` in place; the HF
    modules keep computing the same function)."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        batch_size: int = 8,
        prefix_reuse: bool = True,
        max_length: int | None = None,
        fp32_logits: bool = True,
        use_kernels: bool | None = None,
        options: EngineOptions = DEFAULT_OPTIONS,
    ) -> None:
        reason = engine_unsupported(model)
        if reason is not None:
            raise ValueError(f"the engine cannot run this model: {reason}")
        super().__init__(model, tokenizer, batch_size, prefix_reuse, max_length, fp32_logits)
        self.use_kernels = use_kernels
        self.options = options
        config = model.config
        self.window = sliding_window(config) if is_windowed(config) else None
        self._description = engine_description(model, use_kernels)
        self.hf_batches = 0  # batches past the sliding window, run on the HF forward

    @property
    def scoring(self) -> str:  # type: ignore[override]
        if self.hf_batches:
            return f"{self._description}; {self.hf_batches} batch(es) past the sliding window on HF forward"
        return self._description

    @cached_property
    def em(self) -> EngineModel:
        return EngineModel(self.model, self.use_kernels, options=self.options)

    def _too_long(self, longest: int) -> bool:
        return self.window is not None and longest > self.window

    @torch.inference_mode()
    def prefix_state(self, prefixes: Sequence[Sequence[int]] | Sequence[int]) -> PrefixState:
        """Run the shared prefix(es) once, right-padded in one batch, and keep their keys/values."""
        if prefixes and isinstance(prefixes[0], int):
            prefixes = [prefixes]  # type: ignore[list-item]
        rows = [list(p) for p in prefixes]  # type: ignore[arg-type]
        if not self.prefix_reuse or not rows or not all(rows) or self._too_long(max(len(r) for r in rows)):
            return PrefixState(rows)
        ids, valid, positions = _right_padded(rows, [0] * len(rows), self.pad_id)
        _, kv = self.em.extend(
            ids.to(self.device), positions.to(self.device), valid=valid.to(self.device), keep_kv=True
        )
        self.calls += 1
        self.tokens += int(ids.numel())
        return PrefixState(rows, kv, ids.shape[1], valid.long())

    def _forward(
        self,
        state: PrefixState,
        rows: Sequence[Sequence[int]],
        keep: int,
        use_cache: bool = False,
        which: Sequence[int] | None = None,
        extra: int = 0,
    ) -> tuple[torch.Tensor, Any, torch.Tensor, torch.Tensor]:
        which = [0] * len(rows) if which is None else list(which)
        heads = state.prefixes or [[]]
        longest = max(len(heads[w]) + len(r) for w, r in zip(which, rows, strict=True)) + extra
        if self._too_long(longest):  # HFLM's exact path, the prefix run inline
            self.hf_batches += 1
            return super()._forward(PrefixState(list(state.prefixes)), rows, keep, use_cache, which, extra)
        cached = isinstance(state.cache, KVBlock)
        if cached:
            seqs = [list(r) for r in rows]
            offsets = [len(heads[w]) for w in which]
        else:
            seqs = [heads[w] + list(r) for w, r in zip(which, rows, strict=True)]
            offsets = [0] * len(seqs)
        ids, valid, positions = _right_padded(seqs, offsets, self.pad_id)
        ends = valid.sum(1)
        scored = scored_positions(ends, keep)
        hidden, kv = self.em.extend(
            ids.to(self.device),
            positions.to(self.device),
            valid=valid.to(self.device),
            past=state.cache if cached else None,
            index=torch.tensor(which, device=self.device) if cached else None,
            scored=scored.to(self.device),
            keep_kv=use_cache,
        )
        self.calls += 1
        self.tokens += int(ids.numel())
        mask = kv.valid.long().cpu() if kv is not None else valid.long()
        last_pos = positions.gather(1, (ends - 1)[:, None])[:, 0]
        return self._engine_logits(hidden), kv, mask, last_pos

    def _step(
        self, cache: Any, tokens: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, Any]:
        if not isinstance(cache, KVBlock):  # the batch ran on the HF forward
            return super()._step(cache, tokens, mask, positions)
        batch = tokens.shape[0]
        hidden, cache = self.em.extend(
            tokens[:, None].to(self.device),
            positions[:, None].to(self.device),
            past=cache,
            scored=torch.zeros((batch, 1), dtype=torch.long, device=self.device),
            keep_kv=True,
        )
        self.calls += 1
        self.tokens += batch
        return self._engine_logits(hidden), cache

    def _engine_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits ``[B, K, V]`` of the final-normed ``hidden [B, K, H]`` (HFLM's float32 rule; the
        engine's own head runs only while it is needed)."""
        b, k, d = hidden.shape
        model_logits = None
        if self._fp32_head is not True:
            model_logits = self.em.lm_head(hidden.reshape(b * k, d)).view(b, k, -1)
        return self._final_logits(model_logits, hidden)


def _right_padded(
    seqs: Sequence[Sequence[int]], offsets: Sequence[int], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ids, valid, positions)`` ``[B, T]`` of right-padded sequences whose first token sits at position
    ``offsets[b]``; a pad repeats its row's last position (as ``cumsum(mask) - 1`` gives in HFLM)."""
    lengths = torch.tensor([len(s) for s in seqs])
    width = int(lengths.max())
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    for i, seq in enumerate(seqs):
        ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    columns = torch.arange(width)[None, :]
    valid = columns < lengths[:, None]
    positions = torch.tensor(list(offsets))[:, None] + torch.minimum(
        columns, (lengths - 1).clamp(min=0)[:, None]
    )
    return ids, valid, positions


def scoring_lm(
    model: nn.Module,
    tokenizer: Any,
    *,
    engine: bool | None = None,
    batch_size: int = 8,
    prefix_reuse: bool = True,
    max_length: int | None = None,
    options: EngineOptions = DEFAULT_OPTIONS,
) -> HFLM:
    """The LM that scores evaluation requests, ``lm.scoring`` saying which forward it runs.

    ``engine``: None (default) uses the engine on CUDA and the HF forward on CPU (the reference); True uses
    the engine on any device (on CPU its pure-torch reference ops: tests); False the HF forward. A model the
    engine cannot run (another architecture) is scored by the HF forward whatever ``engine`` says.
    ``options``: the engine's kernel choices (benchmarks' A/B variants)."""
    device = next(model.parameters()).device
    wanted = device.type == "cuda" if engine is None else engine
    reason = engine_unsupported(model)
    if wanted and reason is None:
        return EngineLM(model, tokenizer, batch_size, prefix_reuse, max_length, options=options)
    lm = HFLM(model, tokenizer, batch_size, prefix_reuse, max_length)
    if not wanted:
        lm.scoring = "HF forward (engine off)" if engine is False else "HF forward (CPU reference)"
    else:
        lm.scoring = f"HF forward ({reason})"
    return lm


class WindowLogits:
    """Logits of the last positions of full windows ``[B, T]`` (perplexity): the engine's forward where it
    runs the model and is chosen (as in :func:`scoring_lm`), else the HF forward. ``scoring`` says which."""

    def __init__(self, model: nn.Module, engine: bool | None = None) -> None:
        self.model = model
        device = next(model.parameters()).device
        wanted = device.type == "cuda" if engine is None else engine
        reason = engine_unsupported(model)
        self.use_engine = wanted and reason is None
        self.window: int | None = None
        self.hf_windows = 0  # windows longer than a sliding window, run on the HF forward
        self._em: EngineModel | None = None
        if self.use_engine:
            self.window = sliding_window(model.config) if is_windowed(model.config) else None
            self._description = engine_description(model)
        elif not wanted:
            self._description = "HF forward (engine off)" if engine is False else "HF forward (CPU reference)"
        else:
            self._description = f"HF forward ({reason})"

    @property
    def scoring(self) -> str:
        if self.hf_windows:
            return f"{self._description}; {self.hf_windows} batch(es) past the sliding window on HF forward"
        return self._description

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, keep: int) -> torch.Tensor:
        """Logits ``[B, keep, V]`` (the model's dtype) of the last ``keep`` positions of ``input_ids``."""
        b, t = input_ids.shape
        if not self.use_engine or (self.window is not None and t > self.window):
            self.hf_windows += int(self.use_engine)
            return hf_last_logits(self.model, input_ids, keep)
        if self._em is None:
            self._em = EngineModel(self.model)
        positions = torch.arange(t, device=input_ids.device).expand(b, t)
        scored = torch.arange(t - keep, t, device=input_ids.device).expand(b, keep)
        hidden, _ = self._em.extend(input_ids, positions, scored=scored)
        return self._em.lm_head(hidden.reshape(b * keep, -1)).view(b, keep, -1)


def hf_last_logits(model: nn.Module, input_ids: torch.Tensor, keep: int) -> torch.Tensor:
    """Logits of the last ``keep`` positions (``logits_to_keep`` where the model supports it)."""
    try:
        out = model(input_ids=input_ids, use_cache=False, logits_to_keep=keep)
    except TypeError:  # a model without logits_to_keep
        out = model(input_ids=input_ids, use_cache=False)
    return out.logits[:, -keep:]


__all__ = ["EngineLM", "WindowLogits", "engine_unsupported", "hf_last_logits", "scoring_lm"]

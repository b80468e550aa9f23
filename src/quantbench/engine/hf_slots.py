"""Slots over the Hugging Face forward and its own KV cache: any architecture (``engine.slots``).

Requests admitted together form a cohort: one left-padded prompt pass, one HF cache. Before a decode step,
cohorts whose caches are plain full-attention layers (``DynamicLayer``) are merged into one batch: the
shorter ones left-padded (masked positions, as left-padded prompts are). Caches of other kinds (sliding
windows...) stay apart, one forward per cohort. Logits are gathered by slot; a finished request's row is
dropped from its cohort's cache (``Cache.batch_select_indices``).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from quantbench.engine.slots import Pick, Slots, left_pad


def cache_argument(model: nn.Module) -> str:
    """The name under which ``model``'s forward takes its KV cache: ``cache`` in transformers >= 5.2x,
    ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def output_cache(out: Any) -> Any:
    """The KV cache of a forward's output, under either name."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


@dataclass
class _Cohort:
    slots: list[int]  # slot of each row
    cache: Any
    mask: torch.Tensor  # [rows, positions] attention mask (0: left padding)
    next_pos: torch.Tensor  # [rows, 1] position id of the next token


class HFSlots(Slots):
    name = "hf"

    def __init__(self, model: nn.Module, capacity: int, window: int) -> None:
        super().__init__(next(model.parameters()).device, capacity, window)
        self.model = model
        self.cache_arg = cache_argument(model)
        params = inspect.signature(model.forward).parameters
        self.extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self.cohorts: list[_Cohort] = []
        self.vocab: int | None = None

    def describe(self) -> str:
        return "HF forward + KV cache"

    def ensure(self, slots: int, columns: int) -> None:
        if slots > self.capacity:
            self._grow_buffers(max(slots, 2 * self.capacity))

    def _forward(self, cache: Any, **kwargs: Any) -> tuple[torch.Tensor, Any]:
        if cache is not None:
            kwargs[self.cache_arg] = cache
        out = self.model(**kwargs, use_cache=True, **self.extra)
        return out.logits[:, -1, :], output_cache(out)

    def prefill(self, prompts, pads, slots: list[int]) -> torch.Tensor:
        ids, start, _ = left_pad(prompts, pads, self.device)
        self.ensure(max(slots) + 1, ids.shape[1])
        mask = (torch.arange(ids.shape[1], device=self.device)[None, :] >= start[:, None]).long()
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits, cache = self._forward(None, input_ids=ids, attention_mask=mask, position_ids=positions)
        self.vocab = logits.shape[-1]
        self.cohorts.append(_Cohort(list(slots), cache, mask, positions[:, -1:] + 1))
        return logits

    @staticmethod
    def _mergeable(cohort: _Cohort) -> bool:
        from transformers.cache_utils import DynamicLayer

        layers = getattr(cohort.cache, "layers", None)
        return bool(layers) and all(type(layer) is DynamicLayer and layer.is_initialized for layer in layers)

    def _merge(self) -> None:
        """One batch of every cohort with plain full-attention caches (left-padded to the longest)."""
        group = [c for c in self.cohorts if self._mergeable(c)]
        if len(group) < 2:
            return
        width = max(c.mask.shape[1] for c in group)
        first = group[0]
        for i, layer in enumerate(first.cache.layers):
            for name in ("keys", "values"):
                parts = []
                for c in group:
                    t = getattr(c.cache.layers[i], name)
                    pad = width - t.shape[-2]
                    parts.append(torch.cat([t.new_zeros((*t.shape[:-2], pad, t.shape[-1])), t], dim=-2))
                setattr(layer, name, torch.cat(parts, dim=0))
        first.mask = torch.cat(
            [
                torch.cat([c.mask.new_zeros((c.mask.shape[0], width - c.mask.shape[1])), c.mask], 1)
                for c in group
            ]
        )
        first.next_pos = torch.cat([c.next_pos for c in group])
        first.slots = [s for c in group for s in c.slots]
        merged = {id(c) for c in group[1:]}
        self.cohorts = [c for c in self.cohorts if id(c) not in merged]

    def decode(self, rows: int, pick: Pick | None) -> None:
        self._merge()
        logits = torch.zeros((rows, self.vocab or 1), device=self.device)
        for cohort in self.cohorts:
            live = [i for i, s in enumerate(cohort.slots) if s >= 0]
            slots = torch.tensor([cohort.slots[i] for i in live], dtype=torch.long, device=self.device)
            tokens = torch.zeros(len(cohort.slots), dtype=torch.long, device=self.device)
            tokens[live] = self.tokens[slots]
            cohort.mask = torch.cat([cohort.mask, cohort.mask.new_ones((len(cohort.slots), 1))], dim=1)
            step, cohort.cache = self._forward(
                cohort.cache,
                input_ids=tokens[:, None],
                attention_mask=cohort.mask,
                position_ids=cohort.next_pos,
            )
            cohort.next_pos = cohort.next_pos + 1
            logits[slots] = step[live].to(logits.dtype)
        self._write(rows, logits.argmax(dim=-1) if pick is None else pick(logits, rows))

    def release(self, slots: list[int]) -> None:
        gone = set(slots)
        for cohort in list(self.cohorts):
            keep = [i for i, s in enumerate(cohort.slots) if s >= 0 and s not in gone]
            if len(keep) == sum(s >= 0 for s in cohort.slots):
                continue
            if not keep:
                self.cohorts.remove(cohort)
                continue
            index = torch.tensor(keep, dtype=torch.long, device=self.device)
            try:
                cohort.cache.batch_select_indices(index)
            except (AttributeError, NotImplementedError, TypeError, ValueError, RuntimeError):
                # a cache that cannot drop rows keeps them, marked dead (-1): their logits go nowhere
                cohort.slots = [s if s not in gone else -1 for s in cohort.slots]
                continue
            cohort.slots = [cohort.slots[i] for i in keep]
            cohort.mask = cohort.mask[index]
            cohort.next_pos = cohort.next_pos[index]

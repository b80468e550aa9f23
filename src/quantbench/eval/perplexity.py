"""Perplexity with the standard sliding-window method.

The text is tokenized once into ``ids[0..n-1]``. Windows of at most ``ctx`` tokens start every ``stride``
tokens (``begin = 0, stride, 2*stride, ...``) until one reaches the end. Each window scores only the
tokens that no earlier window scored (``ids[max(prev_end, begin + 1) : end]``), each given every token of
the window before it, so with ``stride < ctx`` every scored token after the first window sees at least
``ctx - stride`` tokens of context. ``stride == ctx`` gives disjoint windows whose first token is not
scored (it has no context); ``stride == 1`` gives the exact per-token ``ctx``-window value. The first token
of the text is never scored. Perplexity is ``exp(sum NLL / scored tokens)``; log-softmax runs in float32
and the sum is kept in float64.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from quantbench.errors import QuantbenchError
from quantbench.eval.progress import ProgressBar


class PerplexityError(QuantbenchError, ValueError):
    """Bad perplexity arguments (context, stride, empty text)."""


@dataclass
class PerplexityResult:
    ppl: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    tokens: int  # tokens in the (possibly truncated) text
    scored: int  # tokens that were scored
    windows: int
    ctx: int
    stride: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("inf")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "tokens_per_second": self.tokens_per_second}


def sliding_windows(n_tokens: int, ctx: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, first_scored)`` of every window; tokens ``first_scored..end-1`` are scored in it."""
    if ctx < 2:
        raise PerplexityError(f"ctx must be at least 2, got {ctx}")
    if not 1 <= stride <= ctx:
        raise PerplexityError(f"stride must be between 1 and ctx ({ctx}), got {stride}")
    windows: list[tuple[int, int, int]] = []
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + ctx, n_tokens)
        first = max(prev_end, begin + 1)
        if first < end:
            windows.append((begin, end, first))
        prev_end = end
        if end == n_tokens:
            break
    return windows


def _encode(tokenizer: Any, text: str | torch.Tensor | list[int]) -> torch.Tensor:
    if isinstance(text, torch.Tensor):
        return text.reshape(-1).long()
    if isinstance(text, list):
        return torch.tensor(text, dtype=torch.long)
    if not text:
        raise PerplexityError("the text is empty")
    return tokenizer(text, return_tensors="pt").input_ids[0]


def perplexity(
    model: nn.Module,
    tokenizer: Any,
    text: str | torch.Tensor | list[int],
    ctx: int = 512,
    stride: int | None = None,
    batch_size: int = 1,
    max_tokens: int | None = None,
    progress: bool = False,
) -> PerplexityResult:
    """Sliding-window perplexity of ``model`` on ``text`` (a string, or token ids already encoded).

    ``ctx``: window length in tokens (capped by the model's ``max_position_embeddings``); ``stride``:
    distance between window starts (default ``ctx // 2``); ``max_tokens``: keep only the first tokens of
    the text; ``batch_size``: windows of equal shape per forward.
    """
    stride = ctx // 2 if stride is None else stride
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if max_pos and ctx > max_pos:
        raise PerplexityError(f"ctx {ctx} exceeds the model's context length {max_pos}")
    ids = _encode(tokenizer, text)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if ids.numel() < 2:
        raise PerplexityError(f"the text has {ids.numel()} token(s); need at least 2")
    windows = sliding_windows(ids.numel(), ctx, stride)
    device = next(model.parameters()).device

    # Group consecutive windows of the same shape so that several run in one forward.
    groups: list[list[tuple[int, int, int]]] = []
    for window in windows:
        shape = (window[1] - window[0], window[1] - window[2])
        last = groups[-1] if groups else None
        if last and len(last) < batch_size and (last[0][1] - last[0][0], last[0][1] - last[0][2]) == shape:
            last.append(window)
        else:
            groups.append([window])

    nll_sum = 0.0
    scored = 0
    start = time.perf_counter()
    with torch.inference_mode(), ProgressBar(len(windows), f"ppl ctx={ctx} stride={stride}", progress) as bar:
        for group in groups:
            n_keep = group[0][1] - group[0][2]  # tokens scored per window in this group
            batch = torch.stack([ids[b:e] for b, e, _ in group]).to(device)
            targets = torch.stack([ids[f:e] for _, e, f in group]).to(device)
            # logits at positions first-1 .. end-2 predict tokens first .. end-1.
            logits = _forward_last_logits(model, batch, n_keep + 1)[:, :-1]
            logprobs = F.log_softmax(logits.float(), dim=-1)
            token_lp = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            nll_sum -= token_lp.double().sum().item()
            scored += targets.numel()
            bar.advance(len(group))
    seconds = time.perf_counter() - start
    nll = nll_sum / scored
    return PerplexityResult(
        ppl=math.exp(nll),
        nll=nll,
        tokens=int(ids.numel()),
        scored=scored,
        windows=len(windows),
        ctx=ctx,
        stride=stride,
        seconds=seconds,
    )


def _forward_last_logits(model: nn.Module, input_ids: torch.Tensor, keep: int) -> torch.Tensor:
    """Logits of the last ``keep`` positions (``logits_to_keep`` where the model supports it)."""
    try:
        out = model(input_ids=input_ids, use_cache=False, logits_to_keep=keep)
    except TypeError:  # a model without logits_to_keep
        out = model(input_ids=input_ids, use_cache=False)
    logits = out.logits
    return logits[:, -keep:]

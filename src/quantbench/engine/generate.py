"""``Engine``: greedy / sampled generation with a static KV cache and a CUDA-graph-captured decode step.

On CUDA every decode step (all layers, the LM head and, for greedy decoding, the argmax and the write
of the new token) is one CUDA graph replay with no host synchronisation; graphs are captured once per
(batch, cache length, greedy) and reused. The prompt runs eagerly (SDPA attention, tensor-core
kernels). Architectures outside the Llama/Mistral/Qwen2 family, and sliding-window models run past
their window, fall back to plain ``model.generate`` and ``Engine.path`` says so. On CPU the same
engine runs its pure-torch reference ops.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from quantbench.engine.model import EngineModel, sliding_window, unsupported_reason
from quantbench.engine.options import DEFAULT_OPTIONS, EngineOptions

CACHE_ROUND = 64  # cache lengths are rounded up so graphs serve nearby lengths


@dataclass
class Timing:
    """CUDA-event (or wall-clock on CPU) times of the last ``generate`` call, in milliseconds."""

    first_token_ms: float = 0.0  # prompt + first sampled token
    decode_ms: float = 0.0  # all later tokens
    decode_steps: int = 0

    @property
    def per_token_ms(self) -> float:
        return self.decode_ms / self.decode_steps if self.decode_steps else float("nan")


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    tokens: torch.Tensor  # [B] int64: input of the step (greedy: overwritten with its output)
    cache_len: torch.Tensor  # [1] int32: cache index of this step's token (incremented by the step)
    start: torch.Tensor  # [B] int32 left padding
    base: torch.Tensor  # [1] int32: cache_len of the first decode step minus 1 (output column 0)
    out: torch.Tensor  # [B, S] int64 new tokens by column (greedy)
    logits: torch.Tensor | None = None


@dataclass
class _PrefillGraph:
    graph: torch.cuda.CUDAGraph
    ids: torch.Tensor  # [B, T] prompt (static input)
    start: torch.Tensor  # [B] int32 left padding (static input)
    logits: torch.Tensor  # [B, V] last-position logits (static output)


PREFILL_GRAPHS = 8  # prompt shapes kept captured (oldest dropped first)
PREFILL_GRAPH_TOKENS = 16384  # larger prompts run eagerly (launch overhead is amortized there)


@dataclass
class Engine:
    model: nn.Module
    use_kernels: bool | None = None
    cuda_graphs: bool | None = None
    fuse: bool = True
    options: EngineOptions = DEFAULT_OPTIONS  # kernel choices and tuning (defaults: the tuned engine)
    timing: Timing = field(default_factory=Timing)

    def __post_init__(self) -> None:
        self.fallback_reason = unsupported_reason(self.model)
        self.em: EngineModel | None = None
        if self.fallback_reason is None:
            self.em = EngineModel(self.model, self.use_kernels, self.fuse, options=self.options)
        self.device = next(self.model.parameters()).device
        if self.cuda_graphs is None:
            self.cuda_graphs = self.device.type == "cuda" and self.em is not None and self.em.use_kernels
        self._graphs: dict[tuple, _Graph] = {}
        self._prefill_graphs: dict[tuple, _PrefillGraph] = {}
        self._prefill_failed: dict[tuple, str] = {}
        self._pool = None
        self._graph_error: str | None = None
        self.last_path = ""

    @property
    def path(self) -> str:
        """Which generation path runs, in words (printed by ``quantbench bench``)."""
        if self.em is None:
            return f"HF generate fallback ({self.fallback_reason})"
        kind = "Triton kernels" if self.em.use_kernels else "pure-torch reference ops"
        if self.device.type != "cuda":
            return f"engine, {kind}, eager (CPU)"
        if self.cuda_graphs and self._graph_error is None:
            prefill = " + prefill" if self._prefill_graphs else ""
            if self._prefill_failed:
                prefill += f" (a prompt shape runs eagerly: {next(iter(self._prefill_failed.values()))})"
            return f"engine, {kind}, CUDA-graph decode{prefill}"
        extra = f" (graph capture failed: {self._graph_error})" if self._graph_error else ""
        return f"engine, {kind}, eager decode{extra}"

    # ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        eos_token_id: int | None = None,
        ignore_eos: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """New tokens ``[B, max_new_tokens]`` for left-padded ``input_ids [B, T]``.

        After a sequence emits ``eos_token_id`` (unless ``ignore_eos``) its later tokens are set to
        ``eos_token_id``; the loop stops early once every sequence has finished.
        """
        input_ids = input_ids.to(self.device)
        batch, prompt = input_ids.shape
        if max_new_tokens < 1:
            return input_ids.new_empty((batch, 0))
        em = self.em
        total = prompt + max_new_tokens
        reason = None
        if em is not None:
            window = sliding_window(em.config)
            if window is not None and total > window:
                reason = f"sequence of {total} exceeds the sliding window {window}"
        if em is None or reason is not None:
            self.last_path = f"HF generate fallback ({reason or self.fallback_reason})"
            return self._hf_generate(
                input_ids, attention_mask, max_new_tokens, do_sample, temperature, top_k, top_p, eos_token_id,
                ignore_eos,
            )  # fmt: skip
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
            start = (attention_mask == 0).sum(dim=1).to(torch.int32)
            expected = torch.arange(prompt, device=self.device)[None, :] >= start[:, None]
            if not torch.equal(attention_mask.bool(), expected):
                raise ValueError("attention_mask must describe left padding (zeros, then ones)")
            padded = bool(start.any())
        else:
            start = torch.zeros(batch, dtype=torch.int32, device=self.device)
            padded = False
        cache = -(-total // CACHE_ROUND) * CACHE_ROUND
        em.allocate_cache(batch, cache)
        greedy = not do_sample
        graph = self._get_graph(batch, cache, greedy) if self.cuda_graphs else None
        self.last_path = self.path

        def pick(logits: torch.Tensor) -> torch.Tensor:
            if greedy:
                return logits.argmax(dim=-1)
            return sample(logits, temperature, top_k, top_p, generator)

        prefill = self._get_prefill_graph(batch, prompt, padded, cache) if self.cuda_graphs else None
        timer = _Timer(self.device)
        timer.mark()
        if prefill is not None:
            prefill.ids.copy_(input_ids)
            prefill.start.copy_(start)
            prefill.graph.replay()
            logits = prefill.logits
        else:
            logits = em.prefill(input_ids, start, padded)
        first = pick(logits)
        outs = torch.empty((batch, max_new_tokens), dtype=torch.long, device=self.device)
        outs[:, 0] = first
        timer.mark()
        finished = first == eos_token_id if (eos_token_id is not None and not ignore_eos) else None
        steps = max_new_tokens - 1
        done_steps = 0
        if graph is not None:
            graph.tokens.copy_(first)
            graph.cache_len.fill_(prompt)
            graph.base.fill_(prompt - 1)
            graph.start.copy_(start)
            for step in range(steps):
                graph.graph.replay()
                if not greedy:
                    nxt = pick(graph.logits)
                    graph.tokens.copy_(nxt)
                    outs[:, step + 1] = nxt
                done_steps += 1
                if (
                    finished is not None
                    and (step + 1) % 32 == 0
                    and self._all_done(graph, outs, step, eos_token_id)
                ):
                    break
            if greedy:
                outs[:, 1 : 1 + done_steps] = graph.out[:, 1 : 1 + done_steps]
        else:
            cache_len = torch.full((1,), prompt, dtype=torch.int32, device=self.device)
            tokens = first
            for step in range(steps):
                logits = em.decode(tokens, cache_len, start)
                tokens = pick(logits)
                outs[:, step + 1] = tokens
                cache_len += 1
                done_steps += 1
                if (
                    finished is not None
                    and (step + 1) % 32 == 0
                    and bool((outs[:, : step + 2] == eos_token_id).any(1).all())
                ):
                    break
        timer.mark()
        times = timer.elapsed_ms()
        self.timing = Timing(times[0], times[1], done_steps)
        if done_steps < steps:
            outs[:, 1 + done_steps :] = eos_token_id
        if finished is not None:
            hit = (outs == eos_token_id).int().cumsum(dim=1)
            after = (hit - (outs == eos_token_id).int()) > 0
            outs = outs.masked_fill(after, eos_token_id)
        return outs

    @staticmethod
    def _all_done(graph: _Graph, outs: torch.Tensor, step: int, eos: int) -> bool:
        seen = graph.out[:, 1 : step + 2] if graph.logits is None else outs[:, 1 : step + 2]
        return bool(((seen == eos).any(1) | (outs[:, 0] == eos)).all())

    # ------------------------------------------------------------------------------------------
    def _capture(
        self, graph: torch.cuda.CUDAGraph, warmup: Callable[[], Any], body: Callable[[], Any]
    ) -> tuple[Any, str | None]:
        """Run ``warmup`` on a side stream (kernel compilation, cuBLAS handles), then capture ``body``
        into ``graph`` in the engine's one memory pool. Returns (body's result, None) or (None, why not)."""
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                warmup()
            torch.cuda.current_stream().wait_stream(side)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            with torch.cuda.graph(graph, pool=self._pool):
                result = body()
        except Exception as exc:  # noqa: BLE001 - the caller falls back to eager execution
            torch.cuda.synchronize()
            return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
        return result, None

    def _get_prefill_graph(self, batch: int, prompt: int, padded: bool, cache: int) -> _PrefillGraph | None:
        """The prompt pass captured for this shape: without it, a prompt costs one host launch per
        kernel (hundreds), which is most of the first-token time of a 7B model at 128 tokens."""
        em = self.em
        key = (batch, prompt, padded, em.k_cache.data_ptr())
        if key in self._prefill_graphs:
            return self._prefill_graphs[key]
        if batch * prompt > PREFILL_GRAPH_TOKENS or key in self._prefill_failed or self._graph_error:
            return None
        dev = self.device
        ids = torch.zeros((batch, prompt), dtype=torch.long, device=dev)
        start = torch.zeros(batch, dtype=torch.int32, device=dev)
        graph = torch.cuda.CUDAGraph()

        def prompt_pass() -> torch.Tensor:
            return em.prefill(ids, start, padded)

        logits, error = self._capture(graph, prompt_pass, prompt_pass)
        if error is not None:  # a prompt pass that cannot be captured runs eagerly
            self._prefill_failed[key] = error
            return None
        if len(self._prefill_graphs) >= PREFILL_GRAPHS:
            self._prefill_graphs.pop(next(iter(self._prefill_graphs)))
        state = _PrefillGraph(graph=graph, ids=ids, start=start, logits=logits)
        self._prefill_graphs[key] = state
        return state

    def _get_graph(self, batch: int, cache: int, greedy: bool) -> _Graph | None:
        em = self.em
        key = (batch, cache, greedy, em.k_cache.data_ptr())
        if key in self._graphs:
            return self._graphs[key]
        if self._graph_error is not None:
            return None
        dev = self.device
        state = _Graph(
            graph=torch.cuda.CUDAGraph(),
            tokens=torch.zeros(batch, dtype=torch.long, device=dev),
            cache_len=torch.zeros(1, dtype=torch.int32, device=dev),
            start=torch.zeros(batch, dtype=torch.int32, device=dev),
            base=torch.zeros(1, dtype=torch.int32, device=dev),
            out=torch.zeros((batch, cache), dtype=torch.long, device=dev),
        )

        def step() -> None:
            logits = em.decode(state.tokens, state.cache_len, state.start)
            # the greedy tail as one kernel instead of five small ones
            if greedy and em.use_kernels and self.options.greedy_pick:
                from quantbench.engine.kernels.fused import greedy_pick

                greedy_pick(logits, state.tokens, state.out, state.cache_len, state.base, self.options)
            elif greedy:
                nxt = logits.argmax(dim=-1)
                state.tokens.copy_(nxt)
                col = (state.cache_len - state.base).long().expand(batch)[:, None]
                state.out.scatter_(1, col, nxt[:, None])
            else:
                state.logits = logits
            state.cache_len.add_(1)

        def warmup() -> None:
            for _ in range(2):  # compile kernels, create cuBLAS handles
                state.cache_len.zero_()
                step()
            state.cache_len.zero_()

        _, error = self._capture(state.graph, warmup, step)
        if error is not None:  # any capture failure means: run eagerly
            self._graph_error = error
            return None
        self._graphs[key] = state
        return state

    # ------------------------------------------------------------------------------------------
    def _hf_generate(
        self, input_ids, attention_mask, max_new_tokens, do_sample, temperature, top_k, top_p, eos, ignore_eos
    ) -> torch.Tensor:
        timer = _Timer(self.device)
        kwargs = {"max_new_tokens": max_new_tokens, "do_sample": do_sample}
        if do_sample:
            kwargs.update(temperature=temperature, top_k=top_k or None, top_p=top_p)
        if ignore_eos:
            kwargs["min_new_tokens"] = max_new_tokens
        pad = eos if eos is not None else getattr(self.model.config, "eos_token_id", None)
        if isinstance(pad, list):
            pad = pad[0]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        timer.mark()
        out = self.model.generate(
            input_ids=input_ids, attention_mask=attention_mask, pad_token_id=pad, **kwargs
        )
        timer.mark()
        new = out[:, input_ids.shape[1] :]
        total = timer.elapsed_ms()[0]
        self.timing = Timing(total, 0.0, 0)
        if new.shape[1] < max_new_tokens:
            new = torch.cat([new, new.new_full((new.shape[0], max_new_tokens - new.shape[1]), pad or 0)], 1)
        return new


def sample(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Temperature / top-k / top-p sampling of ``logits [B, V]`` -> token ids ``[B]``."""
    scores = logits.float() / max(temperature, 1e-5)
    if top_k and top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True, dim=-1)
        cum = torch.softmax(sorted_scores, dim=-1).cumsum(dim=-1)
        drop = cum - torch.softmax(sorted_scores, dim=-1) > top_p  # keep the first token past top_p
        sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
        scores = torch.full_like(scores, float("-inf")).scatter(-1, order, sorted_scores)
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class _Timer:
    """CUDA events on CUDA, perf_counter elsewhere; ``elapsed_ms`` gives the gaps between marks."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append(ev)
        else:
            import time

            self.marks.append(time.perf_counter())

    def elapsed_ms(self) -> list[float]:
        if self.cuda:
            self.marks[-1].synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:], strict=False)]
        return [(b - a) * 1e3 for a, b in zip(self.marks, self.marks[1:], strict=False)]

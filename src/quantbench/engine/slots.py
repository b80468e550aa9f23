"""Slots: the model side of the generation loop (``engine.scheduler``).

A slot holds one running request's KV state. The loop asks a :class:`Slots` to prefill new requests into
free slots, to run one decode step for every slot below some row, and to forget a slot. Each decode step
writes the new token of every slot into ``tokens`` (the next step's input) and into column ``col`` of
``out``, so a loop can run several steps before it reads them back in one copy.

* :class:`EngineSlots`: the engine's static KV cache (``EngineModel``), one cache row per slot with its own
  ``cache_len``, so requests of any length join and leave between steps and a row's arithmetic never
  depends on the others. On CUDA each step is one CUDA-graph replay, captured per (batch bucket, cache
  length bucket, greedy): rows of a bucket above the running ones are idle (they write nothing that
  anyone reads). The cache grows (keeping its contents) when a request needs more rows or positions.
* ``engine.hf_slots.HFSlots``: the Hugging Face forward and its own KV cache, for other architectures.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from quantbench.engine.model import EngineModel

Pick = Callable[[torch.Tensor, int], torch.Tensor]  # (logits [rows, V], rows) -> tokens [rows]

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
LENGTH_MIN = 256  # the smallest cache-length bucket of a growing cache
PREFILL_GRAPHS = 8  # prompt shapes kept captured (oldest dropped first)
PREFILL_GRAPH_TOKENS = 16384  # larger prompts run eagerly (launch overhead is amortized there)


def pow2_at_least(n: int, floor: int = 1) -> int:
    return max(floor, 1 << max(0, n - 1).bit_length())


def left_pad(
    prompts: Sequence[Sequence[int] | torch.Tensor], pads: Sequence[int], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """``(ids [n, T], start [n] int32, start as ints)`` for prompts left-padded to the longest.

    ``pads[i]``: leading entries of prompt i that are already padding (a caller's left-padded batch)."""
    width = max(len(p) for p in prompts)
    starts = [width - len(p) + pad for p, pad in zip(prompts, pads, strict=True)]
    if all(isinstance(p, torch.Tensor) for p in prompts) and all(len(p) == width for p in prompts):
        ids = torch.stack(list(prompts)).to(device=device, dtype=torch.long)
    else:
        rows = [[0] * (width - len(p)) + [int(t) for t in p] for p in prompts]
        ids = torch.tensor(rows, dtype=torch.long, device=device)
    if any(starts):
        start = torch.tensor(starts, dtype=torch.int32, device=device)
    else:
        start = torch.zeros(len(starts), dtype=torch.int32, device=device)
    return ids, start, starts


class Slots:
    """Per-slot state every model backend keeps: next input tokens, and the window of new tokens."""

    name = "?"

    def __init__(self, device: torch.device, capacity: int, window: int) -> None:
        self.device = device
        self.capacity = capacity
        self.window = window
        self.tokens = torch.zeros(capacity, dtype=torch.long, device=device)
        self.out = torch.zeros((capacity, window), dtype=torch.long, device=device)
        self.col = torch.zeros(1, dtype=torch.int32, device=device)  # out column of the next step
        self.zero = torch.zeros(1, dtype=torch.int32, device=device)

    def describe(self) -> str:
        raise NotImplementedError

    def ensure(self, slots: int, columns: int) -> None:
        """Room for ``slots`` slots of up to ``columns`` positions (prompt + new tokens) each."""

    def prefill(self, prompts: Sequence[Sequence[int] | torch.Tensor], pads: Sequence[int], slots: list[int]):
        """Run ``prompts`` into ``slots``; returns the logits of their last positions ``[n, V]``."""
        raise NotImplementedError

    def decode(self, rows: int, pick: Pick | None) -> None:
        """One step for slots ``0 .. rows-1``; ``pick`` chooses tokens from logits (None: greedy)."""
        raise NotImplementedError

    def release(self, slots: list[int]) -> None:
        """Forget ``slots`` (their requests are done)."""
        raise NotImplementedError

    def feed(self, slots: list[int], tokens: torch.Tensor) -> None:
        """The next input token of each of ``slots`` (each request's first token, from its prompt)."""
        self.tokens[self._index(slots)] = tokens

    def _index(self, slots: list[int]) -> slice | torch.Tensor:
        """``slots`` as a slice when they are consecutive (no host-to-device copy), else an index tensor."""
        if slots == list(range(slots[0], slots[0] + len(slots))):
            return slice(slots[0], slots[0] + len(slots))
        return torch.tensor(slots, dtype=torch.long, device=self.device)

    def begin_window(self) -> None:
        self.col.zero_()

    def read(self, rows: int, steps: int) -> list[list[int]]:
        """The tokens of the last ``steps`` steps, for slots ``0 .. rows-1`` (one host synchronisation)."""
        return self.out[:rows, :steps].tolist()

    def _grow_buffers(self, capacity: int) -> None:
        extra = capacity - self.capacity
        if extra <= 0:
            return
        self.tokens = torch.cat([self.tokens, self.tokens.new_zeros(extra)])
        self.out = torch.cat([self.out, self.out.new_zeros((extra, self.window))])
        self.capacity = capacity

    def _write(self, rows: int, tokens: torch.Tensor) -> None:
        self.tokens[:rows].copy_(tokens)
        self.out[:rows].scatter_(1, self.col.long().expand(rows)[:, None], tokens[:, None])
        self.col.add_(1)


# ---------------------------------------------------------------------------------------------------------


@dataclass
class _StepGraph:
    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor | None  # sampled steps: the logits the loop picks from


@dataclass
class _PrefillGraph:
    graph: torch.cuda.CUDAGraph
    ids: torch.Tensor  # [B, T] prompt (static input)
    start: torch.Tensor  # [B] int32 left padding (static input)
    logits: torch.Tensor  # [B, V] last-position logits (static output)


class GraphCache:
    """CUDA-graph capture for an engine: one memory pool while any graph captured in it lives, and why
    capture stopped if it did.

    PyTorch's allocator keeps a private pool with a count of the graphs using it; once every graph of a
    pool is gone, the pool only waits to be freed and capturing into it again is an internal error. So
    when the last graph is freed (a slot set dropped, or its graphs cleared after a resize), the next
    capture starts a new pool."""

    def __init__(self) -> None:
        self.pool: Any = None
        self.live = 0  # graphs captured in ``pool`` and not yet freed
        self.error: str | None = None  # a failed decode capture: decode runs eagerly from then on
        self.prefill_failed: dict[tuple, str] = {}
        self.prefill_captured = 0

    def _freed(self, pool: Any) -> None:
        if pool == self.pool:
            self.live -= 1
            if self.live == 0:
                self.pool = None

    def capture(
        self, graph: torch.cuda.CUDAGraph, warmup: Callable[[], Any], body: Callable[[], Any]
    ) -> tuple[Any, str | None]:
        """Run ``warmup`` on a side stream (kernel compilation, cuBLAS handles), then capture ``body``
        into ``graph`` in the shared memory pool. Returns (body's result, None) or (None, why not)."""
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                warmup()
            torch.cuda.current_stream().wait_stream(side)
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            # counted from the start: a failed capture's graph also holds the pool until it is freed
            self.live += 1
            weakref.finalize(graph, self._freed, self.pool)
            with torch.cuda.graph(graph, pool=self.pool):
                result = body()
        except Exception as exc:  # noqa: BLE001 - the caller falls back to eager execution
            torch.cuda.synchronize()
            return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
        return result, None


class EngineSlots(Slots):
    """Slots in the engine's static KV cache (module docstring).

    ``batch_buckets``: the batch sizes a step runs at (a step covers the running slots with the smallest
    that fits); None: powers of two up to the capacity. ``length_buckets``: a step reads the cache up to the
    smallest power of two (>= ``LENGTH_MIN``) past every running row, else the whole cache.
    ``prefill_graphs``: capture the prompt pass per shape (worth it when one shape repeats, as in a
    benchmark). ``max_columns``: the cache never grows past it (the model's context)."""

    name = "engine"

    def __init__(
        self,
        em: EngineModel,
        capacity: int,
        columns: int,
        window: int,
        graphs: GraphCache | None = None,
        batch_buckets: tuple[int, ...] | None = None,
        length_buckets: bool = True,
        prefill_graphs: bool = False,
        max_columns: int | None = None,
    ) -> None:
        super().__init__(em.device, capacity, window)
        self.em = em
        self.graphs = graphs
        self.batch_buckets = batch_buckets
        self.length_buckets = length_buckets
        self.prefill_graphs = prefill_graphs and graphs is not None
        self.fused_pick = em.use_kernels and em.options.greedy_pick
        self.max_columns = max_columns
        self.columns = columns
        em.allocate_cache(capacity, columns)
        dev = self.device
        self.cache_len = torch.zeros(capacity, dtype=torch.int32, device=dev)
        self.start = torch.zeros(capacity, dtype=torch.int32, device=dev)
        self.active = torch.zeros(capacity, dtype=torch.int32, device=dev)  # 1: cache_len advances
        self.lengths = [0] * capacity  # host copy of cache_len
        self.running = [False] * capacity
        self._step_graphs: dict[tuple, _StepGraph] = {}
        self._prefill: dict[tuple, _PrefillGraph] = {}
        self.cache_ptr = em.k_cache.data_ptr()

    @property
    def valid(self) -> bool:
        """Whether the model's cache is still the one these slots filled (nothing reallocated it)."""
        return self.em.k_cache is not None and self.em.k_cache.data_ptr() == self.cache_ptr

    def describe(self) -> str:
        kind = "Triton kernels" if self.em.use_kernels else "pure-torch reference ops"
        if self.device.type != "cuda":
            return f"engine, {kind}, eager (CPU)"
        if self.graphs is not None and self.graphs.error is None:
            return f"engine, {kind}, CUDA-graph decode"
        extra = f" (graph capture failed: {self.graphs.error})" if self.graphs and self.graphs.error else ""
        return f"engine, {kind}, eager decode{extra}"

    # -- sizes -------------------------------------------------------------------------------------------
    def ensure(self, slots: int, columns: int) -> None:
        capacity = self.capacity
        if slots > capacity:
            capacity = pow2_at_least(slots)
        width = self.columns
        if columns > width:
            width = pow2_at_least(columns, LENGTH_MIN)
            if self.max_columns is not None:
                width = max(columns, min(width, self.max_columns))
        if (capacity, width) == (self.capacity, self.columns):
            return
        self.em.resize_cache(capacity, width)
        extra = capacity - self.capacity
        if extra > 0:
            for name in ("cache_len", "start", "active"):
                old = getattr(self, name)
                setattr(self, name, torch.cat([old, old.new_zeros(extra)]))
            self.lengths += [0] * extra
            self.running += [False] * extra
            self._grow_buffers(capacity)
        self.columns = width
        self.cache_ptr = self.em.k_cache.data_ptr()
        self._step_graphs.clear()  # they hold the old buffers' addresses
        self._prefill.clear()

    def _bucket(self, rows: int) -> int:
        buckets = self.batch_buckets
        if buckets is None:
            buckets = (*(b for b in BATCH_BUCKETS if b < self.capacity), self.capacity)
        return next((b for b in buckets if b >= rows), max(buckets))

    def _width(self, rows: int) -> int:
        if not self.length_buckets:
            return self.columns
        running = [n for n, on in zip(self.lengths[:rows], self.running[:rows], strict=True) if on]
        return min(self.columns, pow2_at_least(max(running, default=0) + 1, LENGTH_MIN))

    # -- prompt ------------------------------------------------------------------------------------------
    def prefill(self, prompts, pads, slots: list[int]) -> torch.Tensor:
        em = self.em
        ids, start, starts = left_pad(prompts, pads, self.device)
        n, width = ids.shape
        self.ensure(max(slots) + 1, width)
        padded = any(starts)
        first = slots[0]
        if slots == list(range(first, first + n)):  # a view of those cache rows
            view = (em.k_cache[:, first : first + n], em.v_cache[:, first : first + n])
            graph = self._prefill_graph(n, width, padded, view) if self.prefill_graphs else None
            if graph is not None:
                graph.ids.copy_(ids)
                graph.start.copy_(start)
                graph.graph.replay()
                logits = graph.logits
            else:
                logits = em.prefill(ids, start, padded, cache=view)
        else:  # scattered slots: a scratch cache, then its rows copied into theirs
            shape = (len(em.layers), n, em.n_kv, width, em.head_dim)
            scratch = (
                torch.empty(shape, device=self.device, dtype=em.dtype),
                torch.empty(shape, device=self.device, dtype=em.dtype),
            )
            logits = em.prefill(ids, start, padded, cache=scratch)
            index = self._index(slots)
            em.k_cache[:, index, :, :width] = scratch[0]
            em.v_cache[:, index, :, :width] = scratch[1]
        index = self._index(slots)
        self.cache_len[index] = width
        self.start[index] = start
        self.active[index] = 1
        for s in slots:
            self.lengths[s] = width
            self.running[s] = True
        return logits

    def _prefill_graph(self, n: int, width: int, padded: bool, view) -> _PrefillGraph | None:
        """The prompt pass captured for this shape: without it, a prompt costs one host launch per kernel
        (hundreds), which is most of the first-token time of a 7B model at 128 tokens."""
        graphs = self.graphs
        key = (n, width, padded, view[0].data_ptr())
        if key in self._prefill:
            return self._prefill[key]
        if n * width > PREFILL_GRAPH_TOKENS or key in graphs.prefill_failed or graphs.error:
            return None
        ids = torch.zeros((n, width), dtype=torch.long, device=self.device)
        start = torch.zeros(n, dtype=torch.int32, device=self.device)
        graph = torch.cuda.CUDAGraph()

        def prompt_pass() -> torch.Tensor:
            return self.em.prefill(ids, start, padded, cache=view)

        logits, error = graphs.capture(graph, prompt_pass, prompt_pass)
        if error is not None:  # a prompt pass that cannot be captured runs eagerly
            graphs.prefill_failed[key] = error
            return None
        if len(self._prefill) >= PREFILL_GRAPHS:
            self._prefill.pop(next(iter(self._prefill)))
        state = _PrefillGraph(graph=graph, ids=ids, start=start, logits=logits)
        self._prefill[key] = state
        graphs.prefill_captured += 1
        return state

    # -- decode ------------------------------------------------------------------------------------------
    def _step(self, rows: int, width: int, greedy: bool) -> torch.Tensor:
        """One decode step of slots ``0 .. rows-1`` (the body a graph captures)."""
        tokens = self.tokens[:rows]
        logits = self.em.decode(tokens, self.cache_len[:rows], self.start[:rows], columns=width)
        if greedy and self.fused_pick:  # one kernel instead of five small ones
            from quantbench.engine.kernels.fused import greedy_pick

            greedy_pick(logits, tokens, self.out[:rows], self.col, self.zero, self.em.options)
            self.col.add_(1)
        elif greedy:
            self._write(rows, logits.argmax(dim=-1))
        self.cache_len[:rows].add_(self.active[:rows])
        return logits

    def _graph(self, rows: int, width: int, greedy: bool) -> _StepGraph | None:
        key = (rows, width, greedy)
        if key in self._step_graphs:
            return self._step_graphs[key]
        graphs = self.graphs
        if graphs.error is not None:
            return None
        state = _StepGraph(graph=torch.cuda.CUDAGraph(), logits=None)
        # Warm-up steps run for real: they must leave the loop's state as they found it. Their cache
        # writes land at each row's cache_len, which the next real step overwrites anyway.
        saved = (self.tokens[:rows].clone(), self.cache_len[:rows].clone(), self.col.clone())

        def restore() -> None:
            self.tokens[:rows].copy_(saved[0])
            self.cache_len[:rows].copy_(saved[1])
            self.col.copy_(saved[2])

        def warmup() -> None:
            for _ in range(2):  # compile kernels, create cuBLAS handles
                self._step(rows, width, greedy)
                restore()

        logits, error = graphs.capture(state.graph, warmup, lambda: self._step(rows, width, greedy))
        restore()
        if error is not None:  # any capture failure means: run eagerly
            graphs.error = error
            return None
        state.logits = None if greedy else logits
        self._step_graphs[key] = state
        return state

    def decode(self, rows: int, pick: Pick | None) -> None:
        rows = self._bucket(rows)
        width = self._width(rows)
        greedy = pick is None
        graph = self._graph(rows, width, greedy) if self.graphs is not None else None
        if graph is not None:
            graph.graph.replay()
            logits = graph.logits
        else:
            logits = self._step(rows, width, greedy)
        if not greedy:
            self._write(rows, pick(logits, rows))
        for s in range(rows):
            if self.running[s]:
                self.lengths[s] += 1

    def release(self, slots: list[int]) -> None:
        if not slots:
            return
        index = self._index(slots)
        for name in ("cache_len", "start", "active"):  # an idle row writes at position 0 of its own row
            getattr(self, name)[index] = 0
        for s in slots:
            self.lengths[s] = 0
            self.running[s] = False

"""The one generation loop: a step-based scheduler over a set of running requests.

``Engine.generate`` (bench, fixed batches) runs one batch through it; ``quantbench generate / chat / serve``
run it continuously, requests joining and leaving the running batch between steps. Each request has its
own prompt, token limit, stop ids and :class:`~quantbench.engine.sampling.Sampling`; the model side is a
:class:`~quantbench.engine.slots.Slots` (the engine's static cache, or the HF forward).

A step: requests that were cancelled leave; waiting requests take free slots and are prefilled together
(up to ``prefill_tokens`` prompt tokens), their first token picked from the prompt's logits; then every
running slot decodes. The loop reads new tokens back to the host every ``sync_every`` decode steps (1 for
streaming; a benchmark runs its whole batch with one read at the end): a request that stopped inside a
window has run a few extra steps whose tokens are dropped.

Thread use: :meth:`Scheduler.submit` and :meth:`Request.cancel` may be called from any thread; the steps
from one thread at a time.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from quantbench.engine.sampling import Sampling, SlotSampler
from quantbench.engine.slots import Slots
from quantbench.errors import GenerationError


@dataclass(eq=False)
class Request:
    """One prompt to continue. ``prompt`` may be a 1-D tensor; its first ``pad`` entries are left padding."""

    prompt: Sequence[int] | torch.Tensor
    max_new_tokens: int
    sampling: Sampling = field(default_factory=Sampling)
    stop_ids: frozenset[int] = frozenset()  # a token among these ends the request (it is kept in tokens)
    on_token: Callable[[int], bool] | None = None  # each new token but a stop id; True: stop after it
    on_finish: Callable[[Request], None] | None = None  # once, when done (any reason)
    is_cancelled: Callable[[], bool] | None = None  # polled between steps
    pad: int = 0
    # results
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop", "length", "cancelled", "error"
    error: BaseException | None = None
    submitted_s: float = 0.0  # perf_counter times
    first_token_s: float = 0.0
    finished_s: float = 0.0
    # loop state
    slot: int = -1
    produced: int = 0  # tokens drawn on the device, read back or not
    cancelled: bool = False

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def prompt_len(self) -> int:
        return len(self.prompt) - self.pad

    def cancel(self) -> None:
        self.cancelled = True


class Scheduler:
    """Runs requests on ``slots`` (module docstring). ``max_running``: slots in use at most."""

    def __init__(
        self,
        slots: Slots,
        max_running: int,
        sync_every: int = 1,
        prefill_tokens: int | None = None,
        max_columns: int | None = None,
    ) -> None:
        if max_running < 1 or sync_every < 1:
            raise ValueError("max_running and sync_every must be >= 1")
        self.slots = slots
        self.max_running = max_running
        self.sync_every = min(sync_every, slots.window)
        self.prefill_tokens = prefill_tokens
        self.max_columns = max_columns  # prompt + new tokens per request at most (None: no limit here)
        self.sampler = SlotSampler(slots.capacity, slots.device)
        self.running: dict[int, Request] = {}
        self._free: list[int] = list(range(max_running))  # a heap: the lowest free slot first
        self._waiting: deque[Request] = deque()
        self._lock = threading.Lock()  # the waiting queue and the free slots
        self._pending_first: list[tuple[list[Request], torch.Tensor]] = []  # first tokens not read yet
        self._window: tuple[list[Request | None], int, int] | None = None  # (rows, rows count, steps)
        self.stats = {"admitted": 0, "prefills": 0, "steps": 0, "tokens": 0}

    # -- requests ------------------------------------------------------------------------------------------
    def check(self, req: Request) -> None:
        """What a request must satisfy to be run (raises GenerationError)."""
        if req.max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be >= 1, got {req.max_new_tokens}")
        if req.prompt_len < 1:
            raise GenerationError("empty prompt")
        req.sampling.check()
        total = len(req.prompt) + req.max_new_tokens - 1
        if self.max_columns is not None and total > self.max_columns:
            raise GenerationError(
                f"prompt of {req.prompt_len} tokens + {req.max_new_tokens} new tokens exceeds the "
                f"{self.max_columns} positions a sequence may hold"
            )

    def submit(self, req: Request) -> None:
        self.check(req)
        req.submitted_s = time.perf_counter()
        with self._lock:
            self._waiting.append(req)

    def steps_left(self) -> int:
        """Decode steps the running requests may still need (as far as the host knows without reading)."""
        return max((r.max_new_tokens - r.produced for r in self.running.values() if not r.done), default=0)

    @property
    def busy(self) -> bool:
        return bool(self.running or self._waiting)

    # -- the loop ------------------------------------------------------------------------------------------
    def run(self) -> None:
        """Step until no request is waiting or running."""
        while self.busy:
            self.step()

    @torch.inference_mode()
    def step(self) -> None:
        """Admit waiting requests, then one window of decode steps for everyone running, read back."""
        try:
            self.admit()
            if self._pending_first:
                self.sync()  # first tokens out now (time to first token), and one-token requests done
            if self.launch():
                self.sync()
        except Exception as exc:  # noqa: BLE001 - the requests on the device fail; the loop carries on
            self._pending_first.clear()
            self._window = None
            for req in list(self.running.values()):
                self._fail(req, exc)

    @torch.inference_mode()
    def admit(self) -> int:
        """Cancelled requests leave; waiting ones take free slots and are prefilled. Returns how many."""
        self._drop_cancelled()
        group: list[Request] = []
        gone: list[Request] = []
        with self._lock:
            width = 0
            while self._waiting and len(group) < len(self._free):
                req = self._waiting[0]
                if req.cancelled or (req.is_cancelled is not None and req.is_cancelled()):
                    gone.append(self._waiting.popleft())
                    continue
                wider = max(width, len(req.prompt))
                if group and self.prefill_tokens and wider * (len(group) + 1) > self.prefill_tokens:
                    break
                group.append(self._waiting.popleft())
                width = wider
            slots = [heapq.heappop(self._free) for _ in group]
        for req in gone:
            self._finish(req, "cancelled")
        if not group:
            return 0
        try:
            self._prefill(group, slots)
            return len(group)
        except Exception:  # noqa: BLE001 - retried one by one below: a bad request fails alone
            self.slots.release(slots)
            self._give_back(slots)
        admitted = 0
        for req in group:
            slot = self._take_slot()
            try:
                self._prefill([req], [slot])
                admitted += 1
            except Exception as exc:  # noqa: BLE001
                self.slots.release([slot])
                self._give_back([slot])
                self._fail(req, exc)
        return admitted

    def _prefill(self, group: list[Request], slots: list[int]) -> None:
        self.slots.ensure(max(slots) + 1, max(len(r.prompt) + r.max_new_tokens - 1 for r in group))
        self.sampler.grow(self.slots.capacity)
        self.sampler.assign(slots, [r.sampling for r in group])
        logits = self.slots.prefill([r.prompt for r in group], [r.pad for r in group], slots)
        first = self.sampler.pick(logits, slots)
        self.slots.feed(slots, first)
        for req, slot in zip(group, slots, strict=True):
            req.slot = slot
            req.produced = 1
            self.running[slot] = req
        self._pending_first.append((list(group), first))
        self.stats["admitted"] += len(group)
        self.stats["prefills"] += 1

    @torch.inference_mode()
    def launch(self) -> int:
        """Queue one window of decode steps (no host synchronisation); returns how many steps."""
        if self._window is not None:
            self.sync()
        live = [r for r in self.running.values() if not r.done]
        if not live:
            return 0
        steps = min([self.sync_every] + [r.max_new_tokens - r.produced for r in live])
        if steps < 1:
            self.sync()  # requests at their limit leave first
            return self.launch()
        rows = max(self.running) + 1
        greedy = self.sampler.all_greedy(rows)
        pick = None if greedy else self.sampler.pick
        self.slots.begin_window()
        for _ in range(steps):
            self.slots.decode(rows, pick)
        for r in live:
            r.produced += steps
        snapshot: list[Request | None] = [self.running.get(s) for s in range(rows)]
        self._window = (snapshot, rows, steps)
        self.stats["steps"] += steps
        return steps

    @torch.inference_mode()
    def sync(self) -> None:
        """Read back every token not read yet and hand it to its request (stops, limits, callbacks)."""
        now = time.perf_counter
        for group, first in self._pending_first:
            values = first.tolist()
            t = now()
            for req, token in zip(group, values, strict=True):
                req.first_token_s = t
                self._deliver(req, token)
        self._pending_first.clear()
        if self._window is not None:
            snapshot, rows, steps = self._window
            self._window = None
            table = self.slots.read(rows, steps)
            for req, values in zip(snapshot, table, strict=True):
                if req is None:
                    continue
                for token in values:
                    if req.done:
                        break
                    self._deliver(req, token)
        finished = [s for s, r in self.running.items() if r.done]
        self._release(finished)
        self._drop_cancelled()

    # -- bookkeeping ---------------------------------------------------------------------------------------
    def _deliver(self, req: Request, token: int) -> None:
        if req.done:
            return
        req.tokens.append(token)
        self.stats["tokens"] += 1
        if token in req.stop_ids:
            self._finish(req, "stop")
            return
        try:
            stop = req.on_token(token) if req.on_token is not None else False
        except Exception as exc:  # noqa: BLE001 - a callback's failure ends its own request only
            self._fail(req, exc)
            return
        if stop:
            self._finish(req, "stop")
        elif len(req.tokens) >= req.max_new_tokens:
            self._finish(req, "length")

    def _finish(self, req: Request, reason: str) -> None:
        if req.done:
            return
        req.finish_reason = reason
        req.finished_s = time.perf_counter()
        if req.on_finish is not None:
            try:
                req.on_finish(req)
            except Exception:  # noqa: BLE001 - the loop must survive a callback
                pass

    def _fail(self, req: Request, exc: BaseException) -> None:
        req.error = exc
        self._finish(req, "error")
        if self.running.get(req.slot) is req:
            self._release([req.slot])

    def _drop_cancelled(self) -> None:
        gone = [
            s
            for s, r in self.running.items()
            if not r.done and (r.cancelled or (r.is_cancelled is not None and r.is_cancelled()))
        ]
        for s in gone:
            self._finish(self.running[s], "cancelled")
        self._release(gone)

    def _release(self, slots: list[int]) -> None:
        slots = [s for s in slots if s in self.running]
        if not slots:
            return
        for s in slots:
            del self.running[s]
            self.sampler.clear(s)
        self.slots.release(slots)
        self._give_back(slots)

    def set_max_running(self, n: int) -> None:
        """Allow ``n`` running requests at most (slots above it are not reused once free)."""
        if n < 1:
            raise ValueError("max_running must be >= 1")
        with self._lock:
            self._free = [s for s in self._free if s < n]
            self._free += [s for s in range(self.max_running, n) if s not in self.running]
            heapq.heapify(self._free)
            self.max_running = n

    def _take_slot(self) -> int:
        with self._lock:
            return heapq.heappop(self._free)

    def _give_back(self, slots: list[int]) -> None:
        with self._lock:
            for s in slots:
                if s < self.max_running:
                    heapq.heappush(self._free, s)

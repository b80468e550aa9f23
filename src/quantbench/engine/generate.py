"""``Engine``: greedy / sampled generation of fixed batches (``quantbench bench``) through the one
generation loop (``engine.scheduler``), with a static KV cache and a CUDA-graph-captured decode step.

On CUDA every decode step (all layers, the LM head and, for greedy decoding, the argmax and the write
of the new token) is one CUDA graph replay with no host synchronisation; a batch reads its tokens back
once at the end (every 32 steps when it can stop at EOS). The prompt pass is captured per shape too.
Architectures outside the Llama/Mistral/Qwen2 family, and sliding-window models run past their window,
run the same loop over the Hugging Face forward (``engine.hf_slots``) and ``Engine.path`` says so. On CPU
the engine runs its pure-torch reference ops.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from quantbench.engine.hf_slots import HFSlots
from quantbench.engine.model import EngineModel, sliding_window, unsupported_reason
from quantbench.engine.options import DEFAULT_OPTIONS, EngineOptions
from quantbench.engine.sampling import Sampling
from quantbench.engine.scheduler import Request, Scheduler
from quantbench.engine.slots import EngineSlots, GraphCache, Slots

CACHE_ROUND = 64  # cache lengths are rounded up so graphs serve nearby lengths
EOS_CHECK_STEPS = 32  # a batch that can stop at EOS reads its tokens back this often


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
        self.graphs = GraphCache() if self.cuda_graphs else None
        self._slots: EngineSlots | None = None
        self.last_path = ""

    @property
    def path(self) -> str:
        """Which generation path runs, in words (printed by ``quantbench bench``)."""
        if self.em is None:
            return f"HF forward fallback ({self.fallback_reason})"
        kind = "Triton kernels" if self.em.use_kernels else "pure-torch reference ops"
        if self.device.type != "cuda":
            return f"engine, {kind}, eager (CPU)"
        graphs = self.graphs
        if graphs is not None and graphs.error is None:
            prefill = " + prefill" if graphs.prefill_captured else ""
            if graphs.prefill_failed:
                prefill += f" (a prompt shape runs eagerly: {next(iter(graphs.prefill_failed.values()))})"
            return f"engine, {kind}, CUDA-graph decode{prefill}"
        extra = f" (graph capture failed: {graphs.error})" if graphs is not None and graphs.error else ""
        return f"engine, {kind}, eager decode{extra}"

    def serving_slots(self, max_columns: int) -> Slots:
        """Slots for a continuously running loop (``quantbench serve``): the engine's cache growing with
        the requests, decode graphs per batch and cache-length bucket; the HF forward where the engine
        cannot run (or the model's sliding window is shorter than ``max_columns``)."""
        window = sliding_window(self.em.config) if self.em is not None else None
        if self.em is None or (window is not None and max_columns > window):
            return HFSlots(self.model, 1, 1)
        return EngineSlots(
            self.em,
            capacity=1,
            columns=min(max_columns, 256),
            window=1,
            graphs=self.graphs,
            max_columns=max_columns,
        )

    def _batch_slots(self, batch: int, total: int) -> tuple[Slots, str]:
        em = self.em
        reason = self.fallback_reason
        if em is not None:
            window = sliding_window(em.config)
            if window is not None and total > window:
                reason = f"sequence of {total} exceeds the sliding window {window}"
        if em is None or reason is not None:
            return HFSlots(self.model, batch, total), f"HF forward fallback ({reason})"
        columns = -(-total // CACHE_ROUND) * CACHE_ROUND
        slots = self._slots
        if slots is None or (slots.capacity, slots.columns) != (batch, columns) or not slots.valid:
            self._slots = None
            slots = self._slots = EngineSlots(
                em,
                capacity=batch,
                columns=columns,
                window=columns,
                graphs=self.graphs,
                batch_buckets=(batch,),
                length_buckets=False,
                prefill_graphs=True,
            )
        return slots, ""

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
        seed: int | None = None,
    ) -> torch.Tensor:
        """New tokens ``[B, max_new_tokens]`` for left-padded ``input_ids [B, T]``.

        After a sequence emits ``eos_token_id`` (unless ``ignore_eos``) its later tokens are set to
        ``eos_token_id``; the loop stops early once every sequence has finished. Sampling: row b draws
        with seed ``seed + b`` (a random seed per row when ``seed`` is None).
        """
        input_ids = input_ids.to(self.device)
        batch, prompt = input_ids.shape
        if max_new_tokens < 1:
            return input_ids.new_empty((batch, 0))
        pads = [0] * batch
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
            start = (attention_mask == 0).sum(dim=1)
            expected = torch.arange(prompt, device=self.device)[None, :] >= start[:, None]
            if not torch.equal(attention_mask.bool(), expected):
                raise ValueError("attention_mask must describe left padding (zeros, then ones)")
            pads = start.tolist()
        slots, fallback = self._batch_slots(batch, prompt + max_new_tokens)
        stops = frozenset() if eos_token_id is None or ignore_eos else frozenset([eos_token_id])
        sync_every = EOS_CHECK_STEPS if stops else max_new_tokens
        sched = Scheduler(slots, max_running=batch, sync_every=sync_every)
        requests = []
        for row in range(batch):
            sampling = Sampling(
                temperature if do_sample else 0.0, top_k, top_p, None if seed is None else seed + row
            )
            requests.append(Request(input_ids[row], max_new_tokens, sampling, stops, pad=pads[row]))
            sched.submit(requests[-1])
        timer = _Timer(self.device)
        timer.mark()
        sched.admit()
        timer.mark()
        steps = 0
        while sched.steps_left():
            launched = sched.launch()
            if not launched:
                break
            steps += launched
        timer.mark()
        sched.sync()
        times = timer.elapsed_ms()
        self.timing = Timing(times[0], times[1], steps)
        self.last_path = fallback or self.path
        failed = next((r.error for r in requests if r.error is not None), None)
        if failed is not None:
            raise failed
        fill = eos_token_id if eos_token_id is not None else 0
        rows = [r.tokens + [fill] * (max_new_tokens - len(r.tokens)) for r in requests]
        return torch.tensor(rows, dtype=torch.long, device=self.device)


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

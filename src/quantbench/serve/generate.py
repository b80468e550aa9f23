"""Text generation for ``quantbench generate`` / ``chat`` / ``serve``: streamed, per-request sampling.

:class:`Generator` turns text requests (:class:`Sequence`: a prompt, :class:`SamplingParams` with stop
strings, callbacks) into requests of the one generation loop, ``quantbench.engine.scheduler.Scheduler``,
which runs continuously: a request joins the running batch at the next step (its prompt prefilled into a
free slot) and leaves it when done, so a long generation never holds a new one back. Each sequence
streams its new text through an incremental detokenizer as soon as it is stable (no half UTF-8
characters, nothing that could still turn into a stop string) and ends at EOS, a stop string, its token
limit or cancellation.

The loop runs on one of two backends:

* ``engine``: the quantbench engine (static KV cache, one cache row per running sequence, Triton kernels
  and CUDA-graph decode steps on CUDA; the CUDA default for the Llama / Mistral / Qwen2 family);
* ``hf``: the Hugging Face forward with its KV cache (any architecture; the CPU default).

Sampling: greedy when ``temperature == 0``, else temperature / top-k / top-p with noise fixed by the
request's seed and token position (``quantbench.engine.sampling``): a seeded request gives the same text
alone or inside any batch.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from quantbench.engine.sampling import Sampling
from quantbench.engine.scheduler import Request, Scheduler
from quantbench.errors import GenerationError

__all__ = ["Detokenizer", "GenerationError", "Generator", "SamplingParams", "Sequence", "load_for_serving"]

PREFILL_TOKENS = 8192  # prompt tokens prefilled together at most (more wait for the next step)


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    @property
    def sampling(self) -> Sampling:
        return Sampling(self.temperature, self.top_k, self.top_p, self.seed)

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        self.sampling.check()
        if any(not s for s in self.stop):
            raise GenerationError("stop strings must not be empty")


@dataclass
class Sequence:
    """One prompt to continue; filled in by :meth:`Generator.run`."""

    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    on_text: Callable[[str], None] | None = None  # called with each new piece of stable text
    is_cancelled: Callable[[], bool] | None = None  # polled every step (client went away)
    on_finish: Callable[[Sequence], None] | None = None  # called once, when the sequence is done
    # results
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop" (EOS / stop string), "length", "cancelled", "error"
    error: BaseException | None = None  # why, when finish_reason is "error"
    first_token_s: float = 0.0  # seconds from submission to this sequence's first token
    total_s: float = 0.0

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


class Detokenizer:
    """Incremental detokenization with stop strings.

    ``push(token)`` returns the new text that is safe to show: decoding never ends in an incomplete UTF-8
    character (U+FFFD), and text that is a prefix of a stop string is held back until it is decided. Each
    push decodes a few tokens, not the whole sequence: the text of ``ids[prefix:]`` minus that of
    ``ids[prefix:read]``, where ``read`` is where the text was last complete and ``prefix`` the read point
    before it (decoding from one token earlier keeps what a tokenizer does to a window's first token, such
    as dropping its leading space, out of the new text).
    """

    def __init__(self, tokenizer: Any, stop: Seq[str] = (), lock: threading.Lock | None = None) -> None:
        self.tokenizer = tokenizer
        self.lock = lock or contextlib.nullcontext()
        self.stop = tuple(stop)
        self.ids: list[int] = []
        self.decoded = ""  # the text of ids[:read]
        self.text = ""  # what is shown in the end (cut at a stop string)
        self.emitted = 0  # characters of self.text already returned
        self.stopped = False
        self._prefix = 0
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        with self.lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _new_text(self) -> str:
        """The text the tokens after ``read`` add (it may end in U+FFFD: an incomplete character)."""
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        return after[len(before) :]

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(int(token_id))
        new = self._new_text()
        if new.endswith("\ufffd"):
            return ""  # a multi-byte character is not complete yet
        self.decoded += new
        self._prefix, self._read = self._read, len(self.ids)
        text = self.text = self.decoded
        if self.stop:
            # The earliest stop string that appears in the new region ends the text.
            search_from = max(0, self.emitted - max(len(s) for s in self.stop))
            hits = [i for i in (text.find(s, search_from) for s in self.stop) if i >= 0]
            if hits:
                self.text = text[: min(hits)]
                self.stopped = True
                return self._take(len(self.text))
            return self._take(len(text) - self._held_back(text))
        return self._take(len(text))

    def flush(self) -> str:
        """The rest of the text at the end of generation."""
        if not self.stopped and self._read < len(self.ids):
            self.decoded += self._new_text().rstrip("\ufffd")
            self._prefix = self._read = len(self.ids)
            self.text = self.decoded
        return self._take(len(self.text))

    def _held_back(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
        best = 0
        for stop in self.stop:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best

    def _take(self, upto: int) -> str:
        upto = max(upto, self.emitted)
        piece = self.text[self.emitted : upto]
        self.emitted = upto
        return piece


def engine_unsupported(model: nn.Module) -> str | None:
    """None when the quantbench engine can run ``model``, else why not."""
    try:
        from quantbench.engine.model import sliding_window, unsupported_reason
    except ImportError as exc:  # pragma: no cover - the engine is part of the package
        return f"engine not importable ({exc})"
    reason = unsupported_reason(model)
    if reason is None and sliding_window(model.config) is not None:
        reason = "sliding-window attention"
    return reason


# ---------------------------------------------------------------------------------------------------------


def context_length(model: nn.Module, tokenizer: Any = None) -> int:
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if isinstance(limit, int) and 0 < limit < 10**7 else 2048


def eos_ids(model: nn.Module, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None), tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


# Used when a tokenizer has no chat template of its own.
FALLBACK_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


class Generator:
    """Generation over one loaded model: prompt encoding, chat templates, and the generation loop.

    ``backend``: ``"auto"`` (the engine on CUDA when it supports the model, else HF), ``"hf"`` or
    ``"engine"``. ``max_batch``: sequences running together at most (more wait for a free slot).
    :meth:`run` may be called from several threads, and beside a server's worker: whoever holds
    ``step_lock`` runs the next step for every request. Prompt encoding may happen in other threads too (a
    lock guards the tokenizer, which Rust does not let two threads borrow at once).
    """

    def __init__(self, model: nn.Module, tokenizer: Any, backend: str = "auto", max_batch: int = 64) -> None:
        if tokenizer is None:
            raise GenerationError("the model has no tokenizer (a checkpoint saved without tokenizer files?)")
        self.model = model
        self.tokenizer = tokenizer
        self.lock = threading.Lock()
        self.step_lock = threading.Lock()
        self.device = next(model.parameters()).device
        self.context_length = context_length(model, tokenizer)
        self.eos = eos_ids(model, tokenizer)
        self.fallback_reason: str | None = None
        if backend not in ("auto", "hf", "engine"):
            raise GenerationError(f"unknown backend '{backend}'; allowed: auto, hf, engine")
        from quantbench.engine import Engine
        from quantbench.engine.hf_slots import HFSlots

        slots = None
        if backend == "engine" or (backend == "auto" and self.device.type == "cuda"):
            reason = engine_unsupported(model)
            if reason is None:
                try:
                    slots = Engine(model).serving_slots(self.context_length)
                except (ValueError, RuntimeError, ImportError) as exc:
                    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            self.fallback_reason = reason
        if slots is None:
            slots = HFSlots(model, 1, 1)
        self.scheduler = Scheduler(
            slots, max_batch, sync_every=1, prefill_tokens=PREFILL_TOKENS, max_columns=self.context_length
        )

    @property
    def backend(self) -> str:
        return self.scheduler.slots.name

    @property
    def path(self) -> str:
        text = f"{self.scheduler.slots.describe()}, continuous batching"
        if self.fallback_reason:
            text += f" (engine unavailable: {self.fallback_reason})"
        return f"{text} on {self.device}"

    # -- prompts -----------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        with self.lock:
            return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        """The prompt text for ``messages`` (the tokenizer's chat template, or a plain ``role: text`` one)."""
        kwargs: dict[str, Any] = {"tokenize": False, "add_generation_prompt": True}
        if not self.has_chat_template:
            kwargs["chat_template"] = FALLBACK_CHAT_TEMPLATE
        try:
            with self.lock:
                return self.tokenizer.apply_chat_template(messages, **kwargs)
        except Exception as exc:  # noqa: BLE001 - template errors are user errors (bad roles...)
            raise GenerationError(f"chat template failed: {str(exc).splitlines()[0]}") from None

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        # The template already holds the special tokens (<|im_start|>...): add none.
        text = self.chat_prompt(messages)
        with self.lock:
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def check_sequence(self, s: Sequence) -> None:
        """What the loop requires of one sequence (a server checks each request's before queueing it)."""
        s.params.check()
        if not s.prompt_ids:
            raise GenerationError("empty prompt")
        vocab = getattr(getattr(self.model, "config", None), "vocab_size", None)
        if vocab is not None and any(not 0 <= int(i) < vocab for i in s.prompt_ids):
            raise GenerationError(f"token ids must be in [0, {vocab})")
        if len(s.prompt_ids) + s.params.max_new_tokens > self.context_length:
            raise GenerationError(
                f"prompt of {len(s.prompt_ids)} tokens + {s.params.max_new_tokens} new tokens exceeds the "
                f"context of {self.context_length}"
            )

    # -- decoding ----------------------------------------------------------------------------------------
    def request(self, s: Sequence) -> Request:
        """The loop's request for ``s``: its tokens go through a detokenizer into ``s`` and its callbacks."""
        detok = Detokenizer(self.tokenizer, s.params.stop, self.lock)

        def on_token(token: int) -> bool:
            s.token_ids.append(token)
            piece = detok.push(token)
            if piece and s.on_text is not None:
                s.on_text(piece)
            return detok.stopped

        def on_finish(req: Request) -> None:
            if req.finish_reason != "cancelled":
                piece = detok.flush()
                if piece and s.on_text is not None:
                    s.on_text(piece)
            s.text = detok.text
            s.error = req.error
            if req.first_token_s:
                s.first_token_s = req.first_token_s - req.submitted_s
            s.total_s = req.finished_s - req.submitted_s
            s.finish_reason = req.finish_reason
            if s.on_finish is not None:
                s.on_finish(s)

        return Request(
            prompt=list(s.prompt_ids),
            max_new_tokens=s.params.max_new_tokens,
            sampling=s.params.sampling,
            stop_ids=frozenset() if s.params.ignore_eos else frozenset(self.eos),
            on_token=on_token,
            on_finish=on_finish,
            is_cancelled=s.is_cancelled,
        )

    def submit(self, s: Sequence) -> Request:
        """Queue ``s`` for the loop (checked first); a caller or a server worker then steps the loop."""
        self.check_sequence(s)
        return self._enqueue(s)

    def _enqueue(self, s: Sequence) -> Request:
        req = self.request(s)
        self.scheduler.submit(req)
        return req

    def step(self) -> None:
        with self.step_lock:
            self.scheduler.step()

    @torch.inference_mode()
    def run(self, seqs: list[Sequence]) -> list[Sequence]:
        """Generate for every sequence (in place, beside whatever else the loop runs); returns ``seqs``.
        Raises the error of a sequence that failed."""
        for s in seqs:  # every sequence checked before any is queued
            self.check_sequence(s)
        requests = [self._enqueue(s) for s in seqs]
        while not all(r.done for r in requests):
            self.step()
        failed = next((r.error for r in requests if r.error is not None), None)
        if failed is not None:
            raise failed
        return seqs

    def generate(
        self, prompt: str | list[int], params: SamplingParams | None = None, on_text=None
    ) -> Sequence:
        """Continue one prompt (text or token ids)."""
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        seq = Sequence(ids, params or SamplingParams(), on_text)
        self.run([seq])
        return seq


def load_for_serving(
    model_spec: str,
    method: str | None = None,
    device: str | None = None,
    dtype: str = "auto",
    cache_dequantized: bool | None = None,
    calib: str | None = None,
) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` from :func:`quantbench.loader.load`: a packaged model / HF dir / .gguf (quantized
    with ``method`` if given, calibrated methods on ``calib``) or a quantbench checkpoint (``method`` must be
    None). Without a method the model is served unquantized in ``dtype``; ``auto``: float32 on CPU, bfloat16
    on CUDA (loaded straight in that dtype: no float32 copy on the GPU first).

    ``cache_dequantized`` (default: on for CPU): quantized layers keep their dequantized weight between
    forwards (same outputs; decoding no longer re-decodes every weight each token, at the memory cost of a
    16-bit copy). CUDA runs the engine's kernels on the packed weights instead.
    """
    from quantbench import loader

    device = loader.check_device(device)
    load_dtype = "fp32"
    if method is None and not loader.is_checkpoint(model_spec):
        from quantbench.models import parse_dtype

        if dtype == "auto":
            dtype = "bf16" if device.startswith("cuda") else "fp32"
        names = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
        load_dtype = method = names[parse_dtype(dtype)]  # the unquantized baseline of that dtype
    loaded = loader.load(
        model_spec, method, calib=calib, device=device, dtype=load_dtype, dequant_cache=cache_dequantized
    )
    return loaded.model, loaded.tokenizer

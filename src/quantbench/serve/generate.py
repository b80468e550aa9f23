"""Text generation for ``quantbench generate`` / ``chat`` / ``serve``: batched, streamed, per-request sampling.

One decode loop serves everything. A batch of :class:`Sequence` objects (each with its own prompt, sampling
parameters, seed and stop strings) is left-padded, prefilled in one forward, then decoded one token per step;
each sequence streams its new text through an incremental detokenizer as soon as it is stable (no half UTF-8
characters, nothing that could still turn into a stop string) and leaves the batch's output when it hits EOS,
a stop string or its token limit. The loop stops when every sequence is done.

Two backends run the forward passes:

* ``hf``: the Hugging Face model with its KV cache (any architecture; the CPU default);
* ``engine``: ``quantbench.engine.EngineModel`` (static KV cache, Triton kernels for the quantized linears;
  the CUDA default for the Llama / Mistral / Qwen2 family). It falls back to ``hf`` when it cannot run.

Sampling: greedy when ``temperature == 0``, else temperature / top-k / top-p with a per-sequence
``torch.Generator`` (so a seeded request gives the same text alone or inside a batch).
"""

from __future__ import annotations

import contextlib
import secrets
import threading
import time
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from quantbench.errors import QuantbenchError


class GenerationError(QuantbenchError, ValueError):
    """Bad generation arguments (a prompt too long, a bad temperature, no tokenizer...)."""


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0.0 <= self.temperature <= 100.0:
            raise GenerationError(f"temperature must be in [0, 100], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise GenerationError(f"top_k must be >= 0, got {self.top_k}")
        if any(not s for s in self.stop):
            raise GenerationError("stop strings must not be empty")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise GenerationError(f"seed must be in 0..2**63-1, got {self.seed}")


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
    first_token_s: float = 0.0  # seconds from the start of the batch to this sequence's first token
    total_s: float = 0.0

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


class Detokenizer:
    """Incremental detokenization with stop strings.

    ``push(token)`` returns the new text that is safe to show: decoding never ends in an incomplete UTF-8
    character (U+FFFD), and text that is a prefix of a stop string is held back until it is decided.
    """

    def __init__(self, tokenizer: Any, stop: Seq[str] = (), lock: threading.Lock | None = None) -> None:
        self.tokenizer = tokenizer
        self.lock = lock or contextlib.nullcontext()
        self.stop = tuple(stop)
        self.ids: list[int] = []
        self.text = ""  # everything decoded so far (cut at a stop string)
        self.emitted = 0  # characters of self.text already returned
        self.stopped = False

    def _decode(self) -> str:
        with self.lock:
            return self.tokenizer.decode(
                self.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
            )

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(int(token_id))
        text = self._decode()
        if text.endswith("\ufffd"):
            return ""  # a multi-byte character is not complete yet
        self.text = text
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
        if not self.stopped and self.ids:
            text = self._decode()
            self.text = text.rstrip("\ufffd") if text.endswith("\ufffd") else text
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


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token from ``logits [V]`` (greedy when temperature is 0).

    Sampling is by inverse CDF with one uniform draw from ``generator`` (``torch.multinomial`` over a
    150k vocabulary costs tens of milliseconds on a CPU; a cumsum and a binary search cost well under one).
    """
    if params.temperature == 0.0:
        return int(torch.argmax(logits))
    scores = logits.detach().float().cpu() / params.temperature  # the generator and the draw live on CPU
    if params.top_k and params.top_k < scores.shape[-1]:
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    order = None
    probs = torch.softmax(scores, dim=-1)
    if params.top_p < 1.0:
        # The nucleus is usually small: look at the top 256 first, sort everything only when needed.
        k = min(256, probs.shape[-1])
        top, order = torch.topk(probs, k)
        if float(top.sum()) < params.top_p and k < probs.shape[-1]:
            top, order = torch.sort(probs, descending=True)
        cdf = top.cumsum(-1)
        keep = int(torch.searchsorted(cdf, torch.tensor([params.top_p]))) + 1  # the token crossing top_p too
        probs = top[:keep]
    cdf = probs.cumsum(-1)
    u = torch.rand(1, generator=generator) * cdf[-1]
    index = min(int(torch.searchsorted(cdf, u, right=True)), probs.shape[-1] - 1)
    return int(order[index]) if order is not None else index


# ---------------------------------------------------------------------------------------------------------
# Backends: prefill a left-padded batch, then one token per sequence per step.


class HFBackend:
    """The Hugging Face model and its own KV cache."""

    name = "hf"

    def __init__(self, model: nn.Module) -> None:
        import inspect

        self.model = model
        self.device = next(model.parameters()).device
        params = inspect.signature(model.forward).parameters
        # transformers >= 5.2x names the KV cache `cache` (was `past_key_values`).
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        self.extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self.cache: Any = None

    def describe(self) -> str:
        return "HF forward + KV cache"

    def _forward(self, **kwargs: Any) -> torch.Tensor:
        if self.cache is not None:
            kwargs[self.cache_arg] = self.cache
        out = self.model(**kwargs, use_cache=True, **self.extra)
        self.cache = getattr(out, self.cache_arg, None)
        if self.cache is None:
            self.cache = getattr(out, "past_key_values", None)
        return out.logits[:, -1, :]

    def prefill(self, ids: torch.Tensor, pad: torch.Tensor, max_total: int) -> torch.Tensor:
        batch, length = ids.shape
        self.mask = (torch.arange(length, device=self.device)[None, :] >= pad[:, None]).long()
        self.positions = (self.mask.cumsum(-1) - 1).clamp(min=0)
        self.next_pos = self.positions[:, -1:] + 1
        self.cache = None
        return self._forward(input_ids=ids, attention_mask=self.mask, position_ids=self.positions)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        self.mask = torch.cat([self.mask, self.mask.new_ones((self.mask.shape[0], 1))], dim=1)
        logits = self._forward(
            input_ids=tokens[:, None], attention_mask=self.mask, position_ids=self.next_pos
        )
        self.next_pos = self.next_pos + 1
        return logits

    def release(self) -> None:
        self.cache = None


class EngineBackend:
    """``quantbench.engine.EngineModel``: static KV cache, fused / Triton linears on CUDA (eager decode)."""

    name = "engine"
    ROUND = 64

    def __init__(self, model: nn.Module) -> None:
        from quantbench.engine.model import EngineModel

        self.em = EngineModel(model)
        self.device = self.em.device

    def describe(self) -> str:
        kind = "Triton kernels" if self.em.use_kernels else "pure-torch reference ops"
        return f"quantbench engine ({kind}, static KV cache)"

    def prefill(self, ids: torch.Tensor, pad: torch.Tensor, max_total: int) -> torch.Tensor:
        batch, length = ids.shape
        cache = -(-max_total // self.ROUND) * self.ROUND
        self.em.allocate_cache(batch, cache)
        self.start = pad.to(device=self.device, dtype=torch.int32)
        self.cache_len = torch.full((1,), length, dtype=torch.int32, device=self.device)
        return self.em.prefill(ids, self.start, bool(pad.any()))

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        logits = self.em.decode(tokens, self.cache_len, self.start)
        self.cache_len += 1
        return logits

    def release(self) -> None:
        pass


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
    """Generation over one loaded model: prompt encoding, chat templates, batched streamed decoding.

    ``backend``: ``"auto"`` (the engine on CUDA when it supports the model, else HF), ``"hf"`` or ``"engine"``.
    :meth:`run` is for one caller at a time (the server runs it in a single worker thread); prompt
    encoding may happen in other threads (a lock guards the tokenizer, which Rust does not let two threads
    borrow at once).
    """

    def __init__(self, model: nn.Module, tokenizer: Any, backend: str = "auto") -> None:
        if tokenizer is None:
            raise GenerationError("the model has no tokenizer (a checkpoint saved without tokenizer files?)")
        self.model = model
        self.tokenizer = tokenizer
        self.lock = threading.Lock()
        self.device = next(model.parameters()).device
        self.context_length = context_length(model, tokenizer)
        self.eos = eos_ids(model, tokenizer)
        self.fallback_reason: str | None = None
        if backend not in ("auto", "hf", "engine"):
            raise GenerationError(f"unknown backend '{backend}'; allowed: auto, hf, engine")
        want_engine = backend == "engine" or (backend == "auto" and self.device.type == "cuda")
        self.backend: HFBackend | EngineBackend
        if want_engine:
            reason = engine_unsupported(model)
            if reason is None:
                try:
                    self.backend = EngineBackend(model)
                except (ValueError, RuntimeError, ImportError) as exc:
                    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if reason is not None:
                self.fallback_reason = reason
                self.backend = HFBackend(model)
        else:
            self.backend = HFBackend(model)

    @property
    def path(self) -> str:
        text = self.backend.describe()
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
        """What :meth:`run` requires of one sequence (a server checks each request's before batching it)."""
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
    @torch.inference_mode()
    def run(self, seqs: list[Sequence]) -> list[Sequence]:
        """Generate for every sequence of the batch (in place); returns ``seqs``."""
        if not seqs:
            return seqs
        for s in seqs:
            self.check_sequence(s)
        start = time.perf_counter()
        batch = len(seqs)
        length = max(len(s.prompt_ids) for s in seqs)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((batch, length), pad_id, dtype=torch.long)
        pad = torch.zeros(batch, dtype=torch.long)
        for row, s in enumerate(seqs):
            ids[row, length - len(s.prompt_ids) :] = torch.tensor(s.prompt_ids)
            pad[row] = length - len(s.prompt_ids)
        ids, pad = ids.to(self.device), pad.to(self.device)
        steps = max(s.params.max_new_tokens for s in seqs)
        gens = []
        for s in seqs:
            gen = None
            if s.params.temperature > 0:
                gen = torch.Generator()
                gen.manual_seed(s.params.seed if s.params.seed is not None else secrets.randbits(63))
            gens.append(gen)
        detoks = [Detokenizer(self.tokenizer, s.params.stop, self.lock) for s in seqs]
        backend = self.backend
        try:
            logits = backend.prefill(ids, pad, length + steps)
            greedy_rows = [s.params.temperature == 0.0 for s in seqs]
            for step in range(steps):
                # One device -> host copy for every greedy row; sampled rows draw from their own generator.
                greedy = logits.argmax(dim=-1).tolist() if any(greedy_rows) else []
                tokens = []
                for row, s in enumerate(seqs):
                    if s.done:
                        tokens.append(pad_id)
                        continue
                    token = greedy[row] if greedy_rows[row] else sample_next(logits[row], s.params, gens[row])
                    tokens.append(token)
                    self._advance(s, detoks[row], token, step, start)
                if all(s.done for s in seqs) or step == steps - 1:
                    break
                logits = backend.decode(torch.tensor(tokens, device=self.device))
        except Exception:
            for s in seqs:
                if not s.done:
                    s.finish_reason = "error"
            raise
        finally:
            backend.release()
        end = time.perf_counter() - start
        for s in seqs:
            if not s.done:  # pragma: no cover - every sequence ends by its token limit at the latest
                s.finish_reason = "length"
            s.total_s = s.total_s or end
        return seqs

    def _advance(self, s: Sequence, detok: Detokenizer, token: int, step: int, start: float) -> None:
        if step == 0:
            s.first_token_s = time.perf_counter() - start
        if s.is_cancelled is not None and s.is_cancelled():
            s.finish_reason = "cancelled"
        elif token in self.eos and not s.params.ignore_eos:
            s.finish_reason = "stop"
        else:
            s.token_ids.append(token)
            piece = detok.push(token)
            if detok.stopped:
                s.finish_reason = "stop"
            elif len(s.token_ids) >= s.params.max_new_tokens:
                s.finish_reason = "length"
            self._emit(s, piece)
        if s.done:
            if s.finish_reason != "cancelled":
                self._emit(s, detok.flush())
            s.text = detok.text
            s.total_s = time.perf_counter() - start
            if s.on_finish is not None:
                s.on_finish(s)

    @staticmethod
    def _emit(s: Sequence, piece: str) -> None:
        if piece and s.on_text is not None:
            s.on_text(piece)

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

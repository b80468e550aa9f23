"""The model side of evaluation: any Hugging Face causal LM (quantbench-quantized ones included) behind two
operations, log-likelihood of continuations and greedy generation, with a shared-prefix KV cache.

Shared-prefix reuse: :meth:`HFLM.prefix_state` runs one or several prefixes (e.g. the few-shot prompts of
several subjects) once, left-padded in one batch, and keeps their ``DynamicCache``. Each batch of rows then
deep-copies that cache and selects, for every row, the prefix it continues (``batch_select_indices``), so
only the rows' own tokens are run. The LM head runs only on the positions that are scored.

Batching is exact: a row's answer never depends on the other rows of its batch, on the batch size or on
padding. Every row's real tokens are contiguous: a row continues its prefix at once and is padded on the
right, ``[pad][its prefix (cached)][row tokens][pad ... pad]`` (without a cache, ``[prefix + row][pad]``), and
the logits are read at each row's own last tokens. The 2-D attention mask is 1 exactly on real tokens and
position ids are given explicitly (``cumsum(mask) - 1``). Contiguity matters for sliding-window and chunked
attention (Mistral, Gemma 2/3, Phi-3, ...): their masks compare column indices, so padding between a prefix
and its row would move real tokens out of the window.

Greedy generation appends every new token after the batch's longest row; for full attention the padding in
between is masked and changes nothing, but under a sliding window it would, so for such models rows of
different lengths are generated in separate batches (``HFLM.windowed`` says whether a model is one).

:class:`quantbench.eval.engine_lm.EngineLM` is this class with its three forwards (``prefix_state``,
``_forward``, ``_step``) run by quantbench's engine instead of the HF module: same batches, same answers.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from quantbench.engine.hf_slots import cache_argument, output_cache


def _gather_hook(scored: torch.Tensor) -> Callable[..., Any]:
    """A forward pre-hook for the LM head: keep, per row, the hidden states at ``scored`` ``[B, K]``."""

    def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        hidden = args[0]
        index = scored[:, :, None].expand(-1, -1, hidden.shape[-1])
        return (hidden.gather(1, index), *args[1:])

    return hook


def is_windowed(config: Any) -> bool:
    """Whether some attention layer of a model with this config sees only a window of the past (sliding
    window or chunked attention): then token columns, not only positions, decide what a token sees."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return any(t != "full_attention" for t in layer_types)
    if getattr(config, "attention_chunk_size", None):
        return True
    window = getattr(config, "sliding_window", None)
    return bool(window) and getattr(config, "use_sliding_window", True) is not False


@dataclass
class PrefixState:
    """Tokenized shared prefixes and, when reuse is on, their KV cache (batch = number of prefixes, left-padded
    to ``width`` tokens; ``mask`` [n, width] marks the real ones)."""

    prefixes: list[list[int]]
    cache: Any | None = None
    width: int = 0
    mask: torch.Tensor | None = None


def scored_positions(ends: torch.Tensor, keep: int) -> torch.Tensor:
    """``[B, keep]``: the ``keep`` positions of each row that end at its last real token (``ends[b]`` real
    tokens, counted from the row's first column)."""
    return (ends[:, None] - keep + torch.arange(keep)[None, :]).clamp(min=0)


class HFLM:
    """A causal LM + tokenizer, scoring batches of rows that share a prefix.

    ``fp32_logits``: for bf16/fp16 models, the scored positions' logits are recomputed in float32 from the
    LM head's input (a forward hook) and its weight. A bf16 logit has a resolution of ~0.06 at typical
    magnitudes, so the four answer letters often tie exactly and the argmax then depends on the order of
    the letters and on batch shapes; float32 logits remove those ties. On the first forward they are checked
    against the model's own logits (a model with logit soft-capping or scaling falls back to its own).

    ``calls`` counts model forwards and ``tokens`` the tokens fed to the model (tests read them).
    ``scoring`` says which forward scores the requests (printed by the commands; see
    :func:`quantbench.eval.engine_lm.scoring_lm`).
    """

    scoring = "HF forward"

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        batch_size: int = 8,
        prefix_reuse: bool = True,
        max_length: int | None = None,
        fp32_logits: bool = True,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = max(1, int(batch_size))
        self.prefix_reuse = prefix_reuse
        self.device = next(model.parameters()).device
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad) if pad is not None else 0
        self.eos_id = tokenizer.eos_token_id
        self._max_length = max_length
        self._cache_arg = cache_argument(model)
        self.calls = 0
        self._head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        head_weight = getattr(self._head, "weight", None)
        # None: not decided yet (checked against the model's own logits on the first forward).
        self._fp32_head: bool | None = (
            None if fp32_logits and self._head is not None and head_weight is not None else False
        )
        if isinstance(head_weight, torch.Tensor) and head_weight.dtype == torch.float32:
            self._fp32_head = False  # already float32
        self._head_input: torch.Tensor | None = None
        self.tokens = 0

    @property
    def max_length(self) -> int:
        """Longest sequence (prompt + generated tokens) the model accepts."""
        if self._max_length is not None:
            return self._max_length
        config = getattr(self.model, "config", None)
        for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            value = getattr(config, attr, None)
            if isinstance(value, int) and value > 0:
                return value
        value = getattr(self.tokenizer, "model_max_length", None)
        return value if isinstance(value, int) and 0 < value < 10**7 else 2048

    @property
    def windowed(self) -> bool:
        """Whether the model attends through a sliding window or chunks (see :func:`is_windowed`)."""
        return is_windowed(getattr(self.model, "config", None))

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text).input_ids)

    def encode_many(self, texts: Sequence[str]) -> list[list[int]]:
        """``[encode(t) for t in texts]`` in one tokenizer call (a fast tokenizer encodes them in parallel)."""
        if not texts:
            return []
        return [list(ids) for ids in self.tokenizer(list(texts)).input_ids]

    def continuation_ids(self, context: str, continuation: str) -> list[int]:
        """Tokens of ``continuation`` as they follow ``context`` (encode both, take the tail)."""
        whole = self.encode(context + continuation)
        ctx = self.encode(context)
        if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
            return whole[len(ctx) :]
        return list(self.tokenizer(continuation, add_special_tokens=False).input_ids)

    # -- forwards ---------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def prefix_state(self, prefixes: Sequence[Sequence[int]] | Sequence[int]) -> PrefixState:
        """Run the shared prefix(es) once, in one left-padded batch, and keep their KV cache.

        ``prefixes`` is one token list or a list of them. Without reuse (or for empty prefixes) nothing runs
        and the prefix tokens are prepended to every row instead.
        """
        if prefixes and isinstance(prefixes[0], int):
            prefixes = [prefixes]  # type: ignore[list-item]
        rows = [list(p) for p in prefixes]  # type: ignore[arg-type]
        if not self.prefix_reuse or not rows or not all(rows):
            return PrefixState(rows)
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self._call(
            input_ids=input_ids.to(self.device),
            attention_mask=mask.to(self.device),
            position_ids=positions.to(self.device),
            use_cache=True,
            logits_to_keep=1,
        )
        return PrefixState(rows, output_cache(out), width, mask)

    def _call(self, scored: torch.Tensor | None = None, **kwargs: Any) -> Any:
        """One model forward. ``scored`` ``[B, K]``: the positions whose logits are wanted, per row; the LM
        head then sees only those (``logits`` ``[B, K, V]``), else the model's ``logits_to_keep`` applies."""
        self.calls += 1
        self.tokens += int(kwargs["input_ids"].numel())
        hooks = []
        if scored is not None:
            if self._head is not None:
                kwargs["logits_to_keep"] = 0  # every position reaches the head, which keeps the scored ones
                hooks.append(self._head.register_forward_pre_hook(_gather_hook(scored.to(self.device))))
            else:
                kwargs.pop("logits_to_keep", None)
        if self._fp32_head is not False:
            hooks.append(self._head.register_forward_hook(self._capture_head_input))
        try:
            try:
                out = self.model(**kwargs)
            except TypeError as exc:  # a model without logits_to_keep
                if "logits_to_keep" not in str(exc):
                    raise
                kwargs.pop("logits_to_keep")
                out = self.model(**kwargs)
        finally:
            for hook in hooks:
                hook.remove()
        if scored is not None and self._head is None:  # no head to hook: gather from the full logits
            index = scored.to(out.logits.device)[:, :, None].expand(-1, -1, out.logits.shape[-1])
            out.logits = out.logits.gather(1, index)
        return out

    def _capture_head_input(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        self._head_input = args[0] if args else None

    def _head_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        head = self._head
        dequantize = getattr(head, "dequantize", None)
        weight = dequantize() if callable(dequantize) else head.weight
        return weight, getattr(head, "bias", None)

    def _logits(self, out: Any, keep: int) -> torch.Tensor:
        """Float32 logits ``[B, keep, V]`` of the last ``keep`` positions."""
        hidden, self._head_input = self._head_input, None
        return self._final_logits(out.logits[:, -keep:], None if hidden is None else hidden[:, -keep:])

    def _final_logits(self, model_logits: torch.Tensor | None, hidden: torch.Tensor | None) -> torch.Tensor:
        """Float32 logits from the model's own ``model_logits`` and the LM head's input ``hidden`` (same
        positions): recomputed in float32 from ``hidden`` while ``fp32_logits`` holds (see the class
        docstring), else the model's own. ``model_logits`` may be None once the float32 ones are chosen."""
        if self._fp32_head is False or hidden is None:
            return model_logits.float()
        hidden = hidden.float()
        weight, bias = self._head_weight()
        chunks = [
            F.linear(hidden, w.float(), None if bias is None else b.float())
            for w, b in zip(
                weight.split(16384),
                [None] * len(weight.split(16384)) if bias is None else bias.split(16384),
                strict=True,
            )
        ]
        logits = torch.cat(chunks, dim=-1)
        if self._fp32_head is None:  # first use: must agree with the model's own (rounded) logits
            ref = model_logits.float()
            self._fp32_head = logits.shape == ref.shape and bool(
                torch.allclose(logits, ref, rtol=2e-2, atol=0.15)
            )
            if not self._fp32_head:
                return ref
        return logits

    def _forward(
        self,
        state: PrefixState,
        rows: Sequence[Sequence[int]],
        keep: int,
        use_cache: bool = False,
        which: Sequence[int] | None = None,
        extra: int = 0,
    ) -> tuple[torch.Tensor, Any, torch.Tensor, torch.Tensor]:
        """Logits ``[B, keep, V]`` (float32) of the last ``keep`` real positions of each row after its prefix
        (``which[i]``: index of row i's prefix in ``state``, default 0). ``extra``: tokens that will be
        generated after the rows (a subclass with a narrower forward checks that they still fit it).

        Returns the logits, the batch's KV cache (for generation), the attention mask and the position id of
        every row's last real token.
        """
        which = [0] * len(rows) if which is None else list(which)
        cached = state.cache is not None
        if cached:
            seqs = [list(r) for r in rows]
            width = state.width
        else:
            heads = state.prefixes or [[]]
            seqs = [heads[w] + list(r) for w, r in zip(which, rows, strict=True)]
            width = 0
        batch, length = len(seqs), max(len(s) for s in seqs)
        input_ids = torch.full((batch, length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((batch, width + length), dtype=torch.long)
        if cached:
            mask[:, :width] = state.mask[which]
        for i, seq in enumerate(seqs):
            input_ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[i, width : width + len(seq)] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        ends = torch.tensor([len(seq) for seq in seqs])
        scored = scored_positions(ends, keep)
        kwargs: dict[str, Any] = {
            "input_ids": input_ids.to(self.device),
            "attention_mask": mask.to(self.device),
            "position_ids": positions[:, width:].to(self.device),
        }
        if cached:
            cache = copy.deepcopy(state.cache)
            if len(state.prefixes) == 1:
                if batch > 1:
                    cache.batch_repeat_interleave(batch)
            else:
                cache.batch_select_indices(torch.tensor(which, device=self.device))
            kwargs[self._cache_arg] = cache
            kwargs["use_cache"] = True
        else:
            kwargs["use_cache"] = use_cache
        out = self._call(scored=scored, **kwargs)
        logits = self._logits(out, keep)
        last_pos = positions[:, width:].gather(1, (ends - 1)[:, None])[:, 0]
        return logits, output_cache(out) if kwargs["use_cache"] else None, mask, last_pos

    # -- scoring ----------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def choice_logprobs(
        self,
        state: PrefixState,
        suffixes: Sequence[Sequence[int]],
        choices: Sequence[Sequence[int]],
        single_token_fast_path: bool = True,
        which: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """``[len(suffixes), len(choices)]``: log P(choice tokens | prefix + suffix), summed over tokens.

        When every choice is one token, one row per question suffices (the choice tokens are read off the
        last position's distribution); otherwise each (question, choice) pair is its own row.
        """
        if single_token_fast_path and all(len(c) == 1 for c in choices):
            logits, *_ = self._forward(state, suffixes, keep=1, which=which)
            logprobs = F.log_softmax(logits[:, -1], dim=-1)
            return logprobs[:, [c[0] for c in choices]].cpu()
        rows = [list(s) + list(c) for s in suffixes for c in choices]
        lengths = [len(c) for _ in suffixes for c in choices]
        row_which = None if which is None else [w for w in which for _ in choices]
        keep = max(lengths) + 1
        logits, *_ = self._forward(state, rows, keep=keep, which=row_which)
        logprobs = F.log_softmax(logits, dim=-1)
        scores = torch.empty(len(rows))
        for r, (row, m) in enumerate(zip(rows, lengths, strict=True)):
            cont = torch.tensor(row[-m:], device=logprobs.device)
            lp = logprobs[r, keep - 1 - m : keep - 1].gather(-1, cont[:, None])
            scores[r] = lp.sum()
        return scores.reshape(len(suffixes), len(choices))

    @torch.inference_mode()
    def greedy(
        self,
        state: PrefixState,
        suffixes: Sequence[Sequence[int]],
        max_new_tokens: int,
        done: Callable[[str], bool] | None = None,
        which: Sequence[int] | None = None,
    ) -> list[str]:
        """Greedy continuation of each ``prefix + suffix``, at most ``max_new_tokens`` tokens.

        A row stops at EOS or once ``done(text so far)`` is true; the loop ends when every row has stopped.
        Under windowed attention, rows of different lengths run as separate batches (module docstring).
        """
        which = [0] * len(suffixes) if which is None else list(which)
        if max_new_tokens > 1 and self.windowed:
            # Where each row ends: after its suffix, plus its prefix when that is not cached.
            inline = state.cache is None and bool(state.prefixes)
            lengths = [
                len(s) + (len(state.prefixes[w]) if inline else 0)
                for s, w in zip(suffixes, which, strict=True)
            ]
            if len(set(lengths)) > 1:
                texts: list[str] = [""] * len(suffixes)
                for length in dict.fromkeys(lengths):
                    rows = [i for i, n in enumerate(lengths) if n == length]
                    part = self.greedy(
                        state, [suffixes[i] for i in rows], max_new_tokens, done, [which[i] for i in rows]
                    )
                    for i, text in zip(rows, part, strict=True):
                        texts[i] = text
                return texts
        logits, cache, mask, last_pos = self._forward(
            state, suffixes, keep=1, use_cache=max_new_tokens > 1, which=which, extra=max_new_tokens - 1
        )
        batch = len(suffixes)
        generated: list[list[int]] = [[] for _ in range(batch)]
        finished = [False] * batch
        for step in range(max_new_tokens):
            next_ids = logits[:, -1].argmax(-1).cpu()
            for i in range(batch):
                if finished[i]:
                    continue
                token = int(next_ids[i])
                if self.eos_id is not None and token == self.eos_id:
                    finished[i] = True
                    continue
                generated[i].append(token)
                if done is not None and done(self.tokenizer.decode(generated[i])):
                    finished[i] = True
            if all(finished) or step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones((batch, 1), dtype=mask.dtype)], dim=-1)
            last_pos = last_pos + 1
            logits, cache = self._step(cache, next_ids, mask, last_pos)
        return [self.tokenizer.decode(g) for g in generated]

    def _step(
        self, cache: Any, tokens: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, Any]:
        """One greedy step: ``tokens [B]`` at ``positions [B]`` after ``cache`` (``mask``: every column,
        the new one included) -> (float32 logits ``[B, 1, V]``, the grown cache)."""
        out = self._call(
            input_ids=tokens[:, None].to(self.device),
            attention_mask=mask.to(self.device),
            position_ids=positions[:, None].to(self.device),
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_arg: cache},
        )
        return self._logits(out, 1), output_cache(out)

    @torch.inference_mode()
    def next_tokens(
        self, state: PrefixState, suffixes: Sequence[Sequence[int]], which: Sequence[int] | None = None
    ) -> list[int]:
        """The greedy next token of each ``prefix + suffix``, whatever it is (EOS included)."""
        logits, *_ = self._forward(state, suffixes, keep=1, which=which)
        return [int(t) for t in logits[:, -1].argmax(-1).cpu()]

    # -- lm-evaluation-harness style requests (no shared prefix) ----------------------------------------------

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        """``(log P(continuation | context), is_greedy)`` for each ``(context, continuation)`` request."""
        results: list[tuple[float, bool]] = []
        empty = PrefixState([[]])
        for start in range(0, len(requests), self.batch_size):
            chunk = requests[start : start + self.batch_size]
            rows, conts = [], []
            for context, continuation in chunk:
                cont = self.continuation_ids(context, continuation)
                rows.append(self.encode(context) + cont)
                conts.append(cont)
            keep = max(len(c) for c in conts) + 1
            with torch.inference_mode():
                logits, *_ = self._forward(empty, rows, keep=keep)
                logprobs = F.log_softmax(logits, dim=-1)
            for r, cont in enumerate(conts):
                m = len(cont)
                lp = logprobs[r, keep - 1 - m : keep - 1]
                target = torch.tensor(cont, device=lp.device)
                greedy = bool((lp.argmax(-1) == target).all())
                results.append((float(lp.gather(-1, target[:, None]).sum()), greedy))
        return results

    def generate_until(self, requests: Sequence[tuple[str, int]]) -> list[str]:
        """Greedy generation for each ``(context, max_new_tokens)`` request."""
        out: list[str] = []
        empty = PrefixState([[]])
        for context, max_new in requests:
            out.extend(self.greedy(empty, [self.encode(context)], max_new))
        return out

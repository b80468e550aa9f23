"""Run any lm-evaluation-harness (lm-eval 0.4.x) task on a quantbench model.

Three ways in:

* Python: ``QuantbenchLM(path="qwen2.5-coder-0.5b", method="nf4:block=64,dq=1")`` is an ``lm_eval`` model
  (registered as ``quantbench`` when this module is imported): pass it to ``lm_eval.simple_evaluate``.
* lm-eval's own command line: lm-eval 0.4.13 finds models only in its registry (no entry points for models),
  so run it through this module, which registers the model and then hands over to lm-eval's CLI::

      python -m quantbench.eval.lmeval_adapter --model quantbench \\
          --model_args path=qwen2.5-coder-0.5b,method=int8,device=cpu --tasks TASK --include_path DIR

* ``quantbench eval MODEL --tasks lmeval:TASK[,TASK...] [--lmeval-include DIR]``: the results go to the same
  SQLite store as quantbench's own tasks (see :func:`run_lmeval`).

Scoring runs on quantbench's engine (:class:`quantbench.eval.lm.HFLM`): exact batches (rows contiguous
with their prefix, right-padded) with explicit position ids, only the needed logits computed, and shared-prefix
KV-cache reuse. Requests are arranged in a prefix tree of their token ids; a shared prefix (few-shot examples, the question in front of several answer
choices) is run once and its cache reused when that saves at least ``prefix_min_tokens`` tokens of compute.
The numbers are lm-eval's ``hf`` model's: same tokenization (trailing context spaces move to the continuation,
an empty context is replaced by the BOS/EOS prefix token), same left truncation to ``max_length``, same
disjoint rolling windows for ``loglikelihood_rolling``, greedy ``generate_until`` with the task's ``until``
strings plus EOS and ``max_gen_toks``.

lm-eval stays optional (``pip install quantbench[lmeval]``): no core module imports this one. Everything runs
offline (``HF_HUB_OFFLINE=1``, ``HF_DATASETS_OFFLINE=1`` are forced): a task whose data lm-eval would fetch
from the Hugging Face hub fails at once with a one-line :class:`LmEvalError`; give such a task a local copy
of its data through a task YAML (``dataset_path: json`` + ``dataset_kwargs: {data_files: ...}``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from quantbench.errors import QuantbenchError
from quantbench.eval.batching import plan_batches

LMEVAL_PREFIX = "lmeval:"
LMEVAL_PIP = "quantbench[lmeval]"  # pins lm-eval==0.4.13
MODEL_NAME = "quantbench"
DEFAULT_MAX_GEN_TOKS = 256
_BASELINES = {
    "bf16": "bf16",
    "bfloat16": "bf16",
    "fp16": "fp16",
    "float16": "fp16",
    "half": "fp16",
    "fp32": "fp32",
    "float32": "fp32",
    "float": "fp32",
}

logger = logging.getLogger("quantbench")


class LmEvalError(QuantbenchError):
    """lm-eval is missing, a task is unknown or needs hub data, or the adapter got bad arguments."""


def force_offline() -> None:
    """No hub access, ever: set the offline switches, also in modules that already read them."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
    config = sys.modules.get("datasets.config")
    if config is not None:
        config.HF_HUB_OFFLINE = True
        config.HF_DATASETS_OFFLINE = True


force_offline()

try:  # lm-eval is an optional extra
    import lm_eval.models  # noqa: F401  (fills lm-eval's registry first: get_model() only does it when empty)
    from lm_eval.api.model import TemplateLM as _Base
    from lm_eval.api.registry import model_registry, register_model

    HAVE_LM_EVAL = True
except ImportError:  # pragma: no cover - exercised without the extra
    _Base = object  # type: ignore[assignment,misc]
    HAVE_LM_EVAL = False


def require_lm_eval() -> None:
    if not HAVE_LM_EVAL:
        raise LmEvalError(f"lm-evaluation-harness is not installed: pip install {LMEVAL_PIP}")


# -- model loading ----------------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any
    load_s: float = 0.0
    quantize_s: float = 0.0


def resolve_method(method: str | None, dtype: str | None, extra: dict[str, Any] | None = None) -> str | None:
    """The method spec from lm-eval style ``model_args``.

    lm-eval splits ``model_args`` at every comma, so ``method=nf4:block=64,dq=1`` arrives as
    ``method='nf4:block=64'`` plus ``dq=1``: such leftovers are folded back into the spec (``;`` also works as
    the option separator). ``dtype`` alone picks an unquantized baseline (``float32`` -> ``fp32``).
    """
    extra = dict(extra or {})
    if method is not None:
        method = str(method).replace(";", ",").strip()
        if extra:
            options = [k if v in ("", None) else f"{k}={_arg_text(v)}" for k, v in extra.items()]
            method += ("," if ":" in method else ":") + ",".join(options)
        if dtype not in (None, "", "auto"):
            base = _BASELINES.get(str(dtype).lower())
            if base is None or method.split(":")[0].strip().lower() != base:
                raise LmEvalError(
                    f"dtype={dtype} with method={method}: give one of them (a method's compute dtype is its "
                    "compute= option)"
                )
        return method
    if extra:
        raise LmEvalError(f"unknown model_args for {MODEL_NAME}: {', '.join(sorted(extra))}")
    if dtype in (None, "", "auto"):
        return None
    base = _BASELINES.get(str(dtype).lower())
    if base is None:
        raise LmEvalError(f"unknown dtype '{dtype}'; allowed: {', '.join(sorted(set(_BASELINES)))}")
    return base


def _arg_text(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def load_quantbench_model(
    spec: str, method: str | None = None, device: str | None = None, calib: str | None = None
) -> LoadedModel:
    """Load ``spec`` (packaged name, HF dir, .gguf, quantbench checkpoint) and quantize it with ``method``
    through :func:`quantbench.loader.load`, like every command (calibrated methods use ``calib``, default:
    the default calibration set; on CPU the dequantization cache is on)."""
    from quantbench import loader

    loaded = loader.load(spec, method, calib=calib, device=device)
    return LoadedModel(loaded.model, loaded.tokenizer, load_s=loaded.load_s, quantize_s=loaded.quantize_s)


def _cache_dequantized(model: nn.Module) -> None:
    """On the CPU reference path keep dequantized weights between forwards (same numbers, much faster)."""
    from quantbench.quant import apply

    enable = getattr(apply, "set_dequant_cache", None)
    if enable is not None and next(model.parameters()).device.type == "cpu":
        enable(model, True)


# -- request scoring on the quantbench engine ---------------------------------------------------------------------


@dataclass
class _Target:
    """One loglikelihood request attached to a unique input row."""

    index: int
    cont: list[int]


@dataclass
class _Row:
    """A unique model input ``(context + continuation)[:-1]`` and the requests scored on it.

    ``keep``: how many final positions are scored (the longest continuation among its targets);
    ``shared``: the tokens before the first scored position, which may come from a cached prefix.
    """

    ids: tuple[int, ...]
    keep: int
    targets: list[_Target] = field(default_factory=list)

    @property
    def shared(self) -> tuple[int, ...]:
        return self.ids[: len(self.ids) - self.keep]


@dataclass
class _Group:
    """Rows with the same shared part (one context and its several continuations)."""

    shared: tuple[int, ...]
    rows: list[_Row]


def _lcp(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class _TokenizerForGeneration:
    """The tokenizer as the engine's greedy loop should see it: text decoded without special tokens, the
    way lm-eval's ``hf`` model decodes generations."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer

    def decode(self, ids: Any, **kwargs: Any) -> str:
        kwargs.setdefault("skip_special_tokens", True)
        return self._tokenizer.decode(ids, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._tokenizer(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)


class QuantbenchLM(_Base):  # type: ignore[misc,valid-type]
    """An lm-eval model backed by a quantbench model (any method, CPU or CUDA).

    ``model_args`` (all optional): ``path`` (or ``pretrained``: packaged model name, HF directory, ``.gguf``,
    quantbench checkpoint; default the packaged default model), ``method`` (quantbench spec, default ``bf16``),
    ``calib`` (calibration data of gptq / awq / smoothquant, ``SOURCE:NxL``; default the default set),
    ``dtype`` (an unquantized baseline instead of ``method``), ``device``, ``batch_size`` (rows per forward),
    ``max_length`` (context length; default as lm-eval's ``hf`` model resolves it), ``max_gen_toks`` (default
    256), ``prefix_reuse`` (default true), ``prefix_min_tokens`` (default 16), ``add_bos_token``,
    ``prefix_token_id``, ``logits_mb`` (memory for one forward's logits, default 1024).
    From Python also ``model=`` / ``tokenizer=`` (an already loaded model; ``method`` then quantizes it in place)
    and ``store=`` (a :class:`~quantbench.eval.store.ResultStore`: every answer is kept there and a rerun
    reads it back instead of recomputing).
    """

    backend = "causal"

    def __init__(
        self,
        path: str | None = None,
        method: str | None = None,
        *,
        pretrained: Any = None,
        model: nn.Module | None = None,
        tokenizer: Any = None,
        dtype: str | None = None,
        device: str | None = None,
        batch_size: int | str | None = 16,
        max_batch_size: int | None = None,
        max_length: int | None = None,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        prefix_reuse: bool = True,
        prefix_min_tokens: int = 16,
        add_bos_token: bool | None = None,
        prefix_token_id: int | None = None,
        logits_mb: float = 1024,
        store: Any = None,
        calib: str | None = None,
        **method_options: Any,
    ) -> None:
        require_lm_eval()
        super().__init__()
        from quantbench import quantize
        from quantbench.eval.harness import model_identity
        from quantbench.eval.lm import HFLM

        del max_batch_size  # lm-eval passes it along; batch_size is the most rows a planned batch holds
        if isinstance(pretrained, nn.Module):
            model, pretrained = pretrained, None
        if path is not None and pretrained is not None and str(path) != str(pretrained):
            raise LmEvalError("give path= or pretrained=, not both")
        self.model_spec = str(
            path if path is not None else pretrained if pretrained is not None else "default"
        )
        spec = resolve_method(method, dtype, method_options)
        self.load_s = self.quantize_s = 0.0
        if model is None:
            loaded = load_quantbench_model(self.model_spec, spec, device, calib)
            model, tokenizer = loaded.model, loaded.tokenizer
            self.load_s, self.quantize_s = loaded.load_s, loaded.quantize_s
        else:
            if tokenizer is None:
                raise LmEvalError("model= needs tokenizer= too")
            if device is not None:
                model.to(device)
            if spec is not None:
                t0 = time.perf_counter()
                quantize(model, spec, calib=calib, tokenizer=tokenizer)
                _cache_dequantized(model)
                self.quantize_s = time.perf_counter() - t0
            source = getattr(model, "quantbench_source", None) or {}
            self.model_spec = str(source.get("spec") or self.model_spec)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.fingerprint, self.spec = model_identity(model)
        self.add_bos_token = add_bos_token
        self.custom_prefix_token_id = prefix_token_id
        self._max_length = int(max_length) if max_length else None
        self._max_gen_toks = int(max_gen_toks)
        self.batch_size = _batch_size(batch_size)
        self.prefix_reuse = bool(prefix_reuse)
        self.prefix_min_tokens = max(1, int(prefix_min_tokens))
        self.logits_bytes = max(1, int(float(logits_mb) * 2**20))
        self.engine = HFLM(
            model, tokenizer, batch_size=self.batch_size, prefix_reuse=True, max_length=self.max_length
        )
        self._gen_engine = HFLM(
            model,
            _TokenizerForGeneration(tokenizer),
            batch_size=self.batch_size,
            prefix_reuse=True,
            max_length=self.max_length,
        )
        self._device = self.engine.device
        self.vocab = int(getattr(model.config, "vocab_size", 0) or len(tokenizer))
        self.store = store
        self.stats = {"requests": 0, "computed": 0, "from_store": 0, "forwards": 0, "tokens": 0}
        self._warned_sampling = False

    # -- lm-eval plumbing -----------------------------------------------------------------------------------------

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> QuantbenchLM:
        """Like lm-eval's, but ``model_args`` win over the CLI's defaults (``batch_size=1`` is always passed)."""
        from lm_eval import utils

        return cls.create_from_arg_obj(utils.simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> QuantbenchLM:
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**{**extra, **dict(arg_dict)})

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        if self.custom_prefix_token_id is not None:
            return int(self.custom_prefix_token_id)
        if self.tokenizer.bos_token_id is not None:
            return self.tokenizer.bos_token_id
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        if self._max_length:
            return self._max_length
        from lm_eval.models.utils import resolve_max_length

        return resolve_max_length(self.model.config, self.tokenizer, default=2048)

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "tokenizer")).replace("/", "__")

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def get_model_info(self) -> dict[str, Any]:
        return {
            "quantbench_model": self.model_spec,
            "quantbench_spec": self.spec,
            "quantbench_fingerprint": self.fingerprint,
        }

    def tok_encode(
        self,
        string: str,
        add_special_tokens: bool | None = None,
        left_truncate_len: int | None = None,
        **_: Any,
    ) -> list[int]:
        """lm-eval ``hf`` tokenization: no special tokens added when the text already starts with BOS."""
        kwargs: dict[str, Any] = {}
        if add_special_tokens is not None:
            kwargs["add_special_tokens"] = add_special_tokens
        elif self.add_bos_token is not None:
            kwargs["add_special_tokens"] = self.add_bos_token
        if add_special_tokens is None and string.startswith(self.tokenizer.decode(self.prefix_token_id)):
            kwargs["add_special_tokens"] = False
        ids = list(self.tokenizer.encode(string, **kwargs))
        return ids[-left_truncate_len:] if left_truncate_len else ids

    # -- the three request types ----------------------------------------------------------------------------------

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        results = self._through_store(
            "loglikelihood", [tuple(r.args) for r in requests], self._loglikelihood_args, disable_tqdm
        )
        return [(float(lp), bool(greedy)) for lp, greedy in results]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        results = self._through_store(
            "loglikelihood_rolling", [tuple(r.args) for r in requests], self._rolling_args, disable_tqdm
        )
        return [float(x) for x in results]

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        results = self._through_store(
            "generate_until", [tuple(r.args) for r in requests], self._generate_args, disable_tqdm
        )
        return [str(x) for x in results]

    def _loglikelihood_args(self, args: list[tuple], bar: Any) -> list[tuple[float, bool]]:
        """Tokenize like lm-eval's ``TemplateLM.loglikelihood`` and score."""
        reqs = []
        for context, continuation in args:
            if context == "":
                cont = self.tok_encode(continuation, add_special_tokens=False)
                if cont and cont[0] == self.prefix_token_id:
                    ctx, cont = cont[:1], cont[1:]
                else:
                    ctx = [self.prefix_token_id]
            else:
                ctx, cont = self._encode_pair(context, continuation)
            reqs.append(((context, continuation), ctx, cont))
        return self._loglikelihood_tokens(reqs, bar=bar)

    def _rolling_args(self, args: list[tuple], bar: Any) -> list[float]:
        """Disjoint rolling windows of ``max_length`` tokens (lm-eval ``hf``), each document's sum of logprobs."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows: list[tuple[None, list[int], list[int]]] = []
        owner: list[int] = []
        for i, (text,) in enumerate(args):
            for ctx, cont in map(
                make_disjoint_window,
                get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append((None, ctx, cont))
                owner.append(i)
        scores = self._loglikelihood_tokens(windows, bar=None)
        totals = [0.0] * len(args)
        for i, (lp, _) in zip(owner, scores, strict=True):
            totals[i] += lp
        if bar is not None:
            bar.update(len(args))
        return totals

    @torch.inference_mode()
    def _loglikelihood_tokens(
        self,
        requests: list[tuple[Any, list[int], list[int]]],
        disable_tqdm: bool = False,
        bar: Any = None,
        **_: Any,
    ) -> list[tuple[float, bool]]:
        """``(sum of log P(continuation tokens), every continuation token is the argmax)`` per request."""
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        rows: dict[tuple[int, ...], _Row] = {}
        limit = self.max_length
        for index, (_, ctx, cont) in enumerate(requests):
            if not cont:
                results[index] = (0.0, True)
                continue
            if len(cont) > limit:
                raise LmEvalError(f"a continuation of {len(cont)} tokens is longer than max_length {limit}")
            ids = tuple((list(ctx) + list(cont))[-(limit + 1) :][:-1])  # lm-eval hf's left truncation
            row = rows.get(ids)
            if row is None:
                row = rows[ids] = _Row(ids, len(cont))
            row.keep = max(row.keep, len(cont))
            row.targets.append(_Target(index, list(cont)))

        def done(row: _Row, logprobs: torch.Tensor) -> None:
            """``logprobs``: [row.keep, V] for the row's last positions."""
            for target in row.targets:
                m = len(target.cont)
                lp = logprobs[-m:]
                tokens = torch.tensor(target.cont, device=lp.device)
                greedy = bool((lp.argmax(-1) == tokens).all())
                results[target.index] = (float(lp.gather(-1, tokens[:, None]).sum()), greedy)
            if bar is not None:
                bar.update(len(row.targets))

        root = _new_state([])
        if not self.prefix_reuse:
            self._score_rows(root, list(rows.values()), done)
        else:
            groups: dict[tuple[int, ...], _Group] = {}
            for row in rows.values():
                groups.setdefault(row.shared, _Group(row.shared, [])).rows.append(row)
            ordered = sorted(groups.values(), key=lambda g: g.shared)
            pool: list[_Row] = []
            self._tree(root, ordered, 0, 0, pool, done)
            self._score_rows(root, pool, done)
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    # -- prefix tree ----------------------------------------------------------------------------------------------

    def _worth(self, ext: int, rows: int) -> bool:
        """Run ``ext`` shared tokens once for ``rows`` rows when that saves enough compute."""
        return ext > 0 and rows > 1 and (rows - 1) * ext >= self.prefix_min_tokens

    @torch.inference_mode()
    def _extend(self, state: Any, ext: Sequence[int]) -> Any:
        if state.cache is None:
            return self.engine.prefix_state(_state_ids(state) + list(ext))
        _, cache, _, _ = self.engine._forward(state, [list(ext)], keep=1, use_cache=True)
        return _new_state(_state_ids(state) + list(ext), cache)

    def _tree(
        self,
        state: Any,
        groups: list[_Group],
        pos: int,
        depth: int,
        pool: list[_Row],
        done: Callable[[_Row, torch.Tensor], None],
    ) -> None:
        """Score ``groups`` (sorted, all sharing the state's tokens and their first ``pos`` tokens).

        Groups are split by their token at ``pos``. A branch whose common part is worth caching gets a child
        state (the parent's cache extended by that part) and is handled recursively; otherwise its rows join
        ``pool``, which the caller scores on ``state``.
        """
        base = len(_state_ids(state))
        for part in _partition(groups, pos):
            n_rows = sum(len(g.rows) for g in part)
            if len(part) == 1:
                group = part[0]
                ext = group.shared[base:]
                if self._worth(len(ext), n_rows):
                    child = self._extend(state, ext)
                    self._score_rows(child, group.rows, done)
                else:
                    pool.extend(group.rows)
                continue
            common = pos + _lcp_all([g.shared[pos:] for g in part])
            if depth >= 64:  # pathological nesting: stop looking for deeper prefixes
                pool.extend(r for g in part for r in g.rows)
            elif self._worth(common - base, n_rows):
                child = self._extend(state, part[0].shared[base:common])
                child_pool: list[_Row] = []
                self._tree(child, part, common, depth + 1, child_pool, done)
                self._score_rows(child, child_pool, done)
            else:
                self._tree(state, part, common, depth + 1, pool, done)

    def _score_rows(self, state: Any, rows: list[_Row], done: Callable[[_Row, torch.Tensor], None]) -> None:
        """Forward ``rows`` (token ids after the state's) in planned batches (``batching.plan_batches``) of at
        most ``batch_size`` rows within the logits budget."""
        if not rows:
            return
        base = len(_state_ids(state))
        budget = max(1, self.logits_bytes // (self.vocab * 4 * 2))  # logits + log-softmax, float32
        rows = sorted(rows, key=lambda r: (-len(r.ids), r.ids))
        short: list[_Row] = []
        for row in rows:
            if row.keep > budget or len(row.ids) - base > 4 * budget:
                self._score_long(state, row, budget, done)
            else:
                short.append(row)
        widths = [len(r.ids) - base for r in short]
        keeps = [r.keep for r in short]
        for run in plan_batches(widths, self.batch_size, keeps=keeps, keep_budget=budget):
            self._forward_batch(state, short[run], max(keeps[run]), done)

    def _forward_batch(
        self, state: Any, batch: list[_Row], keep: int, done: Callable[[_Row, torch.Tensor], None]
    ) -> None:
        base = len(_state_ids(state))
        with torch.inference_mode():
            logits, *_ = self.engine._forward(state, [list(r.ids[base:]) for r in batch], keep=keep)
            logprobs = F.log_softmax(logits, dim=-1)
        for i, row in enumerate(batch):
            done(row, logprobs[i, keep - row.keep :])

    def _score_long(
        self, state: Any, row: _Row, budget: int, done: Callable[[_Row, torch.Tensor], None]
    ) -> None:
        """One long row in chunks of ``budget`` tokens, each on the KV cache of the ones before."""
        tokens = list(row.ids[len(_state_ids(state)) :])
        first_scored = len(tokens) - row.keep
        parts: list[torch.Tensor] = []
        current = state
        with torch.inference_mode():
            for start in range(0, len(tokens), budget):
                chunk = tokens[start : start + budget]
                end = start + len(chunk)
                keep = min(len(chunk), max(1, end - first_scored))
                more = end < len(tokens)
                logits, cache, *_ = self.engine._forward(current, [chunk], keep=keep, use_cache=more)
                if end > first_scored:  # the kept positions are all scored ones
                    parts.append(F.log_softmax(logits[0], dim=-1))
                if more:
                    current = _new_state(_state_ids(current) + chunk, cache)
        logprobs = torch.cat(parts)[-row.keep :]
        done(row, logprobs)

    # -- generation -----------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def _generate_args(self, args: list[tuple], bar: Any) -> list[str]:
        """Greedy generation until a stop string, EOS or ``max_gen_toks`` (lm-eval ``hf`` semantics)."""
        from lm_eval.models.utils import (
            handle_stop_sequences,
            normalize_gen_kwargs,
            postprocess_generated_text,
        )

        eos = self.tokenizer.decode([self.eot_token_id])
        plans: dict[tuple[tuple[str, ...], int], list[tuple[int, list[int]]]] = {}
        for index, (context, gen_kwargs) in enumerate(args):
            kwargs = normalize_gen_kwargs(dict(gen_kwargs or {}), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen = int(kwargs.pop("max_gen_toks"))
            if kwargs.get("do_sample") and not self._warned_sampling:
                logger.warning("quantbench lm-eval adapter: sampling is not supported, generating greedily")
                self._warned_sampling = True
            room = self.max_length - max_gen
            if room <= 0:
                raise LmEvalError(f"max_gen_toks {max_gen} leaves no room in max_length {self.max_length}")
            ids = self.tok_encode(context, left_truncate_len=room)
            if not ids:
                ids = [self.prefix_token_id]
            plans.setdefault((tuple(until), max_gen), []).append((index, ids))
        out: list[str | None] = [None] * len(args)
        for (until, max_gen), items in plans.items():
            stops = [s for s in until if s]

            def stopped(text: str, stops: list[str] = stops) -> bool:
                return any(s in text for s in stops)

            items.sort(key=lambda item: item[1])
            state = _new_state([])
            for start in range(0, len(items), self.batch_size):
                batch = items[start : start + self.batch_size]
                ids = [item[1] for item in batch]
                shared = min(_lcp_all(ids), min(len(x) for x in ids) - 1)
                state = self._generation_prefix(state, ids[0][:shared])
                base = len(_state_ids(state))
                texts = self._gen_engine.greedy(state, [x[base:] for x in ids], max_gen, done=stopped)
                for (index, _), text in zip(batch, texts, strict=True):
                    out[index] = postprocess_generated_text(text, list(until), None)
                if bar is not None:
                    bar.update(len(batch))
        return [str(x) for x in out]

    def _generation_prefix(self, state: Any, shared: list[int]) -> Any:
        """The cached prefix for a generation batch (its rows' common tokens), built from the previous batch's
        when they share enough: cropped to the common part, then extended. The state is kept for the next batch,
        so a few-shot prefix is computed once per run of requests that share it."""
        least = self.prefix_min_tokens
        if not self.prefix_reuse or len(shared) < least:
            return _new_state([])
        held = _state_ids(state)
        common = _lcp(held, shared)
        if state.cache is not None and common >= least:
            if common < len(held):
                cache = copy.deepcopy(state.cache)
                try:
                    cache.crop(common)
                except RuntimeError:  # a sliding-window layer past its window cannot be cropped back
                    return self._extend(_new_state([]), shared)
                state = _new_state(held[:common], cache)
            ext = shared[common:]
            return self._extend(state, ext) if len(ext) >= least else state
        return self._extend(_new_state([]), shared)

    # -- the results store ----------------------------------------------------------------------------------------

    def _settings(self) -> dict[str, Any]:
        return {
            "max_length": self.max_length,
            "max_gen_toks": self.max_gen_toks,
            "add_bos_token": self.add_bos_token,
            "prefix_token_id": self.prefix_token_id,
        }

    def _through_store(
        self,
        kind: str,
        args: list[tuple],
        compute: Callable[[list[tuple], Any], list[Any]],
        disable_tqdm: bool,
    ) -> list[Any]:
        """Answer requests from the store where possible; compute the rest in chunks, each stored as it ends."""
        from tqdm import tqdm

        self.stats["requests"] += len(args)
        calls0, tokens0 = (
            self.engine.calls + self._gen_engine.calls,
            self.engine.tokens + self._gen_engine.tokens,
        )
        out: list[Any] = [None] * len(args)
        todo = list(range(len(args)))
        keys: list[str] = []
        if self.store is not None:
            settings = self._settings()
            keys = [_request_key(kind, a, settings) for a in args]
            found = lookup_requests(self.store, self.fingerprint, self.spec, kind, keys)
            todo = [i for i, k in enumerate(keys) if k not in found]
            for i, k in enumerate(keys):
                if k in found:
                    out[i] = found[k]
            self.stats["from_store"] += len(args) - len(todo)
        self.stats["computed"] += len(todo)
        chunk = len(todo) if self.store is None else 512
        with tqdm(total=len(todo), desc=f"quantbench {kind}", disable=disable_tqdm or not todo) as bar:
            for start in range(0, len(todo), max(1, chunk)):
                part = todo[start : start + chunk]
                t0 = time.perf_counter()
                values = compute([args[i] for i in part], bar)
                seconds = (time.perf_counter() - t0) / max(1, len(part))
                for i, value in zip(part, values, strict=True):
                    out[i] = value
                    self.cache_hook.add_partial(kind, args[i], value)
                if self.store is not None:
                    add_requests(
                        self.store,
                        self.fingerprint,
                        self.spec,
                        kind,
                        [(keys[i], out[i]) for i in part],
                        seconds,
                    )
        self.stats["forwards"] += self.engine.calls + self._gen_engine.calls - calls0
        self.stats["tokens"] += self.engine.tokens + self._gen_engine.tokens - tokens0
        return out


def _new_state(ids: Sequence[int], cache: Any = None) -> Any:
    """An engine ``PrefixState`` for one prefix: ``ids`` with its KV cache (batch 1), or without one (then the
    engine prepends ``ids`` to every row). Works with both engine layouts: ``PrefixState(ids, cache)`` and the
    multi-prefix ``PrefixState(prefixes, cache, width, mask)``."""
    from quantbench.eval.lm import PrefixState

    ids = list(ids)
    if "prefixes" not in PrefixState.__dataclass_fields__:
        return PrefixState(ids, cache)
    if cache is None:
        return PrefixState([ids])
    return PrefixState([ids], cache, len(ids), torch.ones((1, len(ids)), dtype=torch.long))


def _state_ids(state: Any) -> list[int]:
    """The prefix tokens of a one-prefix engine state (either layout)."""
    prefixes = getattr(state, "prefixes", None)
    if prefixes is not None:
        return list(prefixes[0]) if prefixes else []
    return list(state.ids)


def _batch_size(value: int | str | None) -> int:
    if value is None or str(value).startswith("auto"):
        return 16
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise LmEvalError(f"batch_size must be an integer, got '{value}'") from None
    if size < 1:
        raise LmEvalError(f"batch_size must be >= 1, got {size}")
    return size


def _partition(groups: list[_Group], pos: int) -> Iterator[list[_Group]]:
    """Consecutive runs of (sorted) groups with the same token at ``pos`` (None: the group ends there)."""
    run: list[_Group] = []
    key: object = object()
    for group in groups:
        k = group.shared[pos] if len(group.shared) > pos else None
        if run and k != key:
            yield run
            run = []
        run.append(group)
        key = k
    if run:
        yield run


def _lcp_all(seqs: Sequence[Sequence[int]]) -> int:
    if not seqs:
        return 0
    n = min(len(s) for s in seqs)
    first = seqs[0]
    for other in seqs[1:]:
        n = min(n, _lcp(first[:n], other))
    return n


if HAVE_LM_EVAL and __name__ != "__main__" and MODEL_NAME not in model_registry:
    register_model(MODEL_NAME)(QuantbenchLM)


# -- storage: per-request answers and per-task metrics, in the quantbench results database -----------------------

LMEVAL_SCHEMA = """
CREATE TABLE IF NOT EXISTS lmeval_requests (
    fingerprint TEXT NOT NULL, spec TEXT NOT NULL, kind TEXT NOT NULL, key TEXT NOT NULL,
    result TEXT NOT NULL, seconds REAL, created REAL,
    PRIMARY KEY (fingerprint, spec, kind, key)
);
CREATE TABLE IF NOT EXISTS lmeval_metrics (
    run_id INTEGER NOT NULL, task TEXT NOT NULL, metric TEXT NOT NULL, filter TEXT NOT NULL,
    value REAL, stderr REAL,
    PRIMARY KEY (run_id, task, metric, filter)
);
"""


class _Immediate:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on error), like the store's own transactions."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        self.conn.execute("COMMIT" if exc_type is None else "ROLLBACK")


def ensure_tables(store: Any) -> None:
    """Create the two lm-eval tables in the store's database (idempotent)."""
    if getattr(store, "_lmeval_ready", False):
        return
    with _Immediate(store.conn) as conn:
        for statement in (s.strip() for s in LMEVAL_SCHEMA.split(";")):
            if statement:
                conn.execute(statement)
    store._lmeval_ready = True


def _request_key(kind: str, args: tuple, settings: dict[str, Any]) -> str:
    text = json.dumps([kind, list(args), settings], sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def lookup_requests(store: Any, fingerprint: str, spec: str, kind: str, keys: list[str]) -> dict[str, Any]:
    ensure_tables(store)
    found: dict[str, Any] = {}
    unique = sorted(set(keys))
    for start in range(0, len(unique), 500):
        part = unique[start : start + 500]
        rows = store.conn.execute(
            "SELECT key, result FROM lmeval_requests WHERE fingerprint=? AND spec=? AND kind=? "
            f"AND key IN ({','.join('?' * len(part))})",
            [fingerprint, spec, kind, *part],
        ).fetchall()
        found.update((k, json.loads(v)) for k, v in rows)
    return found


def add_requests(
    store: Any, fingerprint: str, spec: str, kind: str, items: list[tuple[str, Any]], seconds: float
) -> None:
    ensure_tables(store)
    now = time.time()
    with _Immediate(store.conn) as conn:
        conn.executemany(
            "INSERT OR IGNORE INTO lmeval_requests (fingerprint, spec, kind, key, result, seconds, created) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            [(fingerprint, spec, kind, k, json.dumps(v), seconds, now) for k, v in items],
        )


def add_metrics(store: Any, run_id: int, rows: list[MetricRow]) -> None:
    ensure_tables(store)
    with _Immediate(store.conn) as conn:
        conn.executemany(
            "INSERT OR REPLACE INTO lmeval_metrics (run_id, task, metric, filter, value, stderr) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            [(run_id, r.task, r.metric, r.filter, r.value, r.stderr) for r in rows],
        )


def stored_metrics(store: Any, run_id: int) -> list[MetricRow]:
    """The metrics stored for one run row (its task and, for a group, every subtask)."""
    ensure_tables(store)
    rows = store.conn.execute(
        "SELECT task, metric, filter, value, stderr FROM lmeval_metrics WHERE run_id=? ORDER BY task, metric, filter",
        (run_id,),
    ).fetchall()
    return [MetricRow(*r) for r in rows]


# -- running tasks: quantbench eval --tasks lmeval:... -------------------------------------------------------------


@dataclass
class MetricRow:
    task: str
    metric: str
    filter: str
    value: float | None
    stderr: float | None = None


@dataclass
class LmEvalResult:
    """One requested lm-eval task (or group) on one model."""

    task: str  # as requested, without the lmeval: prefix
    spec: str
    fingerprint: str
    output_type: str
    shots: int | None
    samples: int
    metrics: list[MetricRow]  # this task's (for a group: the group's, then every subtask's)
    wall_s: float
    run_id: int | None = None

    @property
    def accuracy(self) -> float | None:
        """The ``acc`` (else ``exact_match``) of the task itself, for the runs table; None for other metrics."""
        for name in ("acc", "exact_match"):
            for row in self.metrics:
                if row.task == self.task and row.metric == name and row.value is not None:
                    return row.value
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": LMEVAL_PREFIX + self.task,
            "spec": self.spec,
            "fingerprint": self.fingerprint,
            "output_type": self.output_type,
            "shots": self.shots,
            "samples": self.samples,
            "wall_s": self.wall_s,
            "metrics": [vars(m) for m in self.metrics],
        }


def split_task_names(tasks: str | Sequence[str]) -> tuple[list[str], list[str]]:
    """(lm-eval task names without the prefix, other task names) from ``--tasks``."""
    items = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    lmeval = [t[len(LMEVAL_PREFIX) :].strip() for t in items if t.startswith(LMEVAL_PREFIX)]
    if any(not t for t in lmeval):
        raise LmEvalError("--tasks: 'lmeval:' needs a task name, e.g. lmeval:hellaswag")
    return lmeval, [t for t in items if not t.startswith(LMEVAL_PREFIX)]


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _hub_error(exc: BaseException) -> bool:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        name = type(current).__name__
        text = str(current)
        if (
            name
            in {"OfflineModeIsEnabled", "ConnectError", "DatasetNotFoundError", "LocalEntryNotFoundError"}
            or "offline" in text.lower()
            or "on the Hub" in text
            or "Couldn't reach" in text
        ):
            return True
        current = current.__cause__ or current.__context__
    return False


HUB_MESSAGE = (
    "lm-eval task '{name}' needs its dataset ({dataset}) from the Hugging Face hub, and quantbench runs "
    "offline: put the data in local files and point a task YAML at them (dataset_path: json, "
    "dataset_kwargs: {{data_files: ...}}), then pass --lmeval-include DIR"
)


def _local_builders() -> set[str]:
    try:
        from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

        return set(_PACKAGED_DATASETS_MODULES)
    except ImportError:  # pragma: no cover
        return {"json", "csv", "parquet", "text", "arrow", "pandas"}


def _yaml_config(path: Path, depth: int = 0) -> dict[str, Any]:
    """A task YAML with its ``include:`` chain merged (``!function`` tags ignored)."""
    import yaml

    class _Loader(yaml.SafeLoader):
        pass

    _Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    try:
        config = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader) or {}
    except (OSError, yaml.YAMLError):
        return {}
    if not isinstance(config, dict):
        return {}
    base = config.get("include")
    if isinstance(base, str) and depth < 8:
        return {**_yaml_config(path.parent / base, depth + 1), **config}
    return config


def builtin_hub_dataset(name: str) -> str | None:
    """The hub dataset of lm-eval's built-in task ``name`` (from its ``NAME.yaml``), or None when it has no
    such file or its data is local. A quick check that needs no task index (which takes seconds to build)."""
    import lm_eval.tasks

    root = Path(lm_eval.tasks.__file__).parent
    local = _local_builders()
    for path in root.rglob(f"{name}.yaml"):
        config = _yaml_config(path)
        dataset = config.get("dataset_path")
        if config.get("task") != name or not isinstance(dataset, str):
            continue
        if dataset in local or Path(dataset).expanduser().exists() or _in_hf_cache(dataset):
            return None
        return dataset
    return None


def _in_hf_cache(dataset: str) -> bool:
    """Whether an earlier online run left ``dataset`` in the local Hugging Face caches (usable offline)."""
    try:
        import datasets.config
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover
        return False
    hub = Path(constants.HF_HUB_CACHE) / ("datasets--" + dataset.replace("/", "--"))
    built = Path(datasets.config.HF_DATASETS_CACHE) / dataset.replace("/", "___")
    return hub.exists() or built.exists()


def load_tasks(
    names: Sequence[str], include: str | Path | Sequence[str | Path] | None = None
) -> tuple[Any, list[tuple[str, Any]]]:
    """``(task_manager, [(name, Task | Group | Task)...])``: every task built and its data loaded (locally).

    An unknown name, a task whose dataset would come from the hub, or any other failure to build a task is
    one :class:`LmEvalError` line, raised before any model is loaded. Tasks found in ``include`` alone are
    loaded without indexing lm-eval's ~15k built-in task files.
    """
    require_lm_eval()
    force_offline()
    from lm_eval.tasks import TaskManager

    paths: list[str] = []
    for item in [] if include is None else [include] if isinstance(include, (str, Path)) else list(include):
        path = Path(item).expanduser()
        if not path.exists():
            raise LmEvalError(f"--lmeval-include {item}: no such file or directory")
        paths.append(str(path))
    managers: list[Any] = []
    try:
        own_names: set[str] = set()
        if paths:
            own = TaskManager(include_path=paths, include_defaults=False)
            own_names = set(own.task_index)
            if all(name in own_names for name in names):
                managers.append(own)
        if not managers:
            for name in names:
                dataset = None if name in own_names else builtin_hub_dataset(name)
                if dataset is not None:
                    raise LmEvalError(HUB_MESSAGE.format(name=name, dataset=dataset))
        managers.append(None)  # the full index, built only when needed
    except LmEvalError:
        raise
    except Exception as exc:  # a broken YAML in the include path
        raise LmEvalError(f"lm-eval cannot index the tasks: {_one_line(exc)}") from None

    for attempt, manager in enumerate(managers):
        if manager is None:
            try:
                manager = TaskManager(include_path=paths or None)
            except Exception as exc:
                raise LmEvalError(f"lm-eval cannot index the tasks: {_one_line(exc)}") from None
        try:
            return manager, _build_tasks(manager, names)
        except LmEvalError:
            if attempt + 1 == len(managers):
                raise
    raise AssertionError("unreachable")  # pragma: no cover


def _build_tasks(manager: Any, names: Sequence[str]) -> list[tuple[str, Any]]:
    built: list[tuple[str, Any]] = []
    for name in names:
        if name not in manager.task_index and not Path(name).is_file():
            close = [t for t in manager.all_tasks if name.lower() in t.lower()][:3]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise LmEvalError(f"unknown lm-eval task '{name}'{hint}; custom tasks: --lmeval-include DIR")
        try:
            loaded = manager.load([name])
        except Exception as exc:
            if _hub_error(exc):
                raise LmEvalError(HUB_MESSAGE.format(name=name, dataset=_hub_name(exc))) from None
            raise LmEvalError(f"lm-eval task '{name}' cannot be loaded: {_one_line(exc)}") from None
        groups, tasks = loaded.get("groups") or {}, loaded["tasks"]
        if name in groups:
            built.append((name, groups[name]))
        elif name in tasks:
            built.append((name, tasks[name]))
        else:  # a tag, or a YAML path: its tasks, each on its own
            built.extend((task_name, task) for task_name, task in tasks.items())
    return built


def _hub_name(exc: BaseException) -> str:
    import re

    match = re.search(r"reach '([^']+)'", str(exc))
    return match.group(1) if match else "a hub dataset"


def parse_metrics(entry: dict[str, Any], task: str) -> list[MetricRow]:
    """``{"acc,none": 0.5, "acc_stderr,none": 0.1, ...}`` -> metric rows."""
    values: dict[tuple[str, str], MetricRow] = {}
    for key, value in entry.items():
        if "," not in key:
            continue
        metric, _, filt = key.partition(",")
        is_err = metric.endswith("_stderr")
        name = metric[: -len("_stderr")] if is_err else metric
        row = values.setdefault((name, filt), MetricRow(task, name, filt, None, None))
        number = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
        if is_err:
            row.stderr = number
        else:
            row.value = number
    return [values[k] for k in sorted(values)]


def run_lmeval(
    lm: QuantbenchLM,
    tasks: Sequence[tuple[str, Any]],
    manager: Any,
    *,
    limit: int | float | None = None,
    shots: int | None = None,
    bootstrap_iters: int = 1000,
    seed: int = 1234,
) -> tuple[list[LmEvalResult], dict[str, Any]]:
    """Evaluate ``lm`` on tasks from :func:`load_tasks` with ``lm_eval.simple_evaluate``.

    Returns one :class:`LmEvalResult` per requested task and lm-eval's results dict (samples dropped).
    """
    import lm_eval

    t0 = time.perf_counter()
    try:
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=[obj for _, obj in tasks],
            task_manager=manager,
            limit=limit,
            num_fewshot=shots,
            bootstrap_iters=bootstrap_iters,
            log_samples=False,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    except QuantbenchError:
        raise
    except Exception as exc:
        if _hub_error(exc):
            raise LmEvalError(
                f"lm-eval tried to reach the hub, and quantbench runs offline: {_one_line(exc)}"
            ) from None
        raise
    wall = time.perf_counter() - t0
    out = dict(out or {})
    out.pop("samples", None)
    results: dict[str, dict[str, Any]] = out.get("results", {})
    group_subtasks: dict[str, list[str]] = out.get("group_subtasks", {})
    configs: dict[str, dict[str, Any]] = out.get("configs", {})
    n_shot: dict[str, Any] = out.get("n-shot", {})
    n_samples: dict[str, dict[str, int]] = out.get("n-samples", {})
    reports = []
    for name, _ in tasks:
        members = [name, *_all_subtasks(name, group_subtasks)]
        leaves = [m for m in members if m in n_samples]
        metrics = [row for m in members if m in results for row in parse_metrics(results[m], m)]
        kinds = sorted({str(configs.get(m, {}).get("output_type", "")) for m in leaves} - {""})
        shot_values = {n_shot.get(m) for m in leaves} - {None}
        reports.append(
            LmEvalResult(
                task=name,
                spec=lm.spec,
                fingerprint=lm.fingerprint,
                output_type=",".join(kinds) or "group",
                shots=int(next(iter(shot_values))) if len(shot_values) == 1 else None,
                samples=sum(int(n_samples[m].get("effective", 0)) for m in leaves),
                metrics=metrics,
                wall_s=wall / max(1, len(tasks)),
            )
        )
    return reports, out


def _all_subtasks(name: str, group_subtasks: dict[str, list[str]]) -> list[str]:
    out: list[str] = []
    for child in group_subtasks.get(name, []):
        out.append(child)
        out.extend(_all_subtasks(child, group_subtasks))
    return out


def record_runs(
    store: Any,
    lm: QuantbenchLM,
    reports: list[LmEvalResult],
    *,
    model: str,
    limit: int | float | None,
    weights_gib: float,
    peak_mem_gib: float,
    peak_mem_kind: str,
    device: str,
    include: str | None,
) -> None:
    """One ``runs`` row per requested task (``task = 'lmeval:NAME'``, ``accuracy`` = acc when the task has it,
    every metric in ``extra``) and every metric (subtasks too) in ``lmeval_metrics`` under that run's id."""
    total = max(1, lm.stats["requests"])
    for report in reports:
        extra = {
            "command": "eval",
            "lmeval": {
                "output_type": report.output_type,
                "metrics": [vars(m) for m in report.metrics if m.task == report.task],
                "requests": lm.stats["requests"],
                "requests_computed": lm.stats["computed"],
                "include": include,
            },
        }
        run_id = store.add_run(
            model=model,
            fingerprint=report.fingerprint,
            spec=report.spec,
            method=report.spec.split(":")[0],
            task=LMEVAL_PREFIX + report.task,
            split=None,
            shots=report.shots,
            mode=report.output_type,
            subjects=None,
            limit_per_subject=None if limit is None else int(limit),
            questions=report.samples,
            evaluated=round(report.samples * lm.stats["computed"] / total),
            accuracy=report.accuracy,
            categories=None,
            wall_s=report.wall_s,
            compute_s=report.wall_s,
            load_s=lm.load_s,
            quantize_s=lm.quantize_s,
            weights_gib=weights_gib,
            peak_mem_gib=peak_mem_gib,
            peak_mem_kind=peak_mem_kind,
            device=device,
            extra=extra,
        )
        report.run_id = run_id
        add_metrics(store, run_id, report.metrics)


def eval_command(
    *,
    model: str,
    tasks: list[str],
    method: str | None,
    device: str | None,
    calib: str | None = None,
    batch_size: int,
    db: Path,
    json_out: Path | None,
    limit: int | None,
    shots: int | None,
    include: str | None,
    prefix_reuse: bool,
    max_gen_toks: int | None,
    console: Any,
) -> list[LmEvalResult]:
    """``quantbench eval MODEL --tasks lmeval:A,lmeval:B``: tasks checked first (one-line errors, before the
    model loads), then evaluated, stored in ``db`` and printed."""
    from quantbench import parse_spec, weight_report
    from quantbench.eval.memory import peak_bytes, reset_peak
    from quantbench.eval.store import ResultStore

    require_lm_eval()
    if method is not None:
        parse_spec(method)
    from quantbench.eval.loading import is_checkpoint
    from quantbench.models import resolve_model_dir

    if not is_checkpoint(model):
        resolve_model_dir(model)  # an unknown model: one line, before the tasks are indexed
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    manager, built = load_tasks(tasks, include)
    with ResultStore(db) as store:
        lm = QuantbenchLM(
            path=model,
            method=method,
            calib=calib,
            device=device,
            batch_size=batch_size,
            prefix_reuse=prefix_reuse,
            max_gen_toks=max_gen_toks or DEFAULT_MAX_GEN_TOKS,
            store=store,
        )
        dev = str(lm.device)
        weights_gib = weight_report(lm.model).model_bytes / 2**30
        reset_peak(dev)
        reports, raw = run_lmeval(lm, built, manager, limit=limit, shots=shots)
        peak, kind = peak_bytes(dev)
        record_runs(
            store,
            lm,
            reports,
            model=model,
            limit=limit,
            weights_gib=weights_gib,
            peak_mem_gib=peak / 2**30,
            peak_mem_kind=kind,
            device=dev,
            include=include,
        )
    print_results(reports, lm, console)
    if json_out is not None:
        payload = {
            "model": model,
            "spec": lm.spec,
            "fingerprint": lm.fingerprint,
            "results": [r.to_dict() for r in reports],
            "requests": dict(lm.stats),
            "lm_eval": {
                k: raw.get(k)
                for k in ("results", "groups", "group_subtasks", "n-shot", "n-samples", "versions")
            },
        }
        json_out.write_text(json.dumps(payload, indent=2, ensure_ascii=False, default=str) + "\n")
    return reports


def cli_eval(
    *,
    tasks: str,
    shots: int,
    max_new_tokens: int,
    **kwargs: Any,
) -> list[LmEvalResult]:
    """The ``lmeval:`` branch of ``quantbench eval``. Options that only mean something for quantbench's own
    tasks are refused; ``--shots`` and ``--max-new-tokens`` apply only when given (lm-eval tasks have their
    own defaults)."""
    lm_tasks, others = split_task_names(tasks)
    if others:
        raise LmEvalError(f"--tasks: run lmeval: tasks and {', '.join(others)} in separate calls")
    context = _click_context()

    def given(name: str) -> bool:
        source = context.get_parameter_source(name) if context is not None else None
        return source is not None and getattr(source, "name", "") != "DEFAULT"

    for name in ("mode", "split", "subjects"):
        if given(name):
            raise LmEvalError(f"--{name} does not apply to lmeval: tasks")
    return eval_command(
        tasks=lm_tasks,
        shots=shots if given("shots") else None,
        max_gen_toks=max_new_tokens if given("max_new_tokens") else None,
        **kwargs,
    )


def _click_context() -> Any:
    """The running command's click context (typer vendors its own click), or None outside a command."""
    import importlib

    for module in ("typer._click.globals", "click.globals"):
        try:
            context = importlib.import_module(module).get_current_context(silent=True)
        except (ImportError, AttributeError):
            continue
        if context is not None:
            return context
    return None


def print_results(reports: list[LmEvalResult], lm: QuantbenchLM, console: Any) -> None:
    from rich.markup import escape
    from rich.table import Table

    stats = lm.stats
    console.print(
        f"[bold]lm-eval[/] {escape(f'[{lm.spec}]')} on {escape(lm.model_spec)}: {stats['requests']} requests "
        f"({stats['computed']} computed, {stats['from_store']} from the store), "
        f"{stats['forwards']} forwards / {stats['tokens']} tokens, wall {sum(r.wall_s for r in reports):.1f}s"
    )
    table = Table("task", "type", "n-shot", "samples", "metric", "filter", "value", "± stderr")
    for report in reports:
        for row in report.metrics:
            table.add_row(
                row.task,
                report.output_type if row.task == report.task else "",
                "-" if report.shots is None else str(report.shots),
                str(report.samples) if row.task == report.task else "",
                row.metric,
                row.filter,
                "-" if row.value is None else f"{row.value:.4f}",
                "-" if row.stderr is None else f"{row.stderr:.4f}",
            )
    console.print(table)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m quantbench.eval.lmeval_adapter ARGS``: lm-eval's CLI with the ``quantbench`` model registered."""
    import quantbench.eval.lmeval_adapter as adapter  # the importable module registers the model

    adapter.require_lm_eval()
    from quantbench.eval.loading import configure_threads

    configure_threads(0)
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":  # pragma: no cover
    try:
        main()
    except QuantbenchError as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        raise SystemExit(2) from None

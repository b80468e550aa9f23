"""Perplexity with the standard sliding-window method.

The text is tokenized once into ``ids[0..n-1]``. Windows of at most ``ctx`` tokens start every ``stride``
tokens (``begin = 0, stride, 2*stride, ...``) until one reaches the end. Each window scores only the
tokens that no earlier window scored (``ids[max(prev_end, begin + 1) : end]``), each given every token of
the window before it, so with ``stride < ctx`` every scored token after the first window sees at least
``ctx - stride`` tokens of context. ``stride == ctx`` gives disjoint windows whose first token is not
scored (it has no context); ``stride == 1`` gives the exact per-token ``ctx``-window value. The first token
of the text is never scored. Perplexity is ``exp(sum NLL / scored tokens)``; log-softmax runs in float32
and the sum is kept in float64.

KL divergence against a reference (llama.cpp ``perplexity --kl-divergence`` statistics): a reference pass
(``record_topk=k``) keeps, per scored token, a compact summary of the reference's next-token distribution
(:class:`LogitReference`, saved as ``.npz``): its k most probable tokens with their log-probabilities, the
log of the probability mass outside them (the "tail"), ``TAIL_SAMPLES`` tail tokens with their
log-probabilities, and the log-probability of the true token. A later pass of a quantized model with
``reference=...`` computes, in the same forward that gives its perplexity, per token (p the reference, q the
candidate):

* KLD = sum over the top k of p_i (log p_i - log q_i) + T, T the tail's share of the sum. T is estimated
  by a systematic sample of the tail: token j (j < m) is the one at the (j + 1/2) / m quantile of the
  tail's cumulative distribution (token-id order), so T ~ P_tail * mean_j (log p_j - log q_j); it is never
  taken below P_tail log(P_tail / Q_tail), a lower bound of T (merging outcomes never increases a KL
  divergence). Why not the top k alone: a 0.5B model on plain text leaves ~20 % of the mass outside its
  top 32, and dropping (or merging) that tail underestimated the mean KLD of int4 by 30 %; with the tail
  sample the mean is within 1 % of the exact full-vocabulary value (``tests/test_eval_perplexity.py``
  checks it). llama.cpp instead stores every log-probability quantised to 16 bits (vocabulary x 2 bytes
  per token) and drops terms with log p < -16;
* Δp = q(true token) - p(true token); "same top": the candidate's most probable token is the reference's.

:func:`kld_summary` reduces them as llama.cpp does: PPL ratio exp(mean NLL_q - mean NLL_ref) with its
uncertainty from the paired NLLs' covariance, mean KLD ± its standard error, KLD median / 95th / 99th
percentile / maximum (linear interpolation between sorted values), RMS Δp ± uncertainty, same-top fraction
± its binomial standard error.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from quantbench.errors import QuantbenchError
from quantbench.eval.progress import ProgressBar

DEFAULT_TOPK = 32  # reference tokens kept per scored token (most probable first)
TAIL_SAMPLES = 64  # systematic samples of the rest of the reference distribution per scored token


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
    kld: KLDStats | None = None  # with ``reference=``: the statistics against it
    logits_reference: LogitReference | None = field(default=None, repr=False)  # with ``record_topk=``
    scoring: str = ""  # which forward ran the windows (engine / HF forward)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("inf")

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k not in ("kld", "logits_reference")}
        if self.kld is not None:
            out["kld"] = self.kld.to_dict()
        return {**out, "tokens_per_second": self.tokens_per_second}

    def kld_line(self, reference: str = "reference") -> str:
        """One line of llama.cpp-style statistics against the reference ("" without ``kld``)."""
        k = self.kld
        if k is None:
            return ""
        return (
            f"vs {reference} over {k.tokens} tokens: PPL ratio {k.ppl_ratio:.4f} ± {k.ppl_ratio_unc:.4f}, "
            f"mean KLD {k.kld_mean:.5f} ± {k.kld_mean_unc:.5f} (median {k.kld_median:.5f}, 95% "
            f"{k.kld_p95:.5f}, 99% {k.kld_p99:.5f}, max {k.kld_max:.5f}), RMS Δp {100 * k.rms_dp:.3f} ± "
            f"{100 * k.rms_dp_unc:.3f} %, same top {100 * k.same_top:.2f} ± {100 * k.same_top_unc:.2f} %"
        )


@dataclass(frozen=True)
class LogitReference:
    """A reference pass's next-token distributions, per scored token (in scoring order), top k only."""

    targets: np.ndarray  # int64 [n]: the scored tokens
    top_ids: np.ndarray  # int32 [n, k]: the reference's k most probable tokens, most probable first
    top_logprobs: np.ndarray  # float32 [n, k]
    true_logprob: np.ndarray  # float32 [n]: log p(target)
    rest_logprob: np.ndarray  # float32 [n]: log of the probability outside the top k (the tail)
    tail_ids: np.ndarray  # int32 [n, m]: systematic sample of the tail (see the module docstring)
    tail_logprobs: np.ndarray  # float32 [n, m]
    ctx: int
    stride: int
    spec: str = ""  # which quantization made it (for messages)

    @property
    def k(self) -> int:
        return int(self.top_ids.shape[1])

    def save(self, path: str | Path) -> Path:
        """Write ``.npz`` atomically (a reader never sees half a file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        with tmp.open("wb") as handle:
            np.savez(
                handle,
                targets=self.targets,
                top_ids=self.top_ids,
                top_logprobs=self.top_logprobs,
                true_logprob=self.true_logprob,
                rest_logprob=self.rest_logprob,
                tail_ids=self.tail_ids,
                tail_logprobs=self.tail_logprobs,
                meta=np.array([self.ctx, self.stride]),
                spec=np.array(self.spec),
            )
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> LogitReference:
        with np.load(path) as z:
            ctx, stride = (int(x) for x in z["meta"])
            return cls(
                z["targets"], z["top_ids"], z["top_logprobs"], z["true_logprob"], z["rest_logprob"],
                z["tail_ids"], z["tail_logprobs"], ctx, stride, str(z["spec"]),
            )  # fmt: skip


def reference_path(db: str | Path, key: str) -> Path:
    """Where a reference pass is kept: ``quantbench-logits/KEY.npz`` beside the results database. A file, not
    SQLite rows: tens of MB for a long text would bloat the shared WAL store, and a file is easy to list,
    delete or copy; the key names everything that makes it valid (:func:`reference_key`)."""
    return Path(db).expanduser().resolve().parent / "quantbench-logits" / f"{key}.npz"


def reference_key(fingerprint: str, spec: str, ids: torch.Tensor, ctx: int, stride: int, k: int) -> str:
    """File stem of a stored reference: the weights, the reference quantization, the exact token ids (so
    the text, its truncation and the tokenizer), the window settings and k."""
    digest = hashlib.sha256(np.ascontiguousarray(ids.cpu().numpy().astype(np.int64)).tobytes()).hexdigest()
    key = f"{fingerprint}|{spec}|{digest}|{ctx}|{stride}|{k}"
    return hashlib.sha256(key.encode()).hexdigest()[:24]


@dataclass(frozen=True)
class KLDStats:
    """llama.cpp ``--kl-divergence`` statistics of a candidate against a reference (nats; p in 0..1)."""

    tokens: int
    ppl: float
    ppl_ref: float
    ppl_ratio: float  # exp(mean NLL - mean NLL_ref)
    ppl_ratio_unc: float
    kld_mean: float
    kld_mean_unc: float
    kld_median: float
    kld_p95: float
    kld_p99: float
    kld_max: float
    dp_mean: float
    rms_dp: float
    rms_dp_unc: float
    same_top: float
    same_top_unc: float
    topk: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _mean_unc(values: np.ndarray) -> tuple[float, float]:
    """llama.cpp's mean_and_uncertainty: mean and standard error (0 with 10 values or fewer)."""
    n = values.size
    mean = float(values.mean())
    var = float(np.mean(values * values)) - mean * mean
    return mean, math.sqrt(var / (n - 1)) if var > 0 and n > 10 else 0.0


def kld_summary(
    nll: np.ndarray,
    nll_ref: np.ndarray,
    kld: np.ndarray,
    p_diff: np.ndarray,
    same_top: np.ndarray,
    topk: int = 0,
) -> KLDStats:
    """Reduce per-token values to llama.cpp's statistics (float64)."""
    nll, nll_ref, kld, p_diff = (np.asarray(x, dtype=np.float64) for x in (nll, nll_ref, kld, p_diff))
    n = nll.size
    if n == 0:
        raise PerplexityError("no scored tokens to compare")
    log_ppl, log_ppl_unc = _mean_unc(nll)
    log_base, log_base_unc = _mean_unc(nll_ref)
    cov = (float(np.mean(nll * nll_ref)) - log_ppl * log_base) / (n - 1) if n >= 10 else 0.0
    ratio_unc = math.sqrt(max(log_ppl_unc**2 + log_base_unc**2 - 2 * cov, 0.0))
    ratio = math.exp(log_ppl - log_base)
    kld_mean, kld_unc = _mean_unc(kld)
    mse, mse_unc = _mean_unc(p_diff * p_diff)
    rms = math.sqrt(mse)
    top = float(np.mean(same_top))
    return KLDStats(
        tokens=n,
        ppl=math.exp(log_ppl),
        ppl_ref=math.exp(log_base),
        ppl_ratio=ratio,
        ppl_ratio_unc=ratio * ratio_unc,
        kld_mean=kld_mean,
        kld_mean_unc=kld_unc,
        kld_median=float(np.median(kld)),
        kld_p95=float(np.quantile(kld, 0.95)),
        kld_p99=float(np.quantile(kld, 0.99)),
        kld_max=float(kld.max()),
        dp_mean=float(p_diff.mean()),
        rms_dp=rms,
        rms_dp_unc=0.5 / rms * mse_unc if rms > 0 else 0.0,
        same_top=top,
        same_top_unc=math.sqrt(top * (1 - top) / (n - 1)) if n > 1 else 0.0,
        topk=topk,
    )


def _topk_record(logprobs: torch.Tensor, targets: torch.Tensor, k: int, m: int) -> tuple[torch.Tensor, ...]:
    """(top_ids, top_logprobs, true_logprob, rest_logprob, tail_ids, tail_logprobs) of float32
    log-probabilities [T, V]."""
    top_lp, top_ids = torch.topk(logprobs, k, dim=-1)
    true_lp = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    rest = _rest_logprob(logprobs, top_ids)
    # Systematic sample of the tail: the tokens at the (j + 1/2) / m quantiles of its cumulative mass.
    tail_p = logprobs.double().exp().scatter(-1, top_ids, 0.0)
    cdf = torch.cumsum(tail_p, -1)
    cdf = cdf / cdf[:, -1:].clamp_min(1e-300)
    u = ((torch.arange(m, dtype=torch.float64, device=logprobs.device) + 0.5) / m).expand(cdf.shape[0], m)
    tail_ids = torch.searchsorted(cdf, u.contiguous()).clamp(max=logprobs.shape[-1] - 1)
    return top_ids, top_lp, true_lp, rest, tail_ids, logprobs.gather(-1, tail_ids)


def _rest_logprob(logprobs: torch.Tensor, top_ids: torch.Tensor) -> torch.Tensor:
    """log of the probability outside ``top_ids``: a logsumexp over the other tokens (no 1 - sum
    cancellation when the top k hold nearly everything)."""
    masked = logprobs.scatter(-1, top_ids, float("-inf"))
    return torch.logsumexp(masked, dim=-1)


def token_kld(
    logprobs: torch.Tensor,
    targets: torch.Tensor,
    top_ids: torch.Tensor,
    top_logprobs: torch.Tensor,
    true_logprob: torch.Tensor,
    rest_logprob: torch.Tensor,
    tail_ids: torch.Tensor,
    tail_logprobs: torch.Tensor,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per token (nll, nll_ref, kld, p_diff, same_top) of candidate log-probabilities ``[T, V]`` against a
    stored reference (see the module docstring); float64."""
    lq = logprobs.double()
    lp = top_logprobs.double()
    kld = (lp.exp() * (lp - lq.gather(-1, top_ids))).sum(-1)
    lp_rest = rest_logprob.double()
    p_rest = lp_rest.exp()
    bucket = p_rest * (lp_rest - _rest_logprob(lq, top_ids))
    sampled = p_rest * (tail_logprobs.double() - lq.gather(-1, tail_ids)).mean(-1)
    # No tail (the top k hold everything): 0 * log 0 = 0, and the differences above are nan.
    kld = kld + torch.where(p_rest > 0, torch.maximum(sampled, bucket), torch.zeros_like(p_rest))
    q_true = lq.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    p_true = true_logprob.double()
    p_diff = q_true.exp() - p_true.exp()
    same = lq.argmax(-1) == top_ids[:, 0]
    return (
        (-q_true).cpu().numpy(),
        (-p_true).cpu().numpy(),
        kld.cpu().numpy(),
        p_diff.cpu().numpy(),
        same.cpu().numpy(),
    )


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


def encode_text(
    tokenizer: Any, text: str | torch.Tensor | list[int], max_tokens: int | None = None
) -> torch.Tensor:
    """The token ids :func:`perplexity` scores (``text`` as given, first ``max_tokens`` only)."""
    ids = _encode(tokenizer, text)
    return ids if max_tokens is None else ids[:max_tokens]


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
    record_topk: int = 0,
    reference: LogitReference | None = None,
    tail_samples: int = 0,
    engine: bool | None = None,
) -> PerplexityResult:
    """Sliding-window perplexity of ``model`` on ``text`` (a string, or token ids already encoded).

    ``ctx``: window length in tokens (capped by the model's ``max_position_embeddings``); ``stride``:
    distance between window starts (default ``ctx // 2``); ``max_tokens``: keep only the first tokens of
    the text; ``batch_size``: windows of equal shape per forward. ``record_topk=k``: also keep this pass's
    top-k log-probabilities and ``tail_samples`` (default ``TAIL_SAMPLES``) tail samples as a
    :class:`LogitReference` (``result.logits_reference``); ``reference``: compare with a stored reference
    pass of the same text and windows (``result.kld``). ``engine``: which forward runs the windows, as in
    :func:`quantbench.eval.engine_lm.scoring_lm` (None: quantbench's engine on CUDA, the HF forward on CPU);
    ``result.scoring`` says which ran.
    """
    from quantbench.eval.engine_lm import WindowLogits

    stride = ctx // 2 if stride is None else stride
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if max_pos and ctx > max_pos:
        raise PerplexityError(f"ctx {ctx} exceeds the model's context length {max_pos}")
    ids = encode_text(tokenizer, text, max_tokens)
    if ids.numel() < 2:
        raise PerplexityError(f"the text has {ids.numel()} token(s); need at least 2")
    windows = sliding_windows(ids.numel(), ctx, stride)
    device = next(model.parameters()).device
    forward = WindowLogits(model, engine)
    if reference is not None:
        scored_targets = torch.cat([ids[f:e] for _, e, f in windows]).numpy()
        if (reference.ctx, reference.stride) != (ctx, stride) or not np.array_equal(
            reference.targets, scored_targets
        ):
            raise PerplexityError(
                "the KLD reference was computed on other tokens or windows "
                f"(ctx {reference.ctx}, stride {reference.stride}, {reference.targets.size} scored tokens)"
            )

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
    records: list[tuple[torch.Tensor, ...]] = []  # record_topk: per group, _topk_record(...)
    tail_samples = tail_samples or TAIL_SAMPLES
    per_token: list[tuple[np.ndarray, ...]] = []  # reference: per group token_kld(...)
    start = time.perf_counter()
    with torch.inference_mode(), ProgressBar(len(windows), f"ppl ctx={ctx} stride={stride}", progress) as bar:
        for group in groups:
            n_keep = group[0][1] - group[0][2]  # tokens scored per window in this group
            batch = torch.stack([ids[b:e] for b, e, _ in group]).to(device)
            targets = torch.stack([ids[f:e] for _, e, f in group]).to(device)
            # logits at positions first-1 .. end-2 predict tokens first .. end-1.
            logits = forward(batch, n_keep + 1)[:, :-1]
            logprobs = F.log_softmax(logits.float(), dim=-1)
            token_lp = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            nll_sum -= token_lp.double().sum().item()
            flat_lp = logprobs.reshape(-1, logprobs.shape[-1])
            flat_targets = targets.reshape(-1)
            if record_topk:
                recorded = _topk_record(flat_lp, flat_targets, record_topk, tail_samples)
                records.append(tuple(t.cpu() for t in recorded))
            if reference is not None:
                sl = slice(scored, scored + flat_targets.numel())
                ref_rows = (reference.top_ids[sl], reference.top_logprobs[sl], reference.true_logprob[sl])
                ref_rows += (reference.rest_logprob[sl], reference.tail_ids[sl], reference.tail_logprobs[sl])
                per_token.append(token_kld(flat_lp, flat_targets, *(_as_tensor(x, device) for x in ref_rows)))
            scored += targets.numel()
            bar.advance(len(group))
    seconds = time.perf_counter() - start
    nll = nll_sum / scored
    logits_reference = None
    if record_topk:
        top_ids, top_lp, true_lp, rest, tail_ids, tail_lp = (
            torch.cat(parts).numpy() for parts in zip(*records, strict=True)
        )
        logits_reference = LogitReference(
            torch.cat([ids[f:e] for _, e, f in windows]).numpy().astype(np.int64),
            top_ids.astype(np.int32),
            top_lp.astype(np.float32),
            true_lp.astype(np.float32),
            rest.astype(np.float32),
            tail_ids.astype(np.int32),
            tail_lp.astype(np.float32),
            ctx,
            stride,
            getattr(getattr(model, "quantbench_config", None), "spec", ""),
        )
    kld = None
    if reference is not None:
        columns = [np.concatenate(parts) for parts in zip(*per_token, strict=True)]
        kld = kld_summary(*columns, topk=reference.k)
    return PerplexityResult(
        ppl=math.exp(nll),
        nll=nll,
        tokens=int(ids.numel()),
        scored=scored,
        windows=len(windows),
        ctx=ctx,
        stride=stride,
        seconds=seconds,
        kld=kld,
        logits_reference=logits_reference,
        scoring=forward.scoring,
    )


def _as_tensor(x: np.ndarray, device: torch.device) -> torch.Tensor:
    """A stored array on ``device``; token ids as int64 (what gather wants)."""
    t = torch.from_numpy(np.ascontiguousarray(x)).to(device)
    return t.long() if not t.is_floating_point() else t

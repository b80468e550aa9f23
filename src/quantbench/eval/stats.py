"""Statistics on per-question results: how sure is an accuracy, and is a quantization really worse?

Everything here is a pure function of lists of :class:`~quantbench.eval.store.QuestionResult` (or of
plain counts), so it works the same on a fresh run's answers and on answers read back from the store.

* **Accuracy interval**: the Wilson score interval (95 %). It is the usual choice for a binomial
  proportion: unlike the normal ("Wald") interval it stays inside [0, 1] and keeps close to its nominal
  coverage with few questions or accuracies near 0 / 1.
* **Paired comparison** (:func:`compare`): the candidate and the reference answered the *same* questions,
  so the questions are paired by (subject, idx) and only the questions where the two disagree on
  correctness carry information about the difference:

  - ``diff``: candidate accuracy minus reference accuracy on the paired questions;
  - ``ci_low``/``ci_high``: a 95 % interval of ``diff``: the percentile interval of a paired bootstrap over
    questions (10,000 resamples, seeded: the same inputs always give the same interval), widened where
    needed to Agresti & Min's adjusted interval (add 1/2 to each cell of the paired 2x2 table, then Wald).
    The bootstrap alone collapses to a point when few questions change: no flip in 20 questions would read
    "±0.0 points", while the adjusted interval says ±8.9;
  - ``p_mcnemar``: exact McNemar test, i.e. a two-sided binomial test of the right->wrong count among the
    discordant questions against 1/2 (no normal approximation, valid for any count);
  - ``flips_down`` / ``flips_up``: questions right with the reference and wrong with the candidate / the
    reverse;
  - ``agreement``: fraction of paired questions with the same predicted letter (right or wrong), with its
    Wilson interval (``agreement_low``/``agreement_high``): how many of the reference's answers the method
    changes, a measure that stays informative at sample sizes where accuracy differences cannot be seen;
  - ``kl``: mean KL(reference || candidate) of the answer distribution, the softmax over the four letters'
    log-probabilities, in nats; ``None`` when log-probabilities are missing (``generate`` mode).

* **Verdict** (:func:`verdict`), with ``ref`` the reference's name and points = percentage points:

  1. a difference is *shown* only when both tests agree: the bootstrap interval excludes 0 **and** the exact
     McNemar p-value is below 0.05. Then: ``"worse by X ± Y points"`` / ``"better by X ± Y points"``, X the
     point estimate, Y the half-width of the 95 % interval;
  2. otherwise, if the 95 % interval is wider than ±``TOO_WIDE_PTS`` (5) points: ``"too few questions to
     tell (CI ±Z points)"`` (the data do not exclude a large loss);
  3. otherwise ``"indistinguishable from ref (CI ±Z points)"``: no difference detected, and any real one
     is probably within ±Z points.

* **"Within 1 point"** (:func:`within_margin`), used by the report's recommendation: a candidate is
  *shown within* ``margin`` points of the reference when the lower 95 % bound of ``diff`` is at least
  ``-margin`` (a non-inferiority test); it is *not shown worse* than ``margin`` when the upper bound is
  at least ``-margin`` (the data cannot rule "within the margin" out).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

Z95 = 1.959963984540054  # scipy.stats.norm.ppf(0.975)
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
ALPHA = 0.05
TOO_WIDE_PTS = 5.0  # a 95 % half-width beyond this many points says "too few questions to tell"


@dataclass(frozen=True)
class AccuracyInterval:
    """Accuracy with its 95 % Wilson score interval (all fractions in 0..1)."""

    n: int
    correct: int
    accuracy: float
    low: float
    high: float


@dataclass(frozen=True)
class Comparison:
    """A candidate against the reference on the questions both answered (see the module docstring)."""

    n: int  # paired questions
    ref_accuracy: float
    cand_accuracy: float
    diff: float  # cand - ref, fraction (multiply by 100 for points)
    ci_low: float
    ci_high: float
    p_mcnemar: float
    flips_down: int  # right -> wrong
    flips_up: int  # wrong -> right
    agreement: float  # same predicted letter
    kl: float | None  # mean KL(ref || cand) over the 4 answer letters, nats
    verdict: str
    agreement_low: float = float("nan")
    agreement_high: float = float("nan")

    @property
    def half_width_pts(self) -> float:
        return 50.0 * (self.ci_high - self.ci_low)


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion ``correct / n``; (nan, nan) when ``n == 0``."""
    if n <= 0:
        return float("nan"), float("nan")
    p = correct / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At 0 or n correct one bound is exactly 0 / 1; rounding would put it a hair inside.
    low = 0.0 if correct == 0 else max(0.0, centre - half)
    high = 1.0 if correct == n else min(1.0, centre + half)
    return low, high


def accuracy_interval(results: Sequence[Any]) -> AccuracyInterval:
    """Accuracy of the scored questions of ``results`` (QuestionResult) with its Wilson interval."""
    scored = [r for r in results if r.shots_used >= 0]
    return accuracy_from_counts(sum(bool(r.correct) for r in scored), len(scored))


def accuracy_from_counts(correct: int, n: int) -> AccuracyInterval:
    low, high = wilson_interval(correct, n)
    return AccuracyInterval(n, correct, correct / n if n else float("nan"), low, high)


def mcnemar_exact(flips_down: int, flips_up: int) -> float:
    """Two-sided exact McNemar p-value: binomial test of ``flips_down`` out of the discordant pairs vs 1/2."""
    from scipy.stats import binomtest

    discordant = flips_down + flips_up
    if discordant == 0:
        return 1.0
    return float(binomtest(flips_down, discordant, 0.5, alternative="two-sided").pvalue)


def paired_bootstrap(
    ref_correct: Sequence[bool] | np.ndarray,
    cand_correct: Sequence[bool] | np.ndarray,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    confidence: float = 0.95,
) -> tuple[float, float]:
    """Percentile interval of ``mean(cand) - mean(ref)`` under resampling the paired questions.

    Each question contributes ``d = cand - ref`` in {-1, 0, +1}. A resample of n questions with
    replacement has mean ``(#(+1 drawn) - #(-1 drawn)) / n``, and those two counts are jointly
    multinomial(n; c/n, b/n, rest) where b / c are the right->wrong / wrong->right counts: drawing the counts
    directly is the same bootstrap distribution as drawing n indices, at O(resamples) cost instead of
    O(resamples * n) (a full MMLU test split has 14k questions). Seeded numpy ``default_rng``: reproducible.
    """
    ref = np.asarray(ref_correct, dtype=bool)
    cand = np.asarray(cand_correct, dtype=bool)
    if ref.shape != cand.shape or ref.ndim != 1:
        raise ValueError("ref_correct and cand_correct must be 1-D and of the same length")
    n = ref.size
    if n == 0:
        return float("nan"), float("nan")
    down = int(np.sum(ref & ~cand))
    up = int(np.sum(~ref & cand))
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n, [up / n, down / n, (n - up - down) / n], size=resamples)
    means = (counts[:, 0] - counts[:, 1]) / n
    tail = (1.0 - confidence) / 2
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)


def agresti_min_interval(flips_down: int, flips_up: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95 % interval of the paired difference (up - down) / n after adding 1/2 to every cell of the 2x2
    table (Agresti & Min 2005): never of zero width, close to the plain Wald interval once many differ."""
    if n <= 0:
        return float("nan"), float("nan")
    size = n + 2.0
    down, up = flips_down + 0.5, flips_up + 0.5
    diff = (up - down) / size
    var = ((up + down) - (up - down) ** 2 / size) / size**2
    half = z * math.sqrt(max(var, 0.0))
    return max(-1.0, diff - half), min(1.0, diff + half)


def answer_distribution(logprobs: Sequence[float]) -> np.ndarray:
    """Softmax over the answer letters' log-probabilities (float64): the model's answer distribution."""
    x = np.asarray(logprobs, dtype=np.float64)
    x = x - x.max()
    e = np.exp(x)
    return e / e.sum()


def answer_kl(ref_logprobs: Sequence[float], cand_logprobs: Sequence[float]) -> float:
    """KL(ref || cand) in nats between the two answer distributions of one question."""
    p = answer_distribution(ref_logprobs)
    q = answer_distribution(cand_logprobs)
    mask = p > 0
    return float(np.sum(p[mask] * (np.log(p[mask]) - np.log(q[mask]))))


def pair(reference: Sequence[Any], candidate: Sequence[Any]) -> list[tuple[Any, Any]]:
    """(ref, cand) QuestionResults of the questions both scored, matched by (subject, idx), in ref order."""
    by_key = {(r.subject, r.idx): r for r in candidate if r.shots_used >= 0}
    out = []
    for r in reference:
        c = by_key.get((r.subject, r.idx))
        if c is not None and r.shots_used >= 0:
            out.append((r, c))
    return out


def verdict(
    diff: float, ci_low: float, ci_high: float, p_value: float, n: int, reference: str = "bf16"
) -> str:
    """The verdict rule of the module docstring (points are percentage points)."""
    if n == 0 or math.isnan(ci_low):
        return "no paired questions"
    half = 50.0 * (ci_high - ci_low)
    shown = (ci_low > 0 or ci_high < 0) and p_value < ALPHA
    if shown:
        word = "worse" if diff < 0 else "better"
        return f"{word} by {abs(100 * diff):.1f} ± {half:.1f} points"
    if half > TOO_WIDE_PTS:
        return f"too few questions to tell (CI ±{half:.1f} points)"
    return f"indistinguishable from {reference} (CI ±{half:.1f} points)"


def compare(
    reference_answers: Sequence[Any],
    candidate_answers: Sequence[Any],
    reference: str = "bf16",
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> Comparison:
    """Paired statistics of ``candidate_answers`` against ``reference_answers`` (lists of QuestionResult).

    ``reference`` only names the reference in the verdict ("indistinguishable from bf16").
    """
    pairs = pair(reference_answers, candidate_answers)
    n = len(pairs)
    ref_ok = np.array([bool(r.correct) for r, _ in pairs], dtype=bool)
    cand_ok = np.array([bool(c.correct) for _, c in pairs], dtype=bool)
    down = int(np.sum(ref_ok & ~cand_ok))
    up = int(np.sum(~ref_ok & cand_ok))
    ref_acc = float(ref_ok.mean()) if n else float("nan")
    cand_acc = float(cand_ok.mean()) if n else float("nan")
    diff = cand_acc - ref_acc
    low, high = paired_bootstrap(ref_ok, cand_ok, resamples, seed)
    adj_low, adj_high = agresti_min_interval(down, up, n)
    if n:
        low, high = min(low, adj_low), max(high, adj_high)
    p = mcnemar_exact(down, up)
    same = sum(r.pred == c.pred for r, c in pairs)
    agreement = same / n if n else float("nan")
    agree_low, agree_high = wilson_interval(same, n)
    kls = [answer_kl(r.logprobs, c.logprobs) for r, c in pairs if r.logprobs and c.logprobs]
    kl = float(np.mean(kls)) if kls else None
    return Comparison(
        n=n,
        ref_accuracy=ref_acc,
        cand_accuracy=cand_acc,
        diff=diff,
        ci_low=low,
        ci_high=high,
        p_mcnemar=p,
        flips_down=down,
        flips_up=up,
        agreement=agreement,
        kl=kl,
        verdict=verdict(diff, low, high, p, n, reference),
        agreement_low=agree_low,
        agreement_high=agree_high,
    )


def within_margin(c: Comparison, margin_pts: float = 1.0) -> str:
    """``"shown"`` when the lower 95 % bound of the difference is >= -margin points (non-inferiority),
    ``"not excluded"`` when only the upper bound is, ``"worse"`` when even the upper bound is below,
    ``"unknown"`` without paired questions."""
    if c.n == 0 or math.isnan(c.ci_low):
        return "unknown"
    eps = 1e-9  # -0.01 * 100 must count as -1 point
    if 100 * c.ci_low >= -margin_pts - eps:
        return "shown"
    if 100 * c.ci_high >= -margin_pts - eps:
        return "not excluded"
    return "worse"

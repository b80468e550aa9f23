"""quantbench.eval.stats against references computed here by hand (float64, math.comb, closed forms)."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from quantbench.eval import stats
from quantbench.eval.store import QuestionResult


def _qr(subject, idx, answer, pred, logprobs=None, shots_used=5):
    return QuestionResult(subject, idx, "STEM", answer, pred, shots_used, logprobs)


def _mcnemar_by_hand(b: int, c: int) -> float:
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2.0**n
    return min(1.0, 2.0 * tail)


@pytest.mark.parametrize("b,c", [(0, 0), (0, 5), (3, 3), (10, 2), (1, 12), (40, 25), (7, 0)])
def test_mcnemar_exact_matches_binomial_sum(b, c):
    assert stats.mcnemar_exact(b, c) == pytest.approx(_mcnemar_by_hand(b, c), rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("k,n", [(0, 10), (10, 10), (7, 20), (512, 1000), (1, 3)])
def test_wilson_matches_closed_form(k, n):
    # Closed form: the roots of (p - phat)^2 = z^2 p (1 - p) / n, solved as a quadratic in p (float64).
    z = 1.959963984540054
    phat = k / n
    a = 1 + z * z / n
    bq = -(2 * phat + z * z / n)
    cq = phat * phat
    disc = math.sqrt(bq * bq - 4 * a * cq)
    low, high = (-bq - disc) / (2 * a), (-bq + disc) / (2 * a)
    got = stats.wilson_interval(k, n)
    assert got == pytest.approx((low, high), abs=1e-12)
    assert 0.0 <= got[0] <= phat <= got[1] <= 1.0


def test_accuracy_interval_skips_unscored():
    results = [_qr("s", i, "A", "A" if i < 6 else "B") for i in range(10)] + [
        _qr("s", 10, "A", None, None, -1)
    ]
    acc = stats.accuracy_interval(results)
    assert (acc.n, acc.correct, acc.accuracy) == (10, 6, 0.6)
    assert (acc.low, acc.high) == stats.wilson_interval(6, 10)


def _exact_bootstrap_quantiles(n: int, up: int, down: int, qs: list[float]) -> list[float]:
    """Quantiles of the exact bootstrap distribution of mean(d), d in {+1 (up), -1 (down), 0}: enumerate the
    trinomial counts (float64, math.comb)."""
    pu, pd, p0 = up / n, down / n, (n - up - down) / n
    pmf: dict[int, float] = {}
    for i in range(n + 1):
        for j in range(n + 1 - i):
            k = n - i - j
            if (pu == 0 and i) or (pd == 0 and j) or (p0 == 0 and k):
                continue
            prob = math.comb(n, i) * math.comb(n - i, j) * pu**i * pd**j * p0**k
            pmf[i - j] = pmf.get(i - j, 0.0) + prob
    values = sorted(pmf)
    cdf = np.cumsum([pmf[v] for v in values])
    return [values[int(np.searchsorted(cdf, q))] / n for q in qs]


def _slow_bootstrap(ref, cand, resamples, seed):
    """The textbook paired bootstrap, one index list per resample, in pure Python."""
    rnd = random.Random(seed)
    n = len(ref)
    d = [int(c) - int(r) for r, c in zip(ref, cand, strict=True)]
    means = sorted(sum(d[rnd.randrange(n)] for _ in range(n)) / n for _ in range(resamples))

    def quantile(q):  # numpy's default "linear" method
        pos = q * (resamples - 1)
        lo = int(math.floor(pos))
        return means[lo] + (pos - lo) * (means[min(lo + 1, resamples - 1)] - means[lo])

    return quantile(0.025), quantile(0.975)


def test_paired_bootstrap_against_exact_distribution_and_slow_loop():
    n = 40
    ref = np.array([True] * 24 + [False] * 16)
    cand = ref.copy()
    cand[:7] = False  # 7 right -> wrong
    cand[30:32] = True  # 2 wrong -> right
    low, high = stats.paired_bootstrap(ref, cand, resamples=10_000, seed=3)
    assert (low, high) == stats.paired_bootstrap(ref, cand, resamples=10_000, seed=3)  # reproducible
    exact = _exact_bootstrap_quantiles(n, up=2, down=7, qs=[0.025, 0.975])
    step = 1 / n  # the bootstrap means live on a grid of 1/n
    assert low == pytest.approx(exact[0], abs=step + 1e-12)
    assert high == pytest.approx(exact[1], abs=step + 1e-12)
    slow = _slow_bootstrap(ref, cand, resamples=4000, seed=3)
    assert low == pytest.approx(slow[0], abs=step + 1e-12)
    assert high == pytest.approx(slow[1], abs=step + 1e-12)
    # No discordant question: the interval is the single point 0.
    assert stats.paired_bootstrap(ref, ref) == (0.0, 0.0)


def test_answer_kl_matches_float64_hand_computation():
    ref = [-0.5, -1.5, -3.0, -4.0]
    cand = [-0.9, -1.0, -2.5, -5.0]
    p = [math.exp(x) for x in ref]
    p = [x / sum(p) for x in p]
    q = [math.exp(x) for x in cand]
    q = [x / sum(q) for x in q]
    expected = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
    assert stats.answer_kl(ref, cand) == pytest.approx(expected, rel=1e-12)
    # Log-probabilities that are not normalised (only the 4 letters' share counts): same answer.
    assert stats.answer_kl([x - 7 for x in ref], cand) == pytest.approx(expected, rel=1e-12)
    assert stats.answer_kl(ref, ref) == 0.0


def test_compare_pairs_by_subject_and_idx():
    lp_a = [-0.1, -3.0, -3.0, -3.0]
    lp_b = [-3.0, -0.1, -3.0, -3.0]
    ref = [_qr("x", i, "A", "A", lp_a) for i in range(6)] + [_qr("y", 0, "A", "B", lp_b)]
    cand = [
        _qr("y", 0, "A", "A", lp_a),  # wrong -> right
        _qr("x", 0, "A", "B", lp_b),  # right -> wrong
        _qr("x", 1, "A", "B", lp_b),  # right -> wrong
        *[_qr("x", i, "A", "A", lp_a) for i in (2, 3, 4)],
        _qr("x", 5, "A", None, None, -1),  # not scored: unpaired
        _qr("z", 9, "A", "A", lp_a),  # only in the candidate
    ]
    c = stats.compare(ref, cand, reference="bf16")
    assert c.n == 6
    assert (c.flips_down, c.flips_up) == (2, 1)
    assert c.ref_accuracy == pytest.approx(5 / 6) and c.cand_accuracy == pytest.approx(4 / 6)
    assert c.diff == pytest.approx(-1 / 6)
    assert c.agreement == pytest.approx(3 / 6)
    expected_kl = (3 * stats.answer_kl(lp_a, lp_b)) / 6  # 3 flipped distributions, 3 identical
    assert c.kl == pytest.approx(expected_kl, rel=1e-12)
    assert c.p_mcnemar == pytest.approx(_mcnemar_by_hand(2, 1))
    assert c.verdict.startswith("too few questions to tell (CI ±")
    # generate mode: no log-probabilities, no KL.
    gen = stats.compare([_qr("x", 0, "A", "A")], [_qr("x", 0, "A", "B")])
    assert gen.kl is None and gen.n == 1


def _answers(n, down, up, base_correct):
    """n questions; the reference is right on the first base_correct; the candidate flips `down` of those
    and `up` of the others."""
    ref = [_qr("s", i, "A", "A" if i < base_correct else "B") for i in range(n)]
    cand = []
    for i in range(n):
        right = i < base_correct
        if right and i < down:
            right = False
        elif not right and i - base_correct < up:
            right = True
        cand.append(_qr("s", i, "A", "A" if right else "C"))
    return ref, cand


def test_verdict_rule():
    # Many questions, many more right->wrong flips than the reverse: shown worse.
    ref, cand = _answers(2000, down=120, up=30, base_correct=1000)
    c = stats.compare(ref, cand)
    assert c.p_mcnemar < 0.05 and c.ci_high < 0
    assert c.verdict == f"worse by 4.5 ± {c.half_width_pts:.1f} points"
    assert stats.within_margin(c, 1.0) == "worse"
    # Balanced flips, narrow interval: indistinguishable.
    ref, cand = _answers(2000, down=10, up=9, base_correct=1000)
    c = stats.compare(ref, cand)
    assert c.verdict == f"indistinguishable from bf16 (CI ±{c.half_width_pts:.1f} points)"
    assert c.half_width_pts < 1.0 and stats.within_margin(c, 1.0) == "shown"
    # Better.
    ref, cand = _answers(2000, down=5, up=61, base_correct=1000)
    assert stats.compare(ref, cand, reference="fp16").verdict.startswith("better by 2.8 ± ")
    # 20 questions, 4 points down: nothing can be told.
    ref, cand = _answers(20, down=2, up=1, base_correct=10)
    c = stats.compare(ref, cand)
    assert c.verdict.startswith("too few questions to tell") and stats.within_margin(c) == "not excluded"
    assert stats.verdict(0.0, float("nan"), float("nan"), 1.0, 0) == "no paired questions"
    # Both tests must agree: an interval excluding 0 with p >= 0.05 is not "shown".
    assert stats.verdict(-0.02, -0.03, -0.005, 0.06, 500).startswith("indistinguishable")

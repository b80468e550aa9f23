"""Statistic columns of the comparison tables (``quantbench run`` and ``quantbench report``).

Per method: accuracy with its 95 % Wilson interval; against the reference row (the first of bf16 / fp16 /
fp32 present, else the first method): the paired difference with its 95 % bootstrap interval, flips,
agreement, answer KL divergence, exact McNemar p-value and the verdict of :mod:`quantbench.eval.stats`.
Everything is computed from per-question results (``QuestionResult`` lists); a method without them gets its
accuracy interval from its counts and ``-`` in the paired columns.
"""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from quantbench.eval.stats import (
    AccuracyInterval,
    Comparison,
    accuracy_from_counts,
    accuracy_interval,
    compare,
)

STAT_COLUMNS = (
    "Avg % (95% CI)",
    "Δ vs ref (95% CI)",
    "flips ↓/↑",
    "agree % (95% CI)",
    "KLD",
    "p (McNemar)",
    "verdict",
)
STAT_RAW_COLUMNS = (
    "Avg %",
    "Avg low %",
    "Avg high %",
    "Questions",
    "Paired",
    "Diff pts",
    "Diff low pts",
    "Diff high pts",
    "Flips down",
    "Flips up",
    "Agreement",
    "KLD",
    "p McNemar",
    "Verdict",
)
BASELINE_SPECS = ("bf16", "fp16", "fp32")


@dataclass(frozen=True)
class MethodStats:
    spec: str
    accuracy: AccuracyInterval
    comparison: Comparison | None  # None for the reference row, or without per-question results
    is_reference: bool = False


def reference_spec(specs: Sequence[str], named: str | None = None) -> str | None:
    """The reference row: ``named`` if given and present, else the first of bf16 / fp16 / fp32, else the
    first spec."""
    if named is not None and named in specs:
        return named
    for spec in BASELINE_SPECS:
        if spec in specs:
            return spec
    return specs[0] if specs else None


def method_stats(
    answers: dict[str, Sequence[Any] | None],
    reference: str | None,
    counts: dict[str, tuple[int, int]] | None = None,
) -> dict[str, MethodStats]:
    """Statistics of every spec of ``answers`` (spec -> QuestionResults or None) against ``reference``.

    ``counts`` (spec -> (correct, questions)) gives the accuracy interval of a spec without answers.
    """
    ref_answers = answers.get(reference) if reference is not None else None
    out = {}
    for spec, rows in answers.items():
        if rows:
            acc = accuracy_interval(rows)
        elif counts and spec in counts:
            acc = accuracy_from_counts(*counts[spec])
        else:
            acc = accuracy_from_counts(0, 0)
        comparison = None
        if spec != reference and rows and ref_answers:
            comparison = compare(ref_answers, rows, reference=reference or "reference")
        out[spec] = MethodStats(spec, acc, comparison, spec == reference)
    return out


def _pts(x: float, sign: bool = False) -> str:
    return "-" if x != x else (f"{100 * x:+.1f}" if sign else f"{100 * x:.1f}")


def format_p(p: float) -> str:
    if p != p:
        return "-"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def stat_cells(s: MethodStats) -> list[str]:
    """The STAT_COLUMNS cells of one method."""
    a = s.accuracy
    acc = "-" if not a.n else f"{_pts(a.accuracy)} [{_pts(a.low)}, {_pts(a.high)}]"
    if s.is_reference:
        return [acc, "reference", "-", "-", "-", "-", "reference"]
    c = s.comparison
    if c is None:
        return [acc, "-", "-", "-", "-", "-", "no per-question results"]
    diff = f"{_pts(c.diff, True)} [{_pts(c.ci_low, True)}, {_pts(c.ci_high, True)}]"
    kl = "-" if c.kl is None else f"{c.kl:.4f}"
    agree = f"{_pts(c.agreement)} [{_pts(c.agreement_low)}, {_pts(c.agreement_high)}]"
    return [acc, diff, f"{c.flips_down}/{c.flips_up}", agree, kl, format_p(c.p_mcnemar), c.verdict]


def stat_raw(s: MethodStats) -> list[Any]:
    """The STAT_RAW_COLUMNS values of one method (numbers for CSV, points where named so)."""
    a, c = s.accuracy, s.comparison

    def pts(x: float | None) -> float | None:
        return None if x is None or math.isnan(x) else round(100 * x, 4)

    line: list[Any] = [pts(a.accuracy), pts(a.low), pts(a.high), a.n]
    if c is None:
        return [
            *line,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
            "reference" if s.is_reference else "",
        ]
    return [
        *line,
        c.n,
        pts(c.diff),
        pts(c.ci_low),
        pts(c.ci_high),
        c.flips_down,
        c.flips_up,
        c.agreement,
        c.kl,
        c.p_mcnemar,
        c.verdict,
    ]


def run_method_stats(runs: Sequence[Any], task: str, reference: str | None = None) -> dict[str, MethodStats]:
    """Statistics of ``quantbench run``'s methods (``MethodRun``s) for ``task``, keyed by spec, in run order."""
    answers: dict[str, Sequence[Any] | None] = {}
    for run in runs:
        result = next((r for r in run.results if r.task == task), None)
        answers[run.spec] = None if result is None else result.answers
    ok = [spec for spec, rows in answers.items() if rows]
    return method_stats(answers, reference_spec(ok, reference))


def run_stat_rows(runs: Sequence[Any], task: str, reference: str | None = None) -> list[list[str]]:
    """STAT_COLUMNS rows of ``quantbench run``'s methods (``MethodRun``s) for ``task``, in run order."""
    stats = run_method_stats(runs, task, reference)
    return [stat_cells(stats[run.spec]) for run in runs]


def load_answers(
    conn: sqlite3.Connection,
    record: dict[str, Any],
) -> list[Any]:
    """The stored per-question results of one ``runs`` row: its model/spec/task/split/shots/mode, its
    subjects (all when NULL) and the first ``limit_per_subject`` questions of each subject."""
    from quantbench.eval.store import QuestionResult

    query = (
        "SELECT subject, idx, category, answer, pred, shots_used, logprobs FROM results "
        "WHERE fingerprint=? AND spec=? AND task=? AND split=? AND shots=? AND mode=?"
    )
    args = [record.get(k) for k in ("fingerprint", "spec", "task", "split", "shots", "mode")]
    columns = {row[1] for row in conn.execute("PRAGMA table_info(results)")}
    if "protocol" in columns:  # stores since the protocol joined the key; older rows are lm-eval's
        query += " AND protocol=?"
        args.append(record.get("protocol") or "lmeval")
    subjects = record.get("subjects")
    if isinstance(subjects, str):
        subjects = json.loads(subjects)
    by_subject: dict[str, list[Any]] = {}
    for subj, idx, cat, ans, pred, used, lps in conn.execute(query + " ORDER BY subject, idx", args):
        if subjects and subj not in subjects:
            continue
        lp = None if lps is None else json.loads(lps)
        by_subject.setdefault(subj, []).append(QuestionResult(subj, idx, cat, ans, pred, used, lp))
    limit = record.get("limit_per_subject")
    out: list[Any] = []
    for rows in by_subject.values():
        out.extend(rows[:limit] if limit else rows)  # the harness evaluates the first `limit` rows
    return out


def decision_lines(stats: dict[str, MethodStats], labels: dict[str, str] | None = None) -> list[str]:
    """What a set of methods' statistics decides, in a few sentences: which methods are shown worse or
    better than the reference, how large an accuracy difference this sample cannot see, and, since that is
    often most of them on a small sample, the methods ranked by how many of the reference's answers they
    change (an agreement interval narrows much faster than an accuracy difference's)."""
    labels = labels or {}

    def _short(spec: str) -> str:
        return labels.get(spec, spec)

    ref = next((_short(s.spec) for s in stats.values() if s.is_reference), None)
    compared = [s for s in stats.values() if s.comparison is not None and s.comparison.n]
    if ref is None or not compared:
        return []
    lines = []
    shown = [s for s in compared if s.comparison.verdict.startswith(("worse", "better"))]
    for s in shown:
        lines.append(f"{_short(s.spec)}: {s.comparison.verdict} than {ref}")
    unclear = [s for s in compared if s not in shown]
    if unclear:
        widest = max(s.comparison.half_width_pts for s in unclear)
        n = min(s.comparison.n for s in unclear)
        names = ", ".join(_short(s.spec) for s in unclear)
        lines.append(
            f"accuracy: no difference from {ref} shown for {names}; with {n} paired questions a difference "
            f"of up to ±{widest:.1f} points could go unseen (more questions: --limit / --full)"
        )
    ranked = sorted(compared, key=lambda s: -s.comparison.agreement)
    changed = "; ".join(
        f"{_short(s.spec)} {_pts(1 - s.comparison.agreement)}% "
        f"[{_pts(1 - s.comparison.agreement_high)}, {_pts(1 - s.comparison.agreement_low)}]"
        for s in ranked
    )
    lines.append(f"answers changed vs {ref} (95% CI), fewest first: {changed}")
    separated = [
        (a, b)
        for i, a in enumerate(ranked)
        for b in ranked[i + 1 :]
        if a.comparison.agreement_low > b.comparison.agreement_high
    ]
    if separated:
        lines.append(
            "shown to change fewer answers: "
            + ", ".join(f"{_short(a.spec)} < {_short(b.spec)}" for a, b in separated)
        )
    return lines


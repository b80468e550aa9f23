"""Report plots (matplotlib, Agg backend, PNG bytes): accuracy vs weight size, accuracy vs ms/token with the
Pareto front marked, accuracy per category."""

from __future__ import annotations

import io
from collections.abc import Sequence

PNG_DPI = 100
FIGSIZE = (6.4, 4.0)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=PNG_DPI, bbox_inches="tight")
    _pyplot().close(fig)
    return buf.getvalue()


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (x lower is better, y higher is better),
    ordered by x."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], float("-inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def _annotate(ax, xs, ys, labels) -> None:
    for x, y, label in zip(xs, ys, labels, strict=True):
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)


def scatter(
    xs: Sequence[float],
    ys: Sequence[float],
    labels: Sequence[str],
    xlabel: str,
    ylabel: str,
    title: str,
    baseline: float | None = None,
    baseline_label: str = "",
    front: bool = False,
) -> bytes:
    """A labelled scatter plot; ``front`` marks the Pareto front (lower x, higher y)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=FIGSIZE)
    ax.scatter(xs, ys, s=36, color="#4c72b0", zorder=3, label="configurations")
    _annotate(ax, xs, ys, labels)
    if front and len(xs) > 1:
        idx = pareto_front(list(zip(xs, ys, strict=True)))
        ax.plot(
            [xs[i] for i in idx],
            [ys[i] for i in idx],
            drawstyle="steps-post",
            color="#dd8452",
            linewidth=1.5,
            zorder=2,
        )
        ax.scatter(
            [xs[i] for i in idx],
            [ys[i] for i in idx],
            s=90,
            facecolors="none",
            edgecolors="#dd8452",
            linewidths=1.8,
            zorder=4,
            label="Pareto front",
        )
    if baseline is not None:
        ax.axhline(baseline, color="grey", linestyle="--", linewidth=1, label=baseline_label or "baseline")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.margins(x=0.15, y=0.12)
    ax.legend(fontsize=8, loc="best")
    return _png(fig)


def category_bars(categories: Sequence[str], series: dict[str, Sequence[float]], title: str) -> bytes:
    """Grouped bars: one group per category, one bar per configuration (accuracy in %)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.4, 1.2 * len(categories) + 0.4 * len(series)), 4.0))
    n = max(len(series), 1)
    width = 0.8 / n
    for k, (label, values) in enumerate(series.items()):
        offsets = [i - 0.4 + width * (k + 0.5) for i in range(len(categories))]
        ax.bar(offsets, values, width=width, label=label)
    ax.set_xticks(range(len(categories)))
    ax.set_xticklabels(categories)
    ax.set_ylabel("accuracy %")
    ax.set_ylim(0, 100)
    ax.set_title(title, fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=min(n, 4), loc="upper center", bbox_to_anchor=(0.5, -0.08))
    return _png(fig)

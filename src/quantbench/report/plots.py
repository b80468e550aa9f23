"""Report plots (matplotlib, Agg backend, PNG bytes): accuracy vs weight size, accuracy vs ms/token with the
Pareto front marked (both with 95 % intervals as error bars), accuracy per category.

Point labels never overlap: :func:`place_labels` tries offsets around each point (right/left, above/below,
then further up and down, with a leader line) and keeps the first whose text box overlaps no label placed
before it.
"""

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


LABEL_PAD_PX = 1.0  # gap kept between two labels' boxes


def _candidate_offsets(steps: int = 30) -> list[tuple[float, float, str]]:
    """(dx, dy in points, horizontal alignment): beside the point first, then stacked further away."""
    out = [(5.0, 4.0, "left"), (5.0, -12.0, "left"), (-5.0, 4.0, "right"), (-5.0, -12.0, "right")]
    for j in range(1, steps):
        up, down = 4.0 + 11.0 * j, -12.0 - 11.0 * j
        out += [(5.0, up, "left"), (-5.0, up, "right"), (5.0, down, "left"), (-5.0, down, "right")]
    return out


def _overlaps(a, b) -> bool:
    return not (
        a.x1 + LABEL_PAD_PX <= b.x0 or b.x1 + LABEL_PAD_PX <= a.x0
        or a.y1 + LABEL_PAD_PX <= b.y0 or b.y1 + LABEL_PAD_PX <= a.y0
    )  # fmt: skip


def place_labels(
    ax, xs: Sequence[float], ys: Sequence[float], labels: Sequence[str], fontsize: int = 8
) -> list:
    """Annotate every point with its label where the label's box overlaps no earlier label's box.

    Call after the axes' limits are final (positions are in display space). Returns the annotations.
    """
    fig = ax.figure
    fig.canvas.draw()  # final transforms
    renderer = fig.canvas.get_renderer()
    placed: list = []
    boxes: list = []
    offsets = _candidate_offsets()
    for x, y, text in zip(xs, ys, labels, strict=True):
        for dx, dy, ha in offsets:
            far = abs(dy) > 15
            ann = ax.annotate(
                text, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=fontsize, ha=ha,
                arrowprops={"arrowstyle": "-", "color": "#888888", "linewidth": 0.6} if far else None,
            )  # fmt: skip
            box = ann.get_window_extent(renderer)
            if not any(_overlaps(box, other) for other in boxes):
                break
            ann.remove()
        placed.append(ann)  # the last candidate stays if every one collided (30 rows of labels)
        boxes.append(box)
    return placed


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
    intervals: Sequence[tuple[float, float]] | None = None,
) -> bytes:
    """A labelled scatter plot; ``front`` marks the Pareto front (lower x, higher y); ``intervals``: a
    (low, high) y interval per point, drawn as error bars (the 95 % interval of the accuracy)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=FIGSIZE)
    ax.scatter(xs, ys, s=36, color="#4c72b0", zorder=3, label="configurations")
    if intervals is not None:
        below = [max(y - lo, 0.0) for y, (lo, _) in zip(ys, intervals, strict=True)]
        above = [max(hi - y, 0.0) for y, (_, hi) in zip(ys, intervals, strict=True)]
        ax.errorbar(xs, ys, yerr=[below, above], fmt="none", ecolor="#4c72b0", elinewidth=1, capsize=3,
                    alpha=0.7, zorder=2, label="95% interval")  # fmt: skip
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
    place_labels(ax, xs, ys, labels)
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

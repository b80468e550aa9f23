"""How rows of different lengths are split into forwards: fewest computed tokens for the fewest forwards.

A forward computes every row padded to the batch's longest, and evaluation rows (5-shot questions, lm-eval
contexts) differ in length several-fold: fixed-size batches of sorted rows compute mostly padding (5-shot
MMLU's question rows: 1.6 tokens per real token in batches of 64). :func:`plan_batches` splits rows sorted
longest first into consecutive runs by an exact dynamic program over the split points. Answers do not
depend on the split: a row's scores are the same in any batch.
"""

from __future__ import annotations

from collections.abc import Sequence

# What one more forward costs, in tokens of compute: it reads (quantized layers: dequantizes) every weight
# once and launches every kernel once, however few tokens it carries.
FORWARD_COST_TOKENS = 512


def plan_batches(
    widths: Sequence[int],
    max_rows: int,
    forward_cost: float = FORWARD_COST_TOKENS,
    keeps: Sequence[int] | None = None,
    keep_budget: int | None = None,
) -> list[slice]:
    """Split rows sorted longest first (``widths``: their tokens) into consecutive batches of at most
    ``max_rows`` rows, minimizing the tokens the forwards compute (each batch padded to its first, longest
    row) plus ``forward_cost`` per batch. With ``keeps`` and ``keep_budget``, a batch also keeps
    ``rows x max(keeps)`` scored positions at most (the logits' memory); a row over it alone is its own
    batch. Without that budget no partition of the rows costs less than the best consecutive one; with it,
    the result is the best consecutive one."""
    n = len(widths)
    if any(widths[i] < widths[i + 1] for i in range(n - 1)):
        raise ValueError("plan_batches takes rows sorted longest first")
    best = [0.0] + [float("inf")] * n  # best[j]: the cheapest split of the first j rows
    start = [0] * (n + 1)
    for j in range(1, n + 1):
        keep = 0
        for i in range(j - 1, max(0, j - max_rows) - 1, -1):  # the run i..j-1, growing to the left
            if keeps is not None and keep_budget is not None:
                keep = max(keep, keeps[i])
                if (j - i) * keep > keep_budget and i < j - 1:
                    break
            cost = best[i] + (j - i) * widths[i] + forward_cost
            if cost <= best[j]:
                best[j], start[j] = cost, i
    runs: list[slice] = []
    j = n
    while j:
        runs.append(slice(start[j], j))
        j = start[j]
    return runs[::-1]

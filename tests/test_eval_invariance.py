"""Answers never depend on batching: batch size, shared-prefix reuse, the mix of subjects in a batch and
padding change nothing, for full-attention and sliding-window models alike.

The reference is one question at a time without a shared prefix (no padding, no cache): every other way of
running the same questions must give the same predictions and log-probs within 1e-4 (float32, CPU).
"""

from __future__ import annotations

import pytest
import torch

from quantbench.eval.harness import evaluate
from quantbench.eval.lm import HFLM, PrefixState, is_windowed

# MMLU subjects whose 5-shot prompts (Gemma 3 tokenizer) are longer than Gemma 3's 512-token sliding
# window, with questions of different lengths, plus one short subject so batches mix both kinds.
LONG_SUBJECTS = ["business_ethics", "elementary_mathematics", "astronomy"]
SHORT_SUBJECTS = ["logical_fallacies"]
SETTINGS = [
    {"batch_size": 16, "prefix_reuse": True},  # the default: subjects mixed, shared prefixes
    {"batch_size": 3, "prefix_reuse": True},
    {"batch_size": 4, "prefix_reuse": False},  # padded batches without a cache
]
REFERENCE = {"batch_size": 1, "prefix_reuse": False}


def _answers(result) -> dict[tuple[str, int], tuple[str | None, list[float] | None, str | None]]:
    return {(a.subject, a.idx): (a.pred, a.logprobs, a.output) for a in result.answers}


def _assert_same(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys()
    for key, (pred, logprobs, output) in want.items():
        assert got[key][0] == pred, f"{what}: {key} predicted {got[key][0]}, one at a time {pred}"
        assert got[key][2] == output, f"{what}: {key} generated {got[key][2]!r}, one at a time {output!r}"
        if logprobs is not None:
            diff = max(abs(x - y) for x, y in zip(got[key][1], logprobs, strict=True))
            assert diff <= 1e-4, f"{what}: {key} log-probs differ by {diff}"


@pytest.fixture(scope="module")
def gemma_fp32():
    import quantbench

    model, tokenizer = quantbench.load_model("gemma3-270m", dtype="fp32")
    return model, tokenizer


def test_gemma3_is_windowed_and_qwen_is_not(gemma_fp32, real_model_fp32):
    assert is_windowed(gemma_fp32[0].config)
    assert not is_windowed(real_model_fp32[0].config)


@pytest.mark.parametrize("model_name", ["gemma", pytest.param("qwen", marks=pytest.mark.slow)])
def test_mmlu_answers_do_not_depend_on_batching(model_name, gemma_fp32, real_model_fp32):
    """Gemma 3 (sliding window 512, BOS) on prompts longer than its window, and Qwen (full attention)."""
    model, tokenizer = gemma_fp32 if model_name == "gemma" else real_model_fp32
    subjects = LONG_SUBJECTS + SHORT_SUBJECTS
    lm = HFLM(model, tokenizer)
    want = _answers(evaluate(model, tokenizer, "mmlu", subjects=subjects, limit=2, lm=lm, **REFERENCE))
    for settings in SETTINGS:
        got = _answers(evaluate(model, tokenizer, "mmlu", subjects=subjects, limit=2, lm=lm, **settings))
        _assert_same(got, want, f"{model_name} {settings}")


def test_generate_answers_do_not_depend_on_batching(gemma_fp32):
    """Greedy generation past the sliding window: batched rows of different lengths generate exactly."""
    model, tokenizer = gemma_fp32
    lm = HFLM(model, tokenizer)
    common = {"subjects": LONG_SUBJECTS[:2], "limit": 2, "mode": "generate", "max_new_tokens": 3, "lm": lm}
    want = _answers(evaluate(model, tokenizer, "mmlu", **common, **REFERENCE))
    got = _answers(evaluate(model, tokenizer, "mmlu", **common, batch_size=8, prefix_reuse=True))
    _assert_same(got, want, "generate")


def _tiny_mistral(window: int):
    """A random 2-layer Mistral (real Qwen tokenizer's vocabulary) whose window is shorter than the rows;
    weights larger than the HF init, so tokens far back matter to the logits."""
    from tinyqwen import real_tokenizer, tiny_model

    tokenizer = real_tokenizer()
    model = tiny_model("mistral-7b", seed=3, spread=0.5, vocab_size=len(tokenizer), sliding_window=window)
    return model, tokenizer


def test_sliding_window_mistral_rows_are_exact():
    model, tokenizer = _tiny_mistral(window=16)
    assert is_windowed(model.config)
    gen = torch.Generator().manual_seed(0)
    prefixes = [torch.randint(100, 5000, (n,), generator=gen).tolist() for n in (21, 9, 30)]
    rows = [torch.randint(100, 5000, (n,), generator=gen).tolist() for n in (3, 25, 11, 1, 17, 8)]
    which = [0, 1, 2, 0, 2, 1]
    choices = [[362], [425], [356], [422]]

    alone = HFLM(model, tokenizer, prefix_reuse=False)
    want = torch.cat(
        [alone.choice_logprobs(PrefixState([prefixes[w]]), [r], choices) for r, w in zip(rows, which, strict=True)]
    )
    want_text = [alone.greedy(PrefixState([prefixes[w]]), [r], 5) for r, w in zip(rows, which, strict=True)]
    for reuse in (True, False):
        lm = HFLM(model, tokenizer, prefix_reuse=reuse)
        state = lm.prefix_state(prefixes)
        got = lm.choice_logprobs(state, rows, choices, which=which)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
        multi = [[362, 425], [356], [422, 425, 362]]  # multi-token continuations: one row per choice
        got_multi = lm.choice_logprobs(state, rows, multi, which=which)
        want_multi = torch.cat(
            [alone.choice_logprobs(PrefixState([prefixes[w]]), [r], multi) for r, w in zip(rows, which, strict=True)]
        )
        torch.testing.assert_close(got_multi, want_multi, rtol=0, atol=1e-4)
        assert lm.greedy(state, rows, 5, which=which) == [t[0] for t in want_text]


def _partitions(items: list[int]):
    """Every partition of ``items`` into non-empty blocks."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in _partitions(rest):
        yield [[first], *part]
        for i in range(len(part)):
            yield [*part[:i], [first, *part[i]], *part[i + 1 :]]


def _consecutive(n: int) -> list[list[list[int]]]:
    """Every split of ``range(n)`` into consecutive runs."""
    splits = []
    for mask in range(2 ** (n - 1)):
        cuts = [0] + [i + 1 for i in range(n - 1) if mask >> i & 1] + [n]
        splits.append([list(range(a, b)) for a, b in zip(cuts, cuts[1:], strict=False)])
    return splits


@pytest.mark.parametrize("seed", range(6))
def test_plan_batches_is_the_cheapest_split(seed):
    """The planned batches cost no more than the best of every partition of the rows (not only consecutive
    runs), each batch computing its rows padded to its longest plus a fixed cost per forward; under a budget
    of kept positions per batch, no more than the best split into consecutive runs that fit it."""
    from quantbench.eval.batching import plan_batches

    gen = torch.Generator().manual_seed(seed)
    widths = sorted(torch.randint(1, 300, (7,), generator=gen).tolist(), reverse=True)
    keeps = torch.randint(1, 5, (7,), generator=gen).tolist()
    everything = list(_partitions(list(range(len(widths)))))
    for max_rows, budget in ((2, None), (3, None), (7, None), (7, 8), (4, 6)):
        for forward_cost in (0.0, 40.0, 500.0):

            def cost(blocks, forward_cost=forward_cost):
                return sum(len(b) * max(widths[i] for i in b) + forward_cost for b in blocks)

            def fits(block, max_rows=max_rows, budget=budget):
                return len(block) <= max_rows and (budget is None or len(block) * max(keeps[i] for i in block) <= budget)

            runs = plan_batches(widths, max_rows, forward_cost, keeps=keeps, keep_budget=budget)
            blocks = [list(range(len(widths)))[r] for r in runs]
            assert sorted(i for b in blocks for i in b) == list(range(len(widths)))
            assert all(len(b) >= 1 and fits(b) for b in blocks)
            # without a logits budget no partition beats consecutive runs; with one, the best consecutive runs
            candidates = everything if budget is None else _consecutive(len(widths))
            best = min(cost(p) for p in candidates if all(fits(b) for b in p))
            assert cost(blocks) == pytest.approx(best), (widths, keeps, max_rows, budget, forward_cost)


def test_plan_batches_takes_rows_longest_first():
    from quantbench.eval.batching import plan_batches

    assert plan_batches([], 4, 10.0) == []
    assert plan_batches([5, 5, 5], 8, 1e9) == [slice(0, 3)]
    with pytest.raises(ValueError, match="longest first"):
        plan_batches([3, 5], 4, 10.0)

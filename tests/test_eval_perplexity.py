"""Sliding-window perplexity against naive computations, and the packaged corpus slices."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import quantbench
from quantbench.eval.corpus import CORPORA, corpus_documents, load_corpus
from quantbench.eval.perplexity import PerplexityError, perplexity, sliding_windows


@pytest.fixture(scope="module")
def tiny():
    model = quantbench.random_model(
        "qwen2.5-0.5b",
        dtype="fp32",
        num_hidden_layers=2,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
    )
    return model


def _naive_nll(model, ids: torch.Tensor, ctx: int) -> tuple[float, int]:
    """Each token t >= 1 scored from the ctx-1 tokens before it, one forward per token, float64 sums."""
    total, count = 0.0, 0
    with torch.no_grad():
        for t in range(1, ids.numel()):
            window = ids[max(0, t - ctx + 1) : t + 1]
            logits = model(window[None]).logits[0, -2].double()
            total -= F.log_softmax(logits, -1)[ids[t]].item()
            count += 1
    return total, count


def test_windows_cover_every_token_once():
    for n, ctx, stride in [(100, 16, 16), (100, 16, 5), (17, 16, 8), (5, 16, 4), (50, 8, 1)]:
        scored = [t for _, e, f in sliding_windows(n, ctx, stride) for t in range(f, e)]
        # Disjoint windows (stride == ctx) cannot score the first token of a window: it has no context.
        skipped = {0} | (set(range(0, n, ctx)) if stride == ctx else set())
        assert scored == [t for t in range(n) if t not in skipped]
        for b, e, f in sliding_windows(n, ctx, stride):
            assert e - b <= ctx and b < f


def test_full_context_equals_single_forward(tiny):
    ids = torch.randint(0, 512, (40,), generator=torch.Generator().manual_seed(0))
    result = perplexity(tiny, None, ids, ctx=64)
    with torch.no_grad():
        logp = F.log_softmax(tiny(ids[None]).logits[0, :-1].double(), -1)
    nll = -logp.gather(-1, ids[1:, None]).mean().item()
    assert result.scored == 39 and result.windows == 1
    assert result.nll == pytest.approx(nll, rel=1e-5)
    assert result.ppl == pytest.approx(math.exp(nll), rel=1e-5)


@pytest.mark.parametrize("stride,batch", [(1, 1), (1, 4), (3, 2)])
def test_stride_one_equals_per_token_naive(tiny, stride, batch):
    ids = torch.randint(0, 512, (30,), generator=torch.Generator().manual_seed(1))
    ctx = 8
    result = perplexity(tiny, None, ids, ctx=ctx, stride=stride, batch_size=batch)
    if stride == 1:
        total, count = _naive_nll(tiny, ids, ctx)
        assert result.scored == count
        assert result.nll == pytest.approx(total / count, rel=1e-5)
    assert result.scored == 29


def test_disjoint_windows_match_manual(tiny):
    ids = torch.randint(0, 512, (25,), generator=torch.Generator().manual_seed(2))
    result = perplexity(tiny, None, ids, ctx=10, stride=10, batch_size=2)
    total, count = 0.0, 0
    with torch.no_grad():
        for b in range(0, 25, 10):
            chunk = ids[b : b + 10]
            logp = F.log_softmax(tiny(chunk[None]).logits[0, :-1].double(), -1)
            total -= logp.gather(-1, chunk[1:, None]).sum().item()
            count += chunk.numel() - 1
    assert result.scored == count == 22
    assert result.nll == pytest.approx(total / count, rel=1e-5)


def test_bad_arguments(tiny):
    with pytest.raises(PerplexityError):
        perplexity(tiny, None, torch.arange(10), ctx=8, stride=9)
    with pytest.raises(PerplexityError):
        perplexity(tiny, None, torch.arange(1), ctx=8)
    with pytest.raises(PerplexityError):
        perplexity(tiny, None, torch.arange(10), ctx=10**9)


def test_corpus_slices_are_disjoint_and_deterministic():
    evals = corpus_documents("kjv", "eval")
    calib = corpus_documents("kjv", "calib")
    assert len(evals) == 118 and len(calib) == 1071
    assert {d.index for d in evals}.isdisjoint({d.index for d in calib})
    assert {d.text for d in evals}.isdisjoint({d.text for d in calib})
    assert evals[0].title == "Genesis 10" and calib[0].title == "Genesis 1"
    assert load_corpus("kjv") == load_corpus("kjv-eval")
    assert load_corpus("kjv-eval", max_chars=100) == load_corpus("kjv-eval")[:100]
    assert set(CORPORA) >= {"kjv", "kjv-eval", "kjv-calib", "kjv-all"}


def test_real_model_short_text_matches_naive():
    model, tokenizer = quantbench.load_model("qwen2.5-coder-0.5b", dtype="fp32")
    text = load_corpus("kjv-eval", max_chars=400)
    ids = tokenizer(text, return_tensors="pt").input_ids[0][:48]
    full = perplexity(model, tokenizer, ids, ctx=64)
    with torch.no_grad():
        logp = F.log_softmax(model(ids[None]).logits[0, :-1].double(), -1)
    nll = -logp.gather(-1, ids[1:, None]).mean().item()
    assert full.nll == pytest.approx(nll, rel=1e-4)
    strided = perplexity(model, tokenizer, ids, ctx=32, stride=16, batch_size=2)
    assert strided.scored == 47
    assert 1.0 < full.ppl < 100.0 and 1.0 < strided.ppl < 100.0

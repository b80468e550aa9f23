"""Sliding-window perplexity against naive computations, and the packaged corpus slices."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import quantbench
from quantbench.corpus import CORPORA, corpus_documents, load_corpus
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


# ---------------------------------------------------------------------------------------------------------
# KL divergence against a stored reference (llama.cpp --kl-divergence statistics)


def _llama_cpp_stats(nll, nll_base, kld, p_diff, same_top):
    """llama.cpp tools/perplexity/perplexity.cpp kl_divergence()'s final statistics, transcribed to plain
    Python floats (running sums, mean_and_uncertainty, covariance, percentile)."""
    n = len(nll)

    def mean_unc(values):
        s, s2 = sum(values), sum(v * v for v in values)
        f = s / n
        df = s2 / n - f * f
        return f, (math.sqrt(df / (n - 1)) if df > 0 and n > 10 else 0.0)

    def percentile(values, fraction):
        v = sorted(values)
        p = fraction * (len(v) - 1)
        ip = int(p)
        p -= ip
        return (1 - p) * v[ip] + p * v[min(ip + 1, len(v) - 1)]

    log_ppl, log_ppl_unc = mean_unc(nll)
    log_base, log_base_unc = mean_unc(nll_base)
    cov = (sum(a * b for a, b in zip(nll, nll_base, strict=True)) / n - log_ppl * log_base) / (n - 1)
    ratio_unc = math.sqrt(log_ppl_unc**2 + log_base_unc**2 - 2 * cov)
    kld_mean, kld_unc = mean_unc(kld)
    mse, mse_unc = mean_unc([d * d for d in p_diff])
    rms = math.sqrt(mse)
    top = sum(same_top) / n
    srt = sorted(kld)
    median = 0.5 * (srt[n // 2] + srt[n // 2 - 1]) if n % 2 == 0 else srt[n // 2]
    return {
        "ppl": math.exp(log_ppl),
        "ppl_ref": math.exp(log_base),
        "ppl_ratio": math.exp(log_ppl - log_base),
        "ppl_ratio_unc": math.exp(log_ppl - log_base) * ratio_unc,
        "kld_mean": kld_mean,
        "kld_mean_unc": kld_unc,
        "kld_median": median,
        "kld_p95": percentile(kld, 0.95),
        "kld_p99": percentile(kld, 0.99),
        "kld_max": srt[-1],
        "dp_mean": sum(p_diff) / n,
        "rms_dp": rms,
        "rms_dp_unc": 0.5 / rms * mse_unc,
        "same_top": top,
        "same_top_unc": math.sqrt(top * (1 - top) / (n - 1)),
    }


@pytest.mark.parametrize("n", [201, 200])
def test_kld_summary_matches_llama_cpp(n):
    from quantbench.eval.perplexity import kld_summary

    g = torch.Generator().manual_seed(n)
    nll_base = (torch.rand(n, generator=g, dtype=torch.float64) * 5).tolist()
    nll = [x + 0.3 * float(torch.randn(1, generator=g, dtype=torch.float64)) for x in nll_base]
    kld = (torch.rand(n, generator=g, dtype=torch.float64) ** 3).tolist()
    p_diff = (torch.randn(n, generator=g, dtype=torch.float64) * 0.05).tolist()
    same = [bool(x) for x in (torch.rand(n, generator=g) < 0.8).tolist()]
    got = kld_summary(*(np.array(x) for x in (nll, nll_base, kld, p_diff, same)))
    expected = _llama_cpp_stats(nll, nll_base, kld, p_diff, same)
    for name, value in expected.items():
        assert getattr(got, name) == pytest.approx(value, rel=1e-9, abs=1e-12), name
    assert got.tokens == n


def _full_logprobs(model, ids, ctx, stride):
    """Every scored token's full next-token log-probabilities (float64), window by window as perplexity()
    scores them."""
    rows = []
    with torch.no_grad():
        for b, e, f in sliding_windows(ids.numel(), ctx, stride):
            logits = model(ids[b:e][None]).logits[0, f - b - 1 : e - b - 1]
            rows.append(F.log_softmax(logits.double(), -1))
    return torch.cat(rows)


def _exact(P, Q, targets):
    """Exact full-vocabulary per-token KLD(P || Q), Δp and same-top (float64)."""
    kld = (P.exp() * (P - Q)).sum(-1)
    p_true, q_true = P.gather(-1, targets[:, None])[:, 0], Q.gather(-1, targets[:, None])[:, 0]
    return kld, q_true.exp() - p_true.exp(), P.argmax(-1) == Q.argmax(-1), -q_true, -p_true


def test_kld_tiny_model_exact_when_top_k_covers_the_vocabulary(tiny, tmp_path):
    from quantbench.eval.perplexity import LogitReference, kld_summary

    ids = torch.randint(0, 512, (70,), generator=torch.Generator().manual_seed(0))
    ref = perplexity(tiny, None, ids, ctx=32, stride=16, record_topk=512).logits_reference
    other = quantbench.random_model(
        "qwen2.5-0.5b", dtype="fp32", num_hidden_layers=2, hidden_size=64, intermediate_size=128,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=512, seed=1,
    )  # fmt: skip
    P, Q = _full_logprobs(tiny, ids, 32, 16), _full_logprobs(other, ids, 32, 16)
    targets = torch.cat([ids[f:e] for _, e, f in sliding_windows(70, 32, 16)])
    kld, dp, same, nll, nll_ref = _exact(P, Q, targets)
    expected = kld_summary(nll.numpy(), nll_ref.numpy(), kld.numpy(), dp.numpy(), same.numpy())
    # k = vocabulary: nothing is approximated (the reference is stored in float32).
    got = perplexity(other, None, ids, ctx=32, stride=16, reference=ref).kld
    for name in ("ppl", "ppl_ref", "kld_mean", "kld_median", "kld_p95", "kld_p99", "rms_dp", "same_top"):
        assert getattr(got, name) == pytest.approx(getattr(expected, name), rel=1e-5, abs=1e-7), name
    # Saved and read back: the same arrays, the same statistics.
    path = ref.save(tmp_path / "ref.npz")
    back = LogitReference.load(path)
    assert np.array_equal(back.tail_ids, ref.tail_ids) and (back.ctx, back.stride, back.k) == (32, 16, 512)
    assert perplexity(other, None, ids, ctx=32, stride=16, reference=back).kld == got
    # Other windows than the reference's: refused.
    with pytest.raises(PerplexityError, match="other tokens or windows"):
        perplexity(other, None, ids, ctx=32, stride=8, reference=ref)


def test_kld_real_model_against_itself_and_int4():
    """Qwen2.5-Coder-0.5B, 300 tokens, ctx 128: the reference against itself gives KLD 0 and 100 % same top;
    int4 gives a positive KLD whose top-32 + 64 tail-sample estimate agrees with the exact full-vocabulary
    KLD: mean within 3 %, median / 95th percentile within 10 % (measured: 0.7 %, 4 %, 7 %)."""
    from quantbench.eval.perplexity import kld_summary

    torch.set_num_threads(1)
    model, tokenizer = quantbench.load_model("qwen2.5-coder-0.5b", dtype="fp32")
    ids = tokenizer(load_corpus("kjv-eval", max_chars=3000), return_tensors="pt").input_ids[0][:300]
    run = perplexity(model, tokenizer, ids, ctx=128, stride=64, record_topk=32)
    ref = run.logits_reference
    assert ref.top_ids.shape == (299, 32) and ref.tail_ids.shape == (299, 64)
    same = perplexity(model, tokenizer, ids, ctx=128, stride=64, reference=ref)
    assert same.kld.kld_mean == pytest.approx(0.0, abs=1e-6) and same.kld.kld_max < 1e-6
    assert same.kld.same_top == 1.0 and same.kld.ppl_ratio == 1.0 and same.kld.rms_dp == 0.0
    P = _full_logprobs(model, ids, 128, 64)
    quantbench.quantize(model, "int4")
    Q = _full_logprobs(model, ids, 128, 64)
    got = perplexity(model, tokenizer, ids, ctx=128, stride=64, reference=ref).kld
    kld, dp, top, nll, nll_ref = _exact(P, Q, ids[1:])
    exact = kld_summary(nll.numpy(), nll_ref.numpy(), kld.numpy(), dp.numpy(), top.numpy())
    assert got.kld_mean > 0.01
    assert got.kld_mean == pytest.approx(exact.kld_mean, rel=0.03)
    assert got.kld_median == pytest.approx(exact.kld_median, rel=0.10)
    assert got.kld_p95 == pytest.approx(exact.kld_p95, rel=0.10)
    # What does not depend on the top-k approximation is exact.
    for name in ("ppl", "ppl_ref", "ppl_ratio", "rms_dp", "same_top"):
        assert getattr(got, name) == pytest.approx(getattr(exact, name), rel=1e-4), name
    assert got.ppl == pytest.approx(perplexity(model, tokenizer, ids, ctx=128, stride=64).ppl, rel=1e-9)

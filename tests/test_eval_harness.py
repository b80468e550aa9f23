"""The evaluation harness on the real model (Qwen2.5-Coder-0.5B): prefix reuse, batching / left padding,
generate vs loglikelihood, prompts longer than the context."""

from __future__ import annotations

import pytest
import torch

import quantbench
from quantbench.eval.harness import _plan, evaluate
from quantbench.eval.lm import HFLM
from quantbench.eval.loading import configure_threads
from quantbench.eval.tasks import LETTERS, get_task


@pytest.fixture(scope="module")
def fp32_model():
    configure_threads(0)
    model, tokenizer = quantbench.load_model("qwen2.5-coder-0.5b", dtype="fp32")
    quantbench.quantize(model, "fp32")
    return model, tokenizer


def _margins(result):
    """Per question: log-prob of the best choice minus the runner-up."""
    out = []
    for a in result.answers:
        top = sorted(a.logprobs, reverse=True)
        out.append(top[0] - top[1])
    return out


def test_prefix_reuse_and_left_padding_change_no_answer(fp32_model):
    model, tokenizer = fp32_model
    task = get_task("mmlu")
    subjects = ["management", "world_religions"]
    common = dict(subjects=subjects, limit=2, shots=5)
    runs = {}
    # reuse-b8: both subjects' prefixes in one left-padded forward, then one batch mixing both subjects.
    for name, reuse, batch in [("reuse-b8", True, 8), ("reuse-b1", True, 1), ("full-b4", False, 4)]:
        lm = HFLM(model, tokenizer)
        runs[name] = (
            evaluate(model, tokenizer, "mmlu", batch_size=batch, prefix_reuse=reuse, lm=lm, **common),
            lm,
        )
    base, base_lm = runs["reuse-b8"]
    lengths = {
        subject: [
            len(p.suffix_ids) for p in _plan(task, subject, task.load(subject, "val")[:2], 5, base_lm, 0)[0]
        ]
        for subject in subjects
    }
    prefixes = {len(task_prefix) for task_prefix in (base_lm.encode(task.prefix(s, 5)) for s in subjects)}
    assert len({n for v in lengths.values() for n in v}) > 1 and len(prefixes) == 2, "padding must be needed"
    for name, (result, _lm) in runs.items():
        assert [a.pred for a in result.answers] == [a.pred for a in base.answers], name
        for a, b in zip(result.answers, base.answers, strict=True):
            assert a.logprobs == pytest.approx(b.logprobs, abs=2e-4), name
        assert _margins(result) == pytest.approx(_margins(base), abs=2e-4)
    # Reuse feeds each prefix once instead of once per question.
    assert runs["full-b4"][1].tokens > base_lm.tokens + 200
    assert base_lm.calls == 2 and runs["reuse-b1"][1].calls == 2 + 4


@pytest.mark.slow
def test_multi_token_path_and_lm_eval_style_api_agree(fp32_model):
    model, tokenizer = fp32_model
    task = get_task("mmlu")
    questions = task.load("world_religions", "val")[:2]
    lm = HFLM(model, tokenizer, prefix_reuse=True)
    prefix = task.prefix("world_religions", 0)
    prefix_ids = lm.encode(prefix)
    state = lm.prefix_state(prefix_ids)
    suffixes = [lm.encode(prefix + task.format_question(q, False))[len(prefix_ids) :] for q in questions]
    choices = [lm.continuation_ids("Answer:", f" {c}") for c in LETTERS]
    assert all(len(c) == 1 for c in choices)
    fast = lm.choice_logprobs(state, suffixes, choices)
    slow = lm.choice_logprobs(state, suffixes, choices, single_token_fast_path=False)
    torch.testing.assert_close(fast, slow, atol=2e-4, rtol=0)
    requests = [(prefix + task.format_question(q, False), f" {c}") for q in questions for c in LETTERS]
    plain = torch.tensor([lp for lp, _ in lm.loglikelihood(requests)]).reshape(2, 4)
    torch.testing.assert_close(fast, plain, atol=2e-4, rtol=0)


def test_prompts_longer_than_the_context_drop_shots_and_never_truncate(fp32_model):
    model, tokenizer = fp32_model
    task = get_task("mmlu")
    questions = task.load("virology", "val")
    lm = HFLM(model, tokenizer, max_length=160)
    planned, too_long = _plan(task, "virology", questions, 5, lm, 0)
    assert too_long and planned
    assert {p.shots_used for p in planned} != {5}
    for p in planned:
        prompt = task.prefix("virology", p.shots_used) + task.format_question(p.question, False)
        assert p.prefix_ids + p.suffix_ids == lm.encode(prompt)  # the whole prompt, nothing cut
        assert len(p.prefix_ids) + len(p.suffix_ids) <= 160
        if p.shots_used < 5:  # one more shot would not have fit
            longer = task.prefix("virology", p.shots_used + 1) + task.format_question(p.question, False)
            assert len(lm.encode(longer)) > 160
    for q in too_long:
        assert len(lm.encode(task.format_question(q, False))) + len(lm.encode(task.header("virology"))) > 160
    result = evaluate(model, tokenizer, "mmlu", subjects=["virology"], limit=6, max_length=160, batch_size=6)
    assert result.reduced_shots > 0 and result.questions + result.skipped == 6
    assert result.subjects[0].reduced_shots == result.reduced_shots


def test_generate_agrees_with_loglikelihood_bf16(fp32_model):
    model, tokenizer = fp32_model
    bf16 = quantbench.quantize(model, "bf16")  # last test of the module: fp32 is not needed any more
    common = dict(subjects=["management", "world_religions"], limit=10, batch_size=10)
    lm = HFLM(bf16, tokenizer)
    ll = evaluate(bf16, tokenizer, "mmlu", mode="loglikelihood", lm=lm, **common)
    assert lm._fp32_head is True  # bf16 logits recomputed in float32 (checked against the model's own)
    gen = evaluate(bf16, tokenizer, "mmlu", mode="generate", lm=HFLM(bf16, tokenizer), **common)
    assert ll.questions == gen.questions == 20
    same = sum(a.pred == b.pred for a, b in zip(ll.answers, gen.answers, strict=True))
    assert same / 20 >= 0.95, [(a.pred, b.output) for a, b in zip(ll.answers, gen.answers, strict=True)]
    assert all(
        b.output is not None and a.logprobs is not None for a, b in zip(ll.answers, gen.answers, strict=True)
    )
    assert ll.accuracy > 0.25  # better than chance on these easy subjects


@pytest.mark.parametrize("name", ["qwen2.5-coder-0.5b", "gemma3-270m"])
def test_prompts_encoded_together_equal_prompts_encoded_alone(name):
    """The planner encodes a subject's prompts in one tokenizer call: the ids are those of one call per
    prompt (Gemma's BOS included, Qwen without one)."""
    from transformers import AutoTokenizer

    from quantbench.models import resolve_model_dir

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(name), local_files_only=True)
    task = get_task("mmlu")
    questions = task.load("virology", "val")[:6]
    texts = [task.prefix("virology", 5) + task.format_question(q, False) for q in questions] + ["", "A"]
    lm = HFLM.__new__(HFLM)  # only the tokenizer is used
    lm.tokenizer = tokenizer
    assert lm.encode_many(texts) == [lm.encode(t) for t in texts]
    assert (lm.encode_many(texts)[0][0] == tokenizer.bos_token_id) == (name == "gemma3-270m")

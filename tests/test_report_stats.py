"""Statistic columns of the report and of ``quantbench run``, the interval-based recommendation, labels that do
not overlap, and ``quantbench ppl --kld-reference`` (numbers checked against hand computations)."""

from __future__ import annotations

import csv
import json
import math
from types import SimpleNamespace

import pytest

import quantbench
from quantbench.eval.store import EvalKey, QuestionResult, ResultStore

INT8 = "int8:bits=8,compute=bf16,group=-1,skip=lm_head,sym=1"
NF4 = "nf4:block=64,compute=bf16,dq=1,skip=lm_head"
GIB = {"bf16": 0.92, INT8: 0.62, NF4: 0.43}


def _answers(n_per_subject: int, wrong: dict[str, set[int]]) -> dict[str, list[QuestionResult]]:
    """Questions 0..2n-1 over subjects a / b (global index g = subject * n + idx); the gold answer is A, a
    spec answers B on the indices of ``wrong[spec]``; log-probabilities favour the predicted letter."""
    out = {}
    for spec, bad in wrong.items():
        rows = []
        for g in range(2 * n_per_subject):
            pred = "B" if g in bad else "A"
            lp = [-0.2, -2.5, -3.0, -3.5] if pred == "A" else [-2.5, -0.2, -3.0, -3.5]
            subject = "ab"[g // n_per_subject]
            rows.append(QuestionResult(subject, g % n_per_subject, "STEM", "A", pred, 5, lp))
        out[spec] = rows
    return out


def _db(tmp_path, n_per_subject: int, wrong: dict[str, set[int]]):
    from quantbench.quant import METHODS, parse_spec

    db = tmp_path / "stats.db"
    answers = _answers(n_per_subject, wrong)
    with ResultStore(db) as store:
        for spec, rows in answers.items():
            store.add_results(EvalKey("f", spec, "mmlu", "val", 5, "loglikelihood"), rows)
            # A question of another subject and one past the limit: stored, not part of the run.
            store.add_results(
                EvalKey("f", spec, "mmlu", "val", 5, "loglikelihood"),
                [
                    QuestionResult("c", 0, "STEM", "A", "B", 5),
                    QuestionResult("a", n_per_subject, "STEM", "A", "B", 5),
                ],
            )
            config = parse_spec(spec)
            correct = sum(r.correct for r in rows)
            store.add_run(
                model="m", fingerprint="f", spec=spec, method=config.method, task="mmlu", split="val", shots=5,
                mode="loglikelihood", subjects=["a", "b"], limit_per_subject=n_per_subject, questions=len(rows),
                evaluated=len(rows), accuracy=correct / len(rows), categories={"STEM": correct / len(rows)},
                compute_s=1.0, weights_gib=GIB[spec],
                extra={"table_fields": METHODS[config.method].table_fields(config)},
            )  # fmt: skip
    return db, answers


def _wilson(k, n, z=1.959963984540054):
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def test_report_stats_table_and_interval_recommendation(tmp_path):
    from quantbench.report.data import collect
    from quantbench.report.render import write_report

    n = 300  # 600 questions; bf16 right on 0..359
    base_wrong = set(range(360, 600))
    wrong = {
        "bf16": base_wrong,
        INT8: (base_wrong - {360, 361}) | {0, 1, 2},  # 3 right->wrong, 2 wrong->right
        NF4: (base_wrong - {362}) | set(range(10, 50)),  # 40 right->wrong, 1 wrong->right
    }
    db, _ = _db(tmp_path, n, wrong)
    written = write_report(collect(db), tmp_path / "out", ["md", "csv"], plots=False)
    md = (tmp_path / "out" / "report.md").read_text()
    assert "### Statistics against bf16" in md
    lo, hi = _wilson(360, 600)
    assert f"| bf16 | bf16 | - | - | 60.0 [{100 * lo:.1f}, {100 * hi:.1f}] | reference |" in md
    # int8: 359 / 600 right, -1 / 600 = -0.2 points, 3 down / 2 up, agreement 595 / 600.
    int8 = next(line for line in md.splitlines() if line.startswith("| int8 |") and "[" in line)
    assert "| -0.2 [" in int8 and "| 3/2 | 99.2 [" in int8 and "indistinguishable from bf16" in int8
    nf4 = next(line for line in md.splitlines() if line.startswith("| nf4 |") and "[" in line)
    assert "| 40/1 |" in nf4 and "| <0.001 |" in nf4 and "worse by 6.5 ± " in nf4
    # KLD: the flipped questions' answer distributions swap the top two letters, the others are identical.
    p = [math.exp(x) for x in (-0.2, -2.5, -3.0, -3.5)]
    p = [x / sum(p) for x in p]
    q = [p[1], p[0], p[2], p[3]]
    kl_swap = sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))
    assert f"| {5 * kl_swap / 600:.4f} |" in int8 and f"| {41 * kl_swap / 600:.4f} |" in nf4
    # McNemar for int8: 2 * P(X <= 2), X ~ Bin(5, 1/2).
    p_int8 = 2 * sum(math.comb(5, i) for i in range(3)) / 32
    stats_csv = next(p for p in written if p.name.startswith("stats-"))
    by_spec = {row["spec"]: row for row in csv.DictReader(stats_csv.open())}
    assert float(by_spec[INT8]["p McNemar"]) == pytest.approx(min(1.0, p_int8))
    assert float(by_spec[INT8]["Diff pts"]) == pytest.approx(-100 / 600, abs=1e-4)
    assert int(by_spec[NF4]["Flips down"]) == 40 and int(by_spec[INT8]["Paired"]) == 600
    # nf4 is smaller but shown worse; int8's interval lies within 1 point of bf16.
    assert f"Smallest within 1 point of bf16: **{INT8}** (0.620 GiB, 59.8%; lower 95% bound" in md


def test_recommendation_with_too_few_questions_says_so(tmp_path):
    from quantbench.report.data import collect
    from quantbench.report.render import recommendation

    wrong = {"bf16": {5, 6, 7, 8}, INT8: {5, 6, 7, 8}, NF4: {0, 5, 6, 7, 8}}  # 20 questions
    db, _ = _db(tmp_path, 10, wrong)
    notes = recommendation(collect(db).models[0])
    # int8 agrees on every question, but 20 questions cannot show it within 1 point (no flip in 20 still
    # allows about ±9 points), and neither can nf4's: nothing is shown within 1 point, and the report says so.
    assert not any("lower 95% bound" in n for n in notes)
    assert any("evaluate more questions" in n for n in notes)
    wrong = {"bf16": {5, 6, 7, 8}, NF4: {0, 5, 6, 7, 8}}
    (tmp_path / "second").mkdir()
    db2, _ = _db(tmp_path / "second", 10, wrong)
    notes = recommendation(collect(db2).models[0])
    assert any(f"**{NF4}**" in n and "evaluate more questions" in n for n in notes)


def test_labels_at_one_point_do_not_overlap():
    from quantbench.report.plots import _pyplot, place_labels

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    xs, ys = [1.0] * 5 + [2.0], [50.0] * 5 + [40.0]
    labels = ["bf16", "int8 ch", "nf4 g64 dq", "int4 g128", "fp8 e4m3", "fp4 g64"]
    ax.scatter(xs, ys)
    ax.set_xlim(0, 3)
    ax.set_ylim(30, 60)
    anns = place_labels(ax, xs, ys, labels)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = [a.get_window_extent(renderer) for a in anns]
    for i in range(len(boxes)):
        for j in range(i):
            a, b = boxes[i], boxes[j]
            assert a.x1 <= b.x0 or b.x1 <= a.x0 or a.y1 <= b.y0 or b.y1 <= a.y0, (labels[i], labels[j])
    assert [a.xy for a in anns] == list(zip(xs, ys, strict=True))  # each label points at its own point
    plt.close(fig)


def test_scatter_draws_error_bars():
    from quantbench.report import plots

    seen = {}
    real = plots._png

    def keep(fig):
        seen["segments"] = [c for c in fig.axes[0].collections if c.__class__.__name__ == "LineCollection"]
        return real(fig)

    plots._png = keep
    try:
        png = plots.scatter(
            [1.0, 2.0], [50.0, 40.0], ["a", "b"], "x", "y", "t", intervals=[(45, 55), (30, 48)]
        )
    finally:
        plots._png = real
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    segs = [s for c in seen["segments"] for s in c.get_segments()]
    assert any(s[0][1] == pytest.approx(45) and s[1][1] == pytest.approx(55) for s in segs)


def test_run_stat_rows():
    from quantbench.report.compare import STAT_COLUMNS, run_stat_rows

    answers = _answers(20, {"bf16": {1, 2}, "int4": {1, 3, 4, 5}})

    def run(spec, rows):
        return SimpleNamespace(spec=spec, results=[SimpleNamespace(task="mmlu", answers=rows)])

    rows = run_stat_rows([run("bf16", answers["bf16"]), run("int4", answers["int4"]), run("x", [])], "mmlu")
    assert all(len(r) == len(STAT_COLUMNS) for r in rows)
    assert rows[0][1] == "reference" and rows[1][2] == "3/1" and rows[2][-1] == "no per-question results"
    lo, hi = _wilson(36, 40)
    assert rows[1][0] == f"90.0 [{100 * lo:.1f}, {100 * hi:.1f}]"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from transformers import AutoTokenizer

    from quantbench.models import resolve_model_dir

    path = tmp_path_factory.mktemp("tiny-kld-model")
    model = quantbench.random_model(
        "qwen2.5-0.5b", dtype="fp32", num_hidden_layers=2, hidden_size=64, intermediate_size=128,
        num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(str(resolve_model_dir("qwen2.5-coder-0.5b"))).save_pretrained(path)
    return path


def test_ppl_kld_reference_command(tiny_dir, tmp_path, capsys):
    from quantbench.cli import main

    text = tmp_path / "t.txt"
    text.write_text("In the beginning God created the heaven and the earth. " * 12)
    db = tmp_path / "sub" / "q.db"
    base = ["ppl", str(tiny_dir), "--text", str(text), "--ctx", "32", "--device", "cpu", "--db", str(db)]

    def ppl(*extra):
        out_json = tmp_path / "p.json"
        with pytest.raises(SystemExit) as info:
            main([*base, *extra, "--json", str(out_json)])
            raise SystemExit(0)
        assert info.value.code == 0
        return json.loads(out_json.read_text()), capsys.readouterr().out

    same, out = ppl("--kld-reference", "bf16")  # the reference pass runs first, then bf16 against it
    files = list((tmp_path / "sub" / "quantbench-logits").glob("*.npz"))
    assert len(files) == 1 and "log-probs saved" in out and "same top 100.00" in out
    assert same["kld"]["kld_mean"] == pytest.approx(0.0, abs=1e-6) and same["kld"]["ppl_ratio"] == 1.0
    int8, out = ppl("--method", "int8", "--kld-reference", "bf16")  # one pass: the stored reference is read
    assert f"KLD reference (bf16): {files[0]}" in out.replace("\n", "")
    assert int8["kld"]["kld_mean"] > 0 and int8["kld_reference"] == "bf16"
    assert int8["kld"]["ppl_ref"] == pytest.approx(same["kld"]["ppl"], rel=1e-6)

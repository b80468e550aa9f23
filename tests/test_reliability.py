"""Issue 23: a new user's and a hostile client's inputs. Every bad input ends in one ``error:`` line (after the
usage line for usage errors) and a non-zero exit, is caught before any expensive work, and never loses a
user's files; training checkpoints never unpickle; the manifest is schema-checked (fuzzed).

The commands run in-process through :func:`quantbench.cli.main` (what the ``quantbench`` script calls), on the
2-layer Qwen-architecture model of ``conftest.tiny_hf_base``.
"""

from __future__ import annotations

import copy
import json
import random
import re
import shutil
from pathlib import Path

import pytest
import torch

import quantbench
from quantbench.checkpoint import MANIFEST_NAME, WEIGHTS_NAME, CheckpointError

ROOT = Path(__file__).resolve().parents[1]


def cli(capsys, *args: str) -> tuple[int, str, str]:
    from quantbench.cli import main

    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


def _lines(err: str) -> list[str]:
    """stderr lines, without progress bars (transformers' "Loading weights" tqdm redraws with \r)."""
    lines = [line.rsplit("\r", 1)[-1] for line in err.splitlines()]
    return [line for line in lines if line.strip() and not re.search(r"\d+/\d+ \[", line)]


def assert_one_line_error(code: int, err: str, needle: str = "", usage: bool = False) -> None:
    lines = _lines(err)
    assert code == 2, (code, err)
    assert "Traceback" not in err
    assert len(lines) == (2 if usage else 1), err
    if usage:
        assert lines[0].startswith("Usage: "), err
    assert lines[-1].startswith("error: "), err
    assert needle in lines[-1], err


@pytest.fixture
def no_loading(monkeypatch):
    """Any model load fails the test: the command had to stop before it."""

    def refuse(*_args, **_kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    import quantbench.eval.loading as loading
    import quantbench.models as models

    monkeypatch.setattr(quantbench, "load_model", refuse)
    monkeypatch.setattr(models, "load_model", refuse)
    monkeypatch.setattr(loading, "load_for_eval", refuse)


@pytest.fixture(scope="module")
def tiny_ckpt(tiny_hf_base, tmp_path_factory) -> Path:
    """An int8 checkpoint of the tiny model, with its tokenizer (do not modify: copy it)."""
    out = tmp_path_factory.mktemp("ckpt") / "int8"
    model, tokenizer = quantbench.load_model(str(tiny_hf_base), dtype="fp32")
    quantbench.quantize(model, "int8")
    return quantbench.save_quantized(model, tokenizer, out)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------------------------------------------------
# Data loss and code execution


def test_quantize_never_overwrites_its_source_model(capsys, tiny_hf_base, tmp_path):
    model_dir = _copy(tiny_hf_base, tmp_path / "model")
    before = (model_dir / "model.safetensors").read_bytes()
    code, _, err = cli(capsys, "quantize", model_dir, "--method", "int8", "--out", model_dir)
    assert_one_line_error(code, err, "which this command reads")
    code, _, err = cli(capsys, "quantize", model_dir, "--method", "int8", "--out", model_dir, "--overwrite")
    assert_one_line_error(code, err, "which this command reads")
    assert (model_dir / "model.safetensors").read_bytes() == before
    assert not (model_dir / MANIFEST_NAME).exists()


def test_quantize_refuses_unrelated_non_empty_dir_and_files(capsys, tiny_hf_base, tmp_path, no_loading):
    other = tmp_path / "thesis"
    other.mkdir()
    (other / "chapter1.tex").write_text("years of work")
    for extra in ([], ["--overwrite"]):
        code, _, err = cli(capsys, "quantize", tiny_hf_base, "-m", "int8", "--out", other, *extra)
        assert_one_line_error(code, err, "not a quantbench checkpoint")
    assert (other / "chapter1.tex").read_text() == "years of work"
    a_file = tmp_path / "out.bin"
    a_file.write_text("x")
    code, _, err = cli(capsys, "quantize", tiny_hf_base, "-m", "int8", "--out", a_file)
    assert_one_line_error(code, err, "is not a directory")  # at once, not after the work
    code, _, err = cli(capsys, "quantize", tiny_hf_base, "-m", "int8", "--out", a_file / "sub")
    assert_one_line_error(code, err, "not a directory")


def test_quantize_replaces_a_checkpoint_only_with_overwrite(capsys, tiny_hf_base, tiny_ckpt, tmp_path):
    out = _copy(tiny_ckpt, tmp_path / "ckpt")
    code, _, err = cli(capsys, "quantize", tiny_hf_base, "-m", "int4:group=32", "--out", out)
    assert_one_line_error(code, err, "pass --overwrite")
    assert quantbench.checkpoint.read_manifest(out)["quantization"]["method"] == "int8"
    # a checkpoint may not be written over itself, even with --overwrite
    code, _, err = cli(capsys, "quantize", out, "-m", "int8", "--out", out, "--overwrite")
    assert_one_line_error(code, err, "which this command reads")
    code, _, err = cli(capsys, "quantize", tiny_hf_base, "-m", "int4:group=32", "--out", out, "--overwrite")
    assert code == 0, err
    assert quantbench.checkpoint.read_manifest(out)["quantization"]["method"] == "int4"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary directories left behind


def test_a_crash_while_saving_leaves_the_old_checkpoint(monkeypatch, tiny_ckpt, tiny_model, tmp_path):
    import quantbench.checkpoint as ckpt_mod

    out = _copy(tiny_ckpt, tmp_path / "ckpt")
    manifest_before = (out / MANIFEST_NAME).read_text()
    quantbench.quantize(tiny_model, "int4")

    def crash(_model, path):
        Path(path).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt_mod, "_save_weights", crash)
    with pytest.raises(KeyboardInterrupt):
        quantbench.save_quantized(tiny_model, None, out, overwrite=True)
    assert (out / MANIFEST_NAME).read_text() == manifest_before
    ckpt_mod.verify_files(out)  # the old weights, whole
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


class _Payload:
    """Unpickling this creates a marker file: the proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_resuming_never_unpickles_the_trainer_state(tiny_model, tmp_path):
    pytest.importorskip("peft")
    from quantbench.train import qlora
    from quantbench.train.data import Example

    quantbench.quantize(tiny_model, "int8")
    model = qlora.attach_lora(tiny_model, r=2, alpha=4, dropout=0.0, targets="q,v")
    examples = [Example(input_ids=list(range(1, 9)), labels=list(range(1, 9)))] * 2
    settings = qlora.TrainSettings(steps=2, batch_size=1, save_every=1, gradient_checkpointing=False)
    out = tmp_path / "ft"
    crafted = out / "checkpoints" / "step-1"
    crafted.mkdir(parents=True)
    marker = tmp_path / "pwned"
    torch.save({"step": 1, "x": _Payload(marker)}, crafted / "trainer_state.pt")
    with pytest.raises(qlora.FinetuneError, match="cannot resume"):
        qlora.train_lora(model, examples, settings, out, progress=False)
    assert not marker.exists()
    # Checkpoints written now are safetensors + JSON, and resuming from them works.
    shutil.rmtree(out)
    qlora.train_lora(model, examples, settings, out, progress=False)
    step = out / "checkpoints" / "step-1"
    assert sorted(p.name for p in step.iterdir() if p.name.startswith("trainer_state")) == [
        "trainer_state.json",
        "trainer_state.safetensors",
    ]
    state = qlora.load_trainer_state(step)
    assert state["step"] == 1 and isinstance(state["optimizer"]["state"], dict)
    record = qlora.train_lora(model, examples, settings, out, progress=False)
    assert record.resumed_from == 1 and record.steps_done == 2


def test_finetune_names_the_train_extra_when_peft_is_missing(capsys, monkeypatch, tiny_hf_base, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "peft", None)  # find_spec("peft") -> None: not installed
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    code, _, err = cli(capsys, "finetune", tiny_hf_base, "--data", data, "--out", tmp_path / "ft")
    assert_one_line_error(code, err, "pip install 'quantbench[train]'")


def test_train_extra_is_declared_and_installed_by_the_readme():
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(dep.startswith("peft") for dep in extras["train"])
    for path in (ROOT / "README.md", ROOT / ".ci" / "run"):
        assert ".[data,dev,peers,serve,report,train]" in path.read_text(), path


# ---------------------------------------------------------------------------------------------------------
# Usage errors: the usage line + one error line, exit 2, for every command


def _commands() -> list[str]:
    from quantbench.cli import app

    return sorted(c.name or c.callback.__name__ for c in app.registered_commands)


@pytest.mark.parametrize("command", _commands())
def test_unknown_option_is_a_usage_error_for_every_command(capsys, command):
    code, _, err = cli(capsys, command, "--bogus-option")
    assert_one_line_error(code, err, "No such option: --bogus-option", usage=True)


@pytest.mark.parametrize(
    "args",
    [
        ["eval", "--method-x"],
        ["run", "--bogus"],
        ["eval", "--shots", "many"],
        ["quantize"],
        ["nosuchcommand"],
    ],
)
def test_usage_errors_are_two_lines(capsys, args):
    code, _, err = cli(capsys, *args)
    assert_one_line_error(code, err, usage=True)


# ---------------------------------------------------------------------------------------------------------
# Bad files and values


def _write_manifest(ckpt: Path, manifest) -> None:
    (ckpt / MANIFEST_NAME).write_text(manifest if isinstance(manifest, str) else json.dumps(manifest))


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda m: m.update(report="x"), "field 'report' must be an object"),
        (lambda m: m.update(files=[]), "field 'files' must be an object"),
        (lambda m: m["files"][WEIGHTS_NAME].pop("size"), "field 'files.model.safetensors' is missing 'size'"),
        (lambda m: m["files"].update({"../../etc/passwd": m["files"][WEIGHTS_NAME]}), "bad name"),
        (lambda m: m.update(version=99), "field 'version' must be <= 1"),
        (lambda m: m["quantization"].update(options={"group": "many"}), "field 'quantization'"),
    ],
)
def test_manifest_of_the_wrong_shape_is_one_line(capsys, tiny_ckpt, tmp_path, mutate, needle):
    ckpt = _copy(tiny_ckpt, tmp_path / "ckpt")
    manifest = json.loads((ckpt / MANIFEST_NAME).read_text())
    mutate(manifest)
    _write_manifest(ckpt, manifest)
    code, _, err = cli(capsys, "info", ckpt)
    assert_one_line_error(code, err, needle)


def test_manifest_naming_an_unknown_layer_is_one_line(capsys, tiny_ckpt, tmp_path):
    ckpt = _copy(tiny_ckpt, tmp_path / "ckpt")
    manifest = json.loads((ckpt / MANIFEST_NAME).read_text())
    manifest["quantized_layers"][0] = "model.layers.7.self_attn.nothing"
    _write_manifest(ckpt, manifest)
    code, _, err = cli(capsys, "generate", ckpt, "-p", "hi", "-n", "1", "--no-stats")
    assert_one_line_error(code, err, "is not a linear layer of this model")


def test_info_checks_sizes_and_verify_checks_sha256(capsys, tiny_ckpt, tmp_path):
    ckpt = _copy(tiny_ckpt, tmp_path / "ckpt")
    weights = ckpt / WEIGHTS_NAME
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, one byte changed
    weights.write_bytes(bytes(data))
    code, out, err = cli(capsys, "info", ckpt, "--json")
    assert code == 0 and json.loads(out)["verified"] == "sizes", err
    code, _, err = cli(capsys, "info", ckpt, "--verify")
    assert_one_line_error(code, err, "sha256 does not match")
    weights.write_bytes(bytes(data[: len(data) // 2]))
    code, _, err = cli(capsys, "info", ckpt)
    assert_one_line_error(code, err, "is truncated or altered")


def test_checkpoint_without_tokenizer_files_is_one_line(tiny_ckpt, tmp_path):
    from quantbench.errors import ModelLoadError
    from quantbench.eval.loading import load_for_eval

    ckpt = _copy(tiny_ckpt, tmp_path / "ckpt")
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        (ckpt / name).unlink(missing_ok=True)
    _, tokenizer = quantbench.checkpoint.load_quantized(ckpt)
    assert tokenizer is None  # not an empty tokenizer that fails deep inside eval
    with pytest.raises(ModelLoadError, match="no tokenizer files"):
        load_for_eval(str(ckpt), device="cpu")


def test_eval_of_a_checkpoint_without_tokenizer_is_one_line(capsys, tiny_ckpt, tmp_path):
    ckpt = _copy(tiny_ckpt, tmp_path / "ckpt")
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        (ckpt / name).unlink(missing_ok=True)
    db = tmp_path / "r.db"
    code, _, err = cli(
        capsys, "eval", ckpt, "--shots", "0", "--limit", "1", "--subjects", "anatomy", "--db", db
    )
    assert_one_line_error(code, err, "no tokenizer")


def test_model_dir_without_tokenizer_or_with_corrupt_config_is_one_line(capsys, tiny_hf_base, tmp_path):
    model_dir = _copy(tiny_hf_base, tmp_path / "model")
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        (model_dir / name).unlink(missing_ok=True)
    code, _, err = cli(capsys, "quantize", model_dir, "-m", "int8", "--out", tmp_path / "o1")
    assert_one_line_error(code, err, "has no tokenizer files")
    shutil.rmtree(model_dir)
    model_dir = _copy(tiny_hf_base, tmp_path / "model")
    (model_dir / "config.json").write_text('{"model_type": "qwen2", "hidden_size": ')
    code, _, err = cli(capsys, "quantize", model_dir, "-m", "int8", "--out", tmp_path / "o2")
    assert_one_line_error(code, err, "config.json is not valid JSON")


def test_checkpoint_with_corrupt_config_is_one_line(capsys, tiny_ckpt, tmp_path):
    ckpt = _copy(tiny_ckpt, tmp_path / "ckpt")
    for text in ("{not json", '["a list"]', '{"model_type": "no-such-architecture"}'):
        (ckpt / "config.json").write_text(text)
        code, _, err = cli(capsys, "generate", ckpt, "-p", "hi", "-n", "1", "--no-stats")
        assert_one_line_error(code, err, "config.json")


def _gguf_chunk() -> Path:
    from quantbench.models import PACKAGED_MODELS, packaged_chunks

    try:
        return packaged_chunks(PACKAGED_MODELS["gemma3-270m"])[0]
    except quantbench.ModelLoadError:
        pytest.skip("the packaged gemma3-270m GGUF is not installed")


@pytest.mark.parametrize("size", [1024, 5 * 2**20, "text"])
def test_truncated_or_fake_gguf_is_one_line(capsys, monkeypatch, tmp_path, size):
    monkeypatch.setenv("QUANTBENCH_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "model.gguf"
    if size == "text":
        path.write_text("this is not a model\n" * 100)
    else:
        with _gguf_chunk().open("rb") as handle:
            path.write_bytes(handle.read(size))
    code, _, err = cli(capsys, "quantize", path, "-m", "int8", "--out", tmp_path / "out")
    assert_one_line_error(code, err, str(path))
    assert not (tmp_path / "out").exists()


def test_a_method_that_quantizes_nothing_is_an_error(capsys, tiny_hf_base, tiny_model, tmp_path):
    with pytest.raises(quantbench.QuantConfigError, match="quantizes no layer"):
        quantbench.quantize(tiny_model, "int4:group=100000")
    code, _, err = cli(capsys, "quantize", tiny_hf_base, "-m", "int4:group=100000", "--out", tmp_path / "o")
    assert_one_line_error(code, err, "quantizes no layer of this model")
    assert not (tmp_path / "o").exists()


def test_layers_skipped_for_their_shape_are_named(capsys, tiny_hf_base, tmp_path):
    # group 256 divides the 256-wide down_proj input, not the 128-wide q/k/v/o/gate/up inputs
    code, _, err = cli(capsys, "quantize", tiny_hf_base, "-m", "int4:group=256", "--out", tmp_path / "o")
    assert code == 0, err
    assert "warning: 12 layer(s) left unquantized" in err and "q_proj" in err


@pytest.mark.parametrize(("command", "extra"), [("quantize", ["--out", "OUT"]), ("ppl", []), ("eval", [])])
def test_calib_for_a_method_without_calibration_is_an_error(capsys, tmp_path, no_loading, command, extra):
    extra = [str(tmp_path / "o") if a == "OUT" else a for a in extra]
    code, _, err = cli(capsys, command, "default", "-m", "int8", "--calib", "corpus:4x64", *extra)
    assert_one_line_error(code, err, "--calib is only for calibrated methods")


@pytest.mark.parametrize("content", [b"\xff\xfe\x00binary\x80\x81", bytes(range(256)) * 8])
def test_ppl_rejects_non_utf8_text(capsys, tmp_path, no_loading, content):
    path = tmp_path / "data.txt"
    path.write_bytes(content)
    code, _, err = cli(capsys, "ppl", "default", "--text", path)
    assert_one_line_error(code, err, "is not UTF-8 text")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["eval", "--shots", "99", "--subjects", "anatomy"], "only 5 dev examples"),
        (["eval", "--limit", "0"], "--limit must be >= 1"),
        (["eval", "-b", "0"], "--batch-size must be >= 1"),
        (["eval", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
        (["eval", "--json", "."], "is a directory"),
        (["ppl", "--ctx", "1"], "--ctx must be >= 2"),
        (["ppl", "--stride", "0"], "--stride must be between 1"),
        (["ppl", "--batch-size", "0"], "--batch-size must be >= 1"),
        (["ppl", "--json", "/nonexistent-dir/x.json"], "does not exist"),
    ],
)
def test_eval_and_ppl_arguments_are_checked_before_loading(capsys, tmp_path, no_loading, args, needle):
    code, _, err = cli(capsys, *args, "--db", tmp_path / "r.db") if args[0] == "eval" else cli(capsys, *args)
    assert_one_line_error(code, err, needle)


def test_finetune_bad_settings_before_loading(capsys, tmp_path, no_loading):
    pytest.importorskip("peft")
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    code, _, err = cli(capsys, "finetune", "--data", data, "--out", tmp_path / "ft", "--steps", "0")
    assert_one_line_error(code, err, "--steps must be >= 1")
    binary = tmp_path / "b.jsonl"
    binary.write_bytes(b"\xff\xfe\x00")
    from quantbench.train.data import DataError, load_examples

    with pytest.raises(DataError, match="not UTF-8"):
        load_examples(binary, None)


# ---------------------------------------------------------------------------------------------------------
# Fuzz: random mutations of a valid manifest end in success or one line, never a traceback

HOSTILE = [None, True, False, 0, -1, 2**70, 1.5, float("nan"), "", "x", "../../etc/passwd", [], [1], {}, {"a": 1}]  # fmt: skip


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node[:3]):
            yield from _paths(value, (*prefix, i))


def _mutate(manifest: dict, rng: random.Random) -> dict | str:
    m = copy.deepcopy(manifest)
    for _ in range(rng.randint(1, 3)):
        paths = [p for p in _paths(m) if p]
        path = rng.choice(paths)
        parent = m
        for key in path[:-1]:
            parent = parent[key]
        key = path[-1]
        action = rng.random()
        if action < 0.3 and isinstance(parent, dict):
            del parent[key]
        elif action < 0.4 and isinstance(parent, dict):
            parent[rng.choice(["extra", "..", "model.safetensors", "files", "size"])] = rng.choice(HOSTILE)
        else:
            parent[key] = copy.deepcopy(rng.choice(HOSTILE))
    text = json.dumps(m)
    if rng.random() < 0.05:
        text = text[: rng.randint(0, len(text))]  # truncated file
    return text


def test_fuzz_manifest_mutations_never_traceback(capsys, tiny_ckpt, tmp_path):
    ckpt = _copy(tiny_ckpt, tmp_path / "ckpt")
    valid = json.loads((ckpt / MANIFEST_NAME).read_text())
    rng = random.Random(23)
    outcomes = {"ok": 0, "error": 0}
    for i in range(300):
        text = _mutate(valid, rng)
        (ckpt / MANIFEST_NAME).write_text(text)
        code, _, err = cli(capsys, "info", ckpt, "--json")
        if code == 0:
            outcomes["ok"] += 1
        else:
            assert_one_line_error(code, err)
            outcomes["error"] += 1
        if i % 15 == 0:  # loading goes further than info: it must end the same ways
            try:
                quantbench.load_model(str(ckpt))
            except CheckpointError as exc:
                assert str(exc) and "\n" not in str(exc)
    assert outcomes["ok"] > 10 and outcomes["error"] > 100, outcomes


# ---------------------------------------------------------------------------------------------------------
# Sweeps: the whole file is checked before any work (a schema, fuzzed); a failed unit fails the sweep

_SWEEP = {
    "name": "fuzz",
    "model": "qwen2.5-coder-0.5b",
    "device": "cpu",
    "db": "results.db",
    "methods": ["bf16", "int8", "nf4:block=64,dq=1", "gptq:bits=4,group=128"],
    "calib": "corpus:4x64",
    "dequant_cache": True,
    "eval": {
        "tasks": ["mmlu", "ceval"],
        "subjects": {"mmlu": ["anatomy", "virology"], "ceval": "quick"},
        "limit": 5,
        "shots": 5,
        "split": "val",
        "mode": "loglikelihood",
        "protocol": "lmeval",
        "batch_size": 8,
    },
    "perplexity": {"text": "kjv-eval", "ctx": 256, "stride": 128, "max_tokens": 2048, "batch_size": 1},
    "bench": {"device": "auto", "batch": [1, 4], "input": 32, "output": 8, "repeats": 1},
}


def _sweep_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ("eval: {subjects: 5}", "sweep.yaml: eval.subjects: expected quick, all, a list of subjects or"),
        ("eval: {mode: foo}", "eval.mode: expected loglikelihood or generate, got 'foo'"),
        ("eval: {split: nosplit}", "eval.split: mmlu: unknown split 'nosplit'"),
        ("eval: {shots: 6, subjects: [anatomy]}", "eval.shots: 6: mmlu/anatomy has only 5 dev examples"),
        ("eval: {split: dev}", "eval.split: dev holds the few-shot examples"),
        ("eval: {tasks: [mmlu], subjects: {ceval: all}}", "eval.subjects: 'ceval' is not one of eval.tasks"),
        ("eval: {subjects: {mmlu: [anatomy, 3]}}", "eval.subjects.mmlu[1]: expected a subject name, got 3"),
        ("eval: {batch_size: 0}", "eval.batch_size: expected an integer >= 1, got 0"),
        ("eval: {limit: true}", "eval.limit: expected an integer >= 1 or null, got True"),
        ("eval: {tasks: [mmlu, 7]}", "eval.tasks[1]: expected a task name"),
        ("eval: {max_shots: 3}", "eval: unknown field 'max_shots'; allowed: tasks, subjects, limit, shots"),
        ("eval: [mmlu]", "eval: expected a mapping of settings, true or null, got ['mmlu']"),
        ("perplexity: {text: no-such-text.txt}", "perplexity.text: 'no-such-text.txt' is neither a file nor"),
        (
            "perplexity: {ctx: 64, stride: 65}",
            "perplexity.stride: expected an integer between 1 and ctx (64)",
        ),
        ("perplexity: {max_tokens: 1}", "perplexity.max_tokens: expected an integer >= 2 or null, got 1"),
        ("bench: {batch: [1, 0]}", "bench.batch[1]: expected an integer >= 1, got 0"),
        ("bench: {batch: []}", "bench.batch: expected a batch size or a list of batch sizes"),
        ("bench: {device: tpu}", "bench.device: expected auto or cpu or cuda, got 'tpu'"),
        ("eval: true\ndevice: gpu", "device: expected auto or cpu or cuda, got 'gpu'"),
        ("eval: true\ncalib: 'nowhere:4x64'", "calib: 'nowhere' is neither a file nor a corpus"),
        ("eval: true\ncalib: 'corpus:0x64'", "calib: --calib corpus:0x64: need at least 1 sample"),
        ("eval: true\ndequant_cache: maybe", "dequant_cache: expected true, false or null, got 'maybe'"),
        ("eval: true\nmodel: no-such-model", "model: 'no-such-model' not found"),
        ("eval: true\nmethods: [bf16, 'int4:group=x']", "methods[1]: "),
        ("eval: true\nmethods: []", "methods: expected at least one method spec"),
    ],
)
def test_sweep_file_is_checked_whole_before_any_work(capsys, tmp_path, no_loading, body, needle):
    text = "methods: [bf16]\n" + body + "\n"
    if "methods:" in body:
        text = body + "\n"
    db = tmp_path / "r.db"
    code, _, err = cli(capsys, "sweep", _sweep_file(tmp_path, text), "--db", db, "--no-progress")
    assert_one_line_error(code, err, needle)
    assert not db.exists()  # stopped before the results store was even opened


def test_sweep_schema_mode_list_is_the_harness_one():
    from quantbench.eval.harness import MODES
    from quantbench.report.sweep import EVAL_FIELDS, SweepError

    for mode in MODES:
        assert EVAL_FIELDS["mode"](mode, "eval.mode") == mode
    with pytest.raises(SweepError):
        EVAL_FIELDS["mode"]("perplexity", "eval.mode")


_SWEEP_KEYS = ["extra", "eval", "tasks", "subjects", "mmlu", "text", "batch", "methods", "shots", "stride"]
_NUMBERS = [0, -1, 1, 2, 5, 6, 64, 10**6, 2**70, -(2**70)]


def _mutate_sweep(sweep: dict, rng: random.Random) -> dict:
    m = copy.deepcopy(sweep)
    for _ in range(rng.randint(1, 4)):
        path = rng.choice([p for p in _paths(m) if p])
        parent = m
        for key in path[:-1]:
            parent = parent[key]
        key = path[-1]
        action = rng.random()
        if action < 0.2 and isinstance(parent, dict):
            del parent[key]  # a missing field
        elif action < 0.3 and isinstance(parent, dict):
            parent[rng.choice(_SWEEP_KEYS)] = copy.deepcopy(rng.choice(HOSTILE))  # an unknown (or known) key
        elif action < 0.55:
            parent[key] = rng.choice(_NUMBERS)  # out-of-range numbers
        elif action < 0.65:
            parent[key] = copy.deepcopy(rng.choice([_SWEEP["eval"], _SWEEP["bench"], [_SWEEP], {"x": [{}]}]))
        else:
            parent[key] = copy.deepcopy(rng.choice(HOSTILE))  # a wrong type
    return m


def test_fuzz_sweep_schema_never_raises_anything_but_one_sweep_error(tmp_path):
    import yaml

    from quantbench.report.sweep import SweepError, load_sweep, parse_sweep

    assert parse_sweep(copy.deepcopy(_SWEEP)).methods[:2] == ["bf16", "int8:bits=8,compute=bf16,group=-1,skip=lm_head,sym=1"]  # fmt: skip
    rng = random.Random(23)
    outcomes = {"ok": 0, "error": 0}
    for i in range(400):
        raw = _mutate_sweep(_SWEEP, rng)
        try:
            if i % 10 == 0:  # through the file: YAML text, sometimes cut short
                text = yaml.safe_dump(raw)
                if rng.random() < 0.5:
                    text = text[: rng.randint(0, len(text))]
                load_sweep(_sweep_file(tmp_path, text))
            else:
                parse_sweep(raw)
            outcomes["ok"] += 1
        except SweepError as exc:
            message = str(exc)
            assert message and "\n" not in message, message
            assert message.startswith(("sweep.yaml: ", f"{tmp_path / 'sweep.yaml'}")), message
            outcomes["error"] += 1
    assert outcomes["ok"] > 20 and outcomes["error"] > 200, outcomes


def test_a_sweep_with_a_failed_unit_exits_non_zero_and_names_it(capsys, tiny_hf_base, tmp_path):
    # int4 group 100000 divides no layer of the tiny model: the file is valid, quantize() refuses the model
    import sqlite3

    path = _sweep_file(
        tmp_path,
        f"model: {tiny_hf_base}\ndevice: cpu\nmethods: [bf16, 'int4:group=100000']\n"
        "eval: {tasks: [mmlu], subjects: [anatomy], limit: 1, shots: 0, batch_size: 1}\n",
    )
    db = tmp_path / "r.db"
    code, out, err = cli(capsys, "sweep", path, "--db", db, "--no-progress")
    assert code == 1, (out, err)
    failed = "int4:bits=4,compute=bf16,group=100000,skip=lm_head,sym=1 eval:mmlu"
    summary = next(line for line in out.splitlines() if " units run, " in line)
    assert f"1 failed: {failed};" in summary, summary
    assert "quantizes no layer of this model" in out
    conn = sqlite3.connect(db)
    states = dict(conn.execute("SELECT spec, status FROM sweep_stages").fetchall())
    specs = [r[0] for r in conn.execute("SELECT spec FROM runs")]
    conn.close()
    assert states == {"bf16": "done", failed.split()[0]: "failed"}
    assert specs == ["bf16"]  # no row for the spec that quantized nothing
    # Still failed when it is skipped rather than retried; a sweep without failures exits 0.
    code, out, _ = cli(capsys, "sweep", path, "--db", db, "--no-progress", "--skip-failed")
    assert code == 1 and f"1 failed: {failed};" in out
    path.write_text(path.read_text().replace(", 'int4:group=100000'", ""))
    code, out, _ = cli(capsys, "sweep", path, "--db", db, "--no-progress")
    assert code == 0 and "0 failed;" in out


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--shots", "99", "--subjects", "anatomy"], "--shots 99: mmlu/anatomy has only 5 dev examples"),
        (["--shots", "6", "--tasks", "ceval", "--full"], "--shots 6: ceval/"),
        (["--shots", "-1"], "--shots must be >= 0"),
        (["--limit", "0"], "--limit must be >= 1"),
        (["-b", "0"], "--batch-size must be >= 1"),
        (["--threads", "-2"], "--threads must be >= 0"),
    ],
)
def test_run_arguments_are_checked_before_loading(capsys, tmp_path, no_loading, args, needle):
    db = tmp_path / "r.db"
    code, _, err = cli(capsys, "run", "-m", "bf16", *args, "--db", db)
    assert_one_line_error(code, err, needle)
    assert not db.exists()

"""Model resolution errors and the quantize/info commands, run as a user would run them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import quantbench
from quantbench import ModelLoadError


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "quantbench", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=600,
    )


def test_unknown_model_spec() -> None:
    with pytest.raises(ModelLoadError, match="model 'no-such-model' not found"):
        quantbench.load_model("no-such-model")


def test_directory_without_config(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no config.json"):
        quantbench.load_model(str(tmp_path))


def test_unknown_architecture() -> None:
    with pytest.raises(ModelLoadError, match="unknown architecture 'gpt-9'"):
        quantbench.random_model("gpt-9")


def test_random_model_is_real_architecture() -> None:
    config = quantbench.models.random_config("mistral-7b")
    assert (config.hidden_size, config.num_hidden_layers, config.num_key_value_heads) == (4096, 32, 8)
    small = quantbench.random_model("llama-3-8b", num_hidden_layers=1, vocab_size=256, dtype="fp32")
    assert type(small).__name__ == "LlamaForCausalLM"
    assert small.model.layers[0].mlp.gate_proj.weight.shape == (14336, 4096)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["quantize", "--method", "nf9", "--out", "x"], "error: unknown method 'nf9'"),
        (
            ["quantize", "no-such-model", "--method", "int8", "--out", "x"],
            "error: model 'no-such-model' not found",
        ),
        (["info", "missing-dir"], "error: missing-dir is not a quantbench checkpoint"),
    ],
)
def test_cli_bad_input_is_one_line(args: list[str], message: str, tmp_path: Path) -> None:
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith(message), result.stderr
    assert "Traceback" not in result.stderr


def test_cli_quantize_then_info(tmp_path: Path) -> None:
    out = tmp_path / "int4"
    result = run_cli("quantize", "--method", "int4:group=128", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "4.125 bits/weight" in result.stdout
    assert "Loading weights" not in result.stderr  # transformers' per-load bar stays out of the output
    info = run_cli("info", str(out), "--json")
    assert info.returncode == 0, info.stderr
    summary = json.loads(info.stdout)
    assert summary["spec"] == "int4:bits=4,compute=bf16,group=128,skip=lm_head,sym=1"
    assert summary["quantized_layers"] == 24 * 7
    assert summary["bits_per_weight"] == pytest.approx(4.125)

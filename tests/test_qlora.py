"""QLoRA on a frozen 4-bit base: adapters learn, base codes never change, runs resume exactly."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")

import quantbench  # noqa: E402
from quantbench.train import qlora  # noqa: E402
from quantbench.train.data import IGNORE_INDEX, DataError, Example, load_examples  # noqa: E402

VOCAB = 64


def tiny_nf4_model() -> torch.nn.Module:
    model = quantbench.random_model(
        "qwen2.5-0.5b",
        dtype="fp32",
        num_hidden_layers=2,
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=256,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return quantbench.quantize(model, "nf4:block=64,dq=1,compute=fp32")


def answer_task(n: int, seed: int = 0) -> list[Example]:
    """Prompt: 6 random tokens; completion: its last token + 1, then a fixed token (learnable by a LoRA)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        toks = [rng.randrange(2, VOCAB - 1) for _ in range(6)]
        answer = [toks[-1] + 1, 1]
        out.append(Example([*toks, *answer], [IGNORE_INDEX] * 6 + answer))
    return out


def settings(**kw) -> qlora.TrainSettings:
    base = {"steps": 30, "batch_size": 8, "lr": 1e-2, "warmup_steps": 2, "save_every": 10, "seed": 0}
    return qlora.TrainSettings(**{**base, **kw})


def test_lora_learns_and_base_codes_stay_bit_identical(tmp_path: Path) -> None:
    model = tiny_nf4_model()
    before = qlora.base_weight_tensors(model)
    peft_model = qlora.attach_lora(model, r=8, alpha=16, dropout=0.0, targets="q,k,v,o,gate,up,down")
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert len([n for n in trainable if "lora_A" in n]) == 2 * 7
    train, held = answer_task(64, seed=1), answer_task(16, seed=2)
    loss0 = qlora.evaluate_loss(peft_model, held)
    record = qlora.train_lora(peft_model, train, settings(), tmp_path, progress=False)
    loss1 = qlora.evaluate_loss(peft_model, held)
    assert record.steps_done == 30 and len(record.peak_memory_bytes) == 30
    assert loss1 < 0.8 * loss0, (loss0, loss1)
    after = qlora.base_weight_tensors(peft_model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_resume_after_interruption_matches_uninterrupted(tmp_path: Path) -> None:
    train = answer_task(40, seed=3)

    def run(out: Path, stop_at: int | None = None) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        peft_model = qlora.attach_lora(tiny_nf4_model(), r=4, alpha=8, dropout=0.0, targets="q,v")

        def stop(step: int, loss: float) -> None:
            if stop_at is not None and step == stop_at:
                raise KeyboardInterrupt  # what a kill mid-run looks like from the loop's side

        try:
            qlora.train_lora(
                peft_model, train, settings(steps=20, save_every=5), out, on_step=stop, progress=False
            )
        except KeyboardInterrupt:
            return {}
        return {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_" in n}

    full = run(tmp_path / "full")
    assert run(tmp_path / "cut", stop_at=13) == {}
    assert [p.name for p in qlora._checkpoint_dirs(tmp_path / "cut")] == ["step-5", "step-10"]
    resumed = run(tmp_path / "cut")  # picks up step-10
    assert full.keys() == resumed.keys()
    for name in full:
        assert torch.allclose(full[name], resumed[name], atol=1e-6), name


def test_data_formats_and_errors(tmp_path: Path, real_model_fp32) -> None:
    _, tokenizer = real_model_fp32
    good = tmp_path / "d.jsonl"
    good.write_text(
        json.dumps({"prompt": "2+2=", "completion": " 4"})
        + "\n"
        + json.dumps(
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
        )
        + "\n"
    )
    examples = load_examples(good, tokenizer)
    assert len(examples) == 2
    answer = [
        t for t, lab in zip(examples[0].input_ids, examples[0].labels, strict=True) if lab != IGNORE_INDEX
    ]
    assert tokenizer.decode(answer) == " 4" + tokenizer.eos_token
    chat_answer = [
        t for t, lab in zip(examples[1].input_ids, examples[1].labels, strict=True) if lab != IGNORE_INDEX
    ]
    assert "hello" in tokenizer.decode(chat_answer) and "hi" not in tokenizer.decode(chat_answer)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "completion": "y"}\n{"text": 1}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: expected keys"):
        load_examples(bad, tokenizer)
    with pytest.raises(DataError, match="does not exist"):
        load_examples(tmp_path / "none.jsonl", tokenizer)


def _trained_adapter(base: Path, out: Path) -> tuple[torch.nn.Module, torch.Tensor]:
    model, tokenizer = quantbench.load_model(str(base), dtype="fp32")
    quantbench.quantize(model, "nf4:block=64,dq=1,compute=fp32")
    peft_model = qlora.attach_lora(model, r=4, alpha=8, dropout=0.0, targets="q,v,down")
    train = [Example(ex.input_ids, ex.labels) for ex in answer_task(16, seed=4)]
    qlora.train_lora(peft_model, train, settings(steps=4, save_every=0), out, progress=False)
    qlora.save_adapter(peft_model, out, base=str(base), method="nf4:block=64,dq=1,compute=fp32")
    ids = tokenizer("The quick brown fox", return_tensors="pt").input_ids
    return peft_model, ids


def test_adapter_saves_loads_and_merges(tiny_hf_base: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    trained, ids = _trained_adapter(tiny_hf_base, tmp_path / "adapter")
    with torch.no_grad():
        expected = trained(input_ids=ids).logits
    # load_model(DIR) rebuilds base + quantization + adapter: the same function as the trained model
    loaded, _ = quantbench.load_model(str(tmp_path / "adapter"))
    assert loaded.quantbench_source["adapter"] == str((tmp_path / "adapter").resolve())
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, expected)

    # merge into the fp32 base: equals the base with W + B @ A * alpha / r on every adapted layer
    qlora.merge_and_quantize(tmp_path / "adapter", "fp32", tmp_path / "merged")
    merged, _ = quantbench.load_model(str(tmp_path / "merged"))
    reference, _ = quantbench.load_model(str(tiny_hf_base), dtype="fp32")
    with torch.no_grad():
        base_logits = reference(input_ids=ids).logits
        lora = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
        pairs = 0
        for key, a in lora.items():
            if ".lora_A." not in key:
                continue
            b = lora[key.replace(".lora_A.", ".lora_B.")]
            name = key.removeprefix("base_model.model.").split(".lora_A.")[0]
            reference.get_submodule(name).weight += (b.double() @ a.double() * (8 / 4)).float()
            pairs += 1
        assert pairs == 2 * 3
        want = reference(input_ids=ids).logits
        got = merged(input_ids=ids).logits
    assert not torch.allclose(want, base_logits, atol=1e-4)  # the adapter changed something
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_adapter_errors(tiny_hf_base: Path, tmp_path: Path) -> None:
    with pytest.raises(qlora.FinetuneError, match="not a quantbench finetune output"):
        qlora.load_adapter_model(tmp_path)
    _trained_adapter(tiny_hf_base, tmp_path / "a")
    manifest = json.loads((tmp_path / "a" / qlora.ADAPTER_MANIFEST).read_text())
    # a different quantization of the base gives other codes than the adapter was trained on
    manifest["method"] = "nf4:block=128,dq=1,compute=fp32"
    (tmp_path / "a" / qlora.ADAPTER_MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(qlora.FinetuneError, match="does not give the codes"):
        quantbench.load_model(str(tmp_path / "a"))
    (tmp_path / "a" / "adapter_model.safetensors").unlink()
    with pytest.raises(qlora.FinetuneError, match="adapter_model.safetensors is missing"):
        qlora.load_adapter_model(tmp_path / "a")


def test_finetune_cli_end_to_end(tiny_hf_base: Path, tmp_path: Path) -> None:
    from test_cli_models import run_cli

    data = tmp_path / "d.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": f"What is {a} + 1? Answer:", "completion": f" {a + 1}"}) + "\n"
            for a in range(12)
        )
    )
    out = tmp_path / "ft"
    common = [
        "finetune",
        str(tiny_hf_base),
        "--method",
        "nf4:compute=fp32",
        "--data",
        str(data),
        "--out",
        str(out),
    ]
    done = run_cli(*common, "--steps", "3", "--batch-size", "4", "--save-every", "2", "--eval-data", str(data),
                   "--merge-and-quantize", "int8")  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((out / qlora.ADAPTER_MANIFEST).read_text())["training"]
    assert summary["steps"] == 3 and summary["base_weights_unchanged"] is True
    assert [p.name for p in qlora._checkpoint_dirs(out)] == ["step-2"]
    gen = run_cli("generate", str(out), "--prompt", "What is 3 + 1? Answer:", "--max-new-tokens", "3")
    assert gen.returncode == 0, gen.stderr[-2000:]
    assert json.loads((out / "merged" / "quantbench.json").read_text())["spec"].startswith("int8")
    bad = run_cli(*common[:-2], "--out", str(tmp_path / "x"), "--data", str(tmp_path / "missing.jsonl"))
    assert (
        bad.returncode != 0 and "Traceback" not in bad.stderr and "missing.jsonl" in bad.stderr + bad.stdout
    )

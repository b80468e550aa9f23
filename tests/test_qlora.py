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

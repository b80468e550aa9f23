"""Data-parallel evaluation over 2 gloo processes gives the same per-question answers as 1 process,
and rank 0 stores every answer in the one SQLite DB."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

SUBJECTS = ["astronomy", "high_school_geography"]
LIMIT = 5


def _tiny_model_and_tokenizer():
    from transformers import AutoTokenizer

    import quantbench
    from quantbench.models import resolve_model_dir

    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model_dir(quantbench.DEFAULT_MODEL)))
    model = quantbench.random_model(
        "qwen2.5-0.5b",
        dtype="fp32",
        seed=3,
        num_hidden_layers=2,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
    )
    return model, tokenizer


def _worker(rank: int, world: int, port: int, db: str, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    from quantbench.eval.distributed import evaluate_data_parallel, init_from_env
    from quantbench.eval.store import ResultStore

    init_from_env()
    model, tokenizer = _tiny_model_and_tokenizer()
    with ResultStore(db) as store:
        result = evaluate_data_parallel(
            model, tokenizer, "mmlu", store=store, subjects=SUBJECTS, limit=LIMIT, shots=1, batch_size=4
        )
    if rank == 0:
        preds = {(a.subject, a.idx): a.pred for a in result.answers}
        torch.save({"preds": preds, "evaluated": result.evaluated, "questions": result.questions}, out)
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_match_one(tmp_path: Path) -> None:
    from quantbench.eval.harness import evaluate
    from quantbench.eval.store import ResultStore

    model, tokenizer = _tiny_model_and_tokenizer()
    single = evaluate(model, tokenizer, "mmlu", subjects=SUBJECTS, limit=LIMIT, shots=1, batch_size=4)
    expected = {(a.subject, a.idx): a.pred for a in single.answers}

    db, out = tmp_path / "dp.db", tmp_path / "rank0.pt"
    mp.start_processes(
        _worker, args=(2, _free_port(), str(db), str(out)), nprocs=2, join=True, start_method="spawn"
    )
    got = torch.load(out)
    assert got["questions"] == len(SUBJECTS) * LIMIT
    assert got["evaluated"] == len(SUBJECTS) * LIMIT
    assert got["preds"] == expected
    with ResultStore(db) as store:
        assert store.count_results() == len(SUBJECTS) * LIMIT


def test_sharded_task_only_shards_the_evaluated_split() -> None:
    from quantbench.eval.distributed import _ShardedTask
    from quantbench.eval.tasks import get_task

    task = get_task("mmlu")
    full = task.load("astronomy", "val")
    sharded = _ShardedTask(task, "val", {"astronomy": full[1::2]})
    assert [q.index for q in sharded.load("astronomy", "val")] == [q.index for q in full[1::2]]
    assert len(sharded.load("astronomy", "dev")) == len(task.load("astronomy", "dev"))
    assert sharded.name == "mmlu"


@pytest.mark.parametrize("world", [1])
def test_single_process_is_plain_evaluate(world: int, tmp_path: Path) -> None:
    from quantbench.eval.distributed import evaluate_data_parallel, rank_and_world
    from quantbench.eval.store import ResultStore

    assert rank_and_world() == (0, world)
    model, tokenizer = _tiny_model_and_tokenizer()
    with ResultStore(tmp_path / "one.db") as store:
        result = evaluate_data_parallel(
            model, tokenizer, "mmlu", store=store, subjects=SUBJECTS[:1], limit=2, shots=0
        )
    assert result is not None and result.questions == 2

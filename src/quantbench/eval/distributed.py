"""Data-parallel evaluation with ``torch.distributed``: each rank scores a shard of the questions,
rank 0 gathers every result into the one SQLite store.

Launch with ``torchrun --nproc-per-node N -m quantbench eval ...`` (or ``--gpus N`` on ``eval``/``run``,
which starts torchrun itself). NCCL on GPUs, gloo on CPU. Questions already in the store are skipped
before sharding, so a resumed run only shards what is left. A question's answer depends on nothing but
the question (prefix reuse and padding change no answer), so N ranks give the same per-question answers
as one.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from quantbench.eval.harness import TaskResult, evaluate, model_identity
from quantbench.eval.protocols import Protocol, get_protocol
from quantbench.eval.store import EvalKey, ResultStore
from quantbench.eval.tasks import MultipleChoiceTask, Question, get_task


def relaunch_with_torchrun(nproc: int, flag: str) -> int:
    """Run this same command under ``torchrun --nproc-per-node nproc`` (minus ``flag N``); its exit code."""
    import subprocess
    import sys

    args, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg == flag:
            skip = True
        elif not arg.startswith(flag + "="):
            args.append(arg)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        "-m",
        "quantbench",
        *args,
    ]
    return subprocess.call(command)


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env() -> tuple[int, int, torch.device]:
    """Join the process group torchrun describes in the environment (a no-op for one process).

    Returns (rank, world size, this rank's device): ``cuda:LOCAL_RANK`` when GPUs exist, else CPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    rank, world = rank_and_world()
    return rank, world, device


class _ShardedTask:
    """A task whose evaluated split yields only this rank's share of the not-yet-stored questions."""

    def __init__(self, task: MultipleChoiceTask, split: str, shards: dict[str, list[Question]]) -> None:
        self._task = task
        self._split = split
        self._shards = shards

    def __getattr__(self, name: str) -> Any:
        return getattr(self._task, name)

    def load(self, subject: str, split: str, reader: str = "csv") -> list[Question]:
        if split == self._split:
            return self._shards.get(subject, [])
        return self._task.load(subject, split, reader)  # the dev split: few-shot examples, never sharded


def evaluate_data_parallel(
    model: nn.Module,
    tokenizer: Any,
    task: str | MultipleChoiceTask,
    *,
    store: ResultStore,
    split: str = "val",
    shots: int = 5,
    mode: str = "loglikelihood",
    protocol: str | Protocol = "lmeval",
    subjects: Sequence[str] | None = None,
    limit: int | None = None,
    **kwargs: Any,
) -> TaskResult | None:
    """Evaluate across all ranks of the current process group; rank 0 returns the full result
    (and has written every answer to ``store``), the other ranks return None."""
    rank, world = rank_and_world()
    task = get_task(task) if isinstance(task, str) else task
    protocol = get_protocol(protocol)
    common = {
        "split": split,
        "shots": shots,
        "mode": mode,
        "protocol": protocol,
        "subjects": subjects,
        **kwargs,
    }
    if world == 1:
        return evaluate(model, tokenizer, task, store=store, limit=limit, **common)
    fingerprint, spec = model_identity(model)
    key = EvalKey(fingerprint, spec, task.name, split, shots, mode, protocol.name)
    subject_list = task.check_subjects(list(subjects) if subjects else None)
    start = time.perf_counter()
    shards: dict[str, list[Question]] = {}
    for subject in subject_list:
        done = store.done_indices(key, subject)
        todo = [q for q in protocol.questions(task, subject, split)[:limit] if q.index not in done]
        shards[subject] = todo[rank::world]  # strided: every rank gets a share of every subject
    with ResultStore(":memory:") as scratch:
        own = evaluate(
            model, tokenizer, _ShardedTask(task, split, shards), store=scratch, limit=None, **common
        )
        mine = [r for s, qs in shards.items() if qs for r in scratch.results(key, s, [q.index for q in qs])]
    gathered: list[list[Any]] = [[] for _ in range(world)]
    dist.all_gather_object(gathered, mine)
    result = None
    if rank == 0:
        store.add_results(key, [r for part in gathered for r in part])
        result = evaluate(
            model, tokenizer, task, store=store, limit=limit, **common
        )  # all stored: just summarizes
        new = sum(len(p) for p in gathered)
        result = dataclasses.replace(
            result,
            wall_s=time.perf_counter() - start,
            evaluated=new,
            reused=result.reused - new,
            scoring=own.scoring,
        )
    dist.barrier()
    return result

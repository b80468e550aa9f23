"""``quantbench sweep`` (every method of a YAML file through quantize -> eval -> bench) and ``quantbench report``
(tables and plots from the results database)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from quantbench.cli import app

console = Console(soft_wrap=True)


@app.command()
def sweep(
    sweep_file: Path = typer.Argument(..., help="sweep YAML (see examples/sweep.yaml)"),
    db: str = typer.Option(
        None, "--db", help="SQLite results store (default: the file's db, else quantbench.db)"
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="list what would run, run nothing"),
    retry_failed: bool = typer.Option(
        True, "--retry-failed/--skip-failed", help="rerun units that failed before"
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="progress bars on a terminal"),
) -> None:
    """Run every method x stage of SWEEP_FILE not yet done; a failing one is recorded and the sweep goes on.

    The whole file is checked first (one error line, exit 2); the exit code is 1 when any unit failed."""
    from rich.markup import escape

    from quantbench.report.sweep import load_sweep, run_sweep

    cfg = load_sweep(sweep_file)
    db_path = db or cfg.db or "quantbench.db"
    console.print(
        f"sweep [bold]{cfg.name}[/]: {cfg.model}, {len(cfg.methods) or 1} configuration(s) x "
        f"{len(cfg.stages())} stage(s) ({', '.join(cfg.stages())}) -> {db_path}"
    )
    summary = run_sweep(
        cfg, db_path, dry_run=dry_run, retry_failed=retry_failed, progress=progress, log=console.print
    )
    if dry_run:
        todo = sum(u.status != "done" for u in summary.units)
        console.print(f"dry run: {todo} of {len(summary.units)} units would run")
        return
    table = Table("spec", *dict.fromkeys(u.stage for u in summary.units), title=f"sweep {cfg.name}")
    by_spec: dict[str, dict[str, str]] = {}
    for u in summary.units:
        mark = {"done": "[green]done[/]", "failed": "[red]FAILED[/]", "skipped": "[yellow]skipped[/]"}
        by_spec.setdefault(u.spec, {})[u.stage] = mark.get(u.status or "", u.status or "-")
    for spec, stages in by_spec.items():
        table.add_row(spec, *stages.values())
    console.print(table)
    # Failed: this run's failures and those left failed from before (--skip-failed): the sweep is incomplete.
    failed = [u for u in summary.units if u.status == "failed"]
    skipped = "done or failed before" if not retry_failed and failed else "done before"
    named = f": {', '.join(f'{u.spec} {u.stage}' for u in failed)}" if failed else ""
    console.print(
        f"{summary.ran} units run, {summary.skipped} skipped ({skipped}), {len(failed)} failed{named}; "
        f"{summary.evaluated} questions evaluated, {summary.reused} read back from the store; "
        f"{summary.wall_s:.1f}s",
        markup=False,
        highlight=False,
    )
    for u in failed:
        console.print(f"[red]failed[/] {escape(u.spec)} {u.stage}: {escape(u.error or '')}")
    if failed:
        raise SystemExit(1)


@app.command()
def report(
    db: str = typer.Option("quantbench.db", "--db", help="SQLite results store"),
    fmt: str = typer.Option("md,html", "--format", "-f", help="md, csv, html, json (comma-separated for several)"),
    out: Path = typer.Option(Path("report"), "--out", "-o", help="output directory"),
    model: str = typer.Option(None, "--model", help="only this model (as given to eval/sweep)"),
    sweep_name: str = typer.Option(None, "--sweep", help="only the runs of this sweep"),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="draw the PNG plots (md, html)"),
) -> None:
    """Build the comparison tables (accuracy per category, latency, memory / size) and plots from the DB."""
    from quantbench.report.data import collect
    from quantbench.report.render import SHORT_CATEGORY, label, recommendation, table_stats, write_report

    formats = [f.strip().lower() for f in fmt.split(",") if f.strip()]
    data = collect(db, model=model, sweep=sweep_name)
    written = write_report(data, out, formats, plots=plots)
    # The terminal gets the headline: accuracy per category (compact) and the picks; the files hold the rest.
    for m in data.models:
        console.print(f"[bold]{m.model}[/]")
        for t in m.acc:
            base = t.baseline
            cats = [SHORT_CATEGORY.get(c, c) for c in t.categories]
            table = Table("config", "Avg %", *cats, "time s", "GiB", "verdict", title=t.title)
            stats = table_stats(t)
            for r in t.rows:
                delta = "" if base is None or r is base else f" ({100 * (r.accuracy - base.accuracy):+.1f})"
                cells = [f"{100 * r.categories[c]:.1f}" if c in r.categories else "-" for c in t.categories]
                gib = f"{r.weights_gib:.3f}" if r.weights_gib else "-"
                s = stats[r.spec]
                verdict = "reference" if s.is_reference else (s.comparison.verdict if s.comparison else "-")
                table.add_row(
                    label(r.fields),
                    f"{100 * r.accuracy:.1f}{delta}",
                    *cells,
                    f"{r.compute_s:.1f}",
                    gib,
                    verdict,
                )
            console.print(table)
        for note in recommendation(m):
            console.print("  " + note.replace("**", ""))
        if m.failures:
            console.print(f"  [red]{len(m.failures)} failed unit(s)[/]: see the report")
    console.print("wrote " + ", ".join(str(p) for p in written))

"""Turn :class:`~quantbench.report.data.ReportData` into tables and plots, written as Markdown (PNG files beside
it), CSV (one file per table) or a self-contained HTML page (PNG embedded as base64)."""

from __future__ import annotations

import base64
import csv
import datetime as _dt
import html
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantbench.report.data import AccTable, ModelReport, ReportData, ReportError

FORMATS = ("md", "csv", "html", "json")
SHORT_CATEGORY = {"Social Sciences": "Social Sci", "Social Science": "Social Sci"}
FIELD_COLUMNS = ("Quant Type", "Compute Dtype", "Double Quant", "Group Size")
CLOSE_PTS = 1.0  # "within this many points of the baseline" for the recommendation


@dataclass
class Table:
    name: str  # file stem for CSV
    title: str
    columns: list[str]
    cells: list[list[str]]  # formatted (Markdown / HTML)
    raw: list[list[Any]]  # numbers (CSV)
    raw_columns: list[str]
    note: str = ""


@dataclass
class Plot:
    name: str  # file name, .png
    title: str
    png: bytes


@dataclass
class Section:
    title: str
    tables: list[Table] = field(default_factory=list)
    plots: list[Plot] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _protocol_slug(protocol: str) -> str:
    return "" if protocol == "lmeval" else f"{protocol}-"  # lmeval tables keep their earlier file names


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:60] or "x"


def _f(x: float | None, digits: int = 1) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _delta(value: float | None, base: float | None) -> str:
    if value is None or base is None:
        return ""
    d = value - base
    return f" ({'+' if d >= 0 else '-'}{abs(d):.1f})"


def _ratio(value: float | None, base: float | None) -> str:
    if value is None or base is None or not base or math.isnan(value) or math.isnan(base):
        return ""
    return f" ({value / base:.2f}x)"


def label(fields: dict[str, str]) -> str:
    """A short name for plots: ``nf4 g64 dq``, ``int8 ch``, ``bf16``."""
    parts = [fields.get("quant_type", "?")]
    group = fields.get("group_size", "-")
    if group not in ("-", ""):
        parts.append("ch" if group == "channel" else f"g{group}")
    if fields.get("double_quant") == "yes":
        parts.append("dq")
    compute = fields.get("compute_dtype", "-")
    if compute not in ("-", "bf16", parts[0]):
        parts.append(compute)
    return " ".join(parts)


def _field_cells(fields: dict[str, str]) -> list[str]:
    return [fields["quant_type"], fields["compute_dtype"], fields["double_quant"], fields["group_size"]]


# ---------------------------------------------------------------------------------------------------------


def accuracy_table(t: AccTable) -> Table:
    cats = [SHORT_CATEGORY.get(c, c) for c in t.categories]
    base = t.baseline
    columns = [*FIELD_COLUMNS, "Avg %", *cats, "Total Time s", "Weights GiB"]
    cells, raw = [], []
    for row in t.rows:
        is_base = base is not None and row is base
        avg = 100 * row.accuracy
        line = [
            *_field_cells(row.fields),
            _f(avg) + ("" if is_base or base is None else _delta(avg, 100 * base.accuracy)),
        ]
        raw_line: list[Any] = [row.spec, *_field_cells(row.fields), round(avg, 3)]
        for c in t.categories:
            v = row.categories.get(c)
            pct = None if v is None else 100 * v
            b = None if base is None or is_base else base.categories.get(c)
            line.append(_f(pct) + ("" if b is None else _delta(pct, 100 * b)))
            raw_line.append(None if pct is None else round(pct, 3))
        line += [_f(row.compute_s), _f(row.weights_gib, 3)]
        raw_line += [round(row.compute_s, 3), row.weights_gib, row.questions]
        cells.append(line)
        raw.append(raw_line)
    note = ""
    if base is not None:
        note = f"In parentheses: percentage points against the {base.spec} row."
    n = max((r.questions for r in t.rows), default=0)
    if 0 < n < 1000:
        p = base.accuracy if base is not None else 0.5
        se = 100 * math.sqrt(max(p * (1 - p), 1e-9) / n)
        note += f" With {n} questions the standard error of Avg is about {se:.1f} points."
    raw_columns = ["spec", *FIELD_COLUMNS, "Avg %", *cats, "Total Time s", "Weights GiB", "Questions"]
    return Table(
        f"accuracy-{_slug(t.model)}-{t.task}-{t.shots}shot-{_protocol_slug(t.protocol)}{_slug(t.mode)}-"
        f"{_slug(str(t.limit))}",
        f"Accuracy: {t.title}",
        columns,
        cells,
        raw,
        raw_columns,
        note.strip(),
    )


def table_stats(t: AccTable) -> dict[str, Any]:
    """spec -> MethodStats of every row against the table's reference row (quantbench.report.compare)."""
    from quantbench.report.compare import method_stats

    ref = t.baseline.spec if t.baseline is not None else (t.rows[0].spec if t.rows else None)
    counts = {r.spec: (round(r.accuracy * r.questions), r.questions) for r in t.rows}
    return method_stats({r.spec: r.answers for r in t.rows}, ref, counts)


def stats_table(t: AccTable) -> Table:
    """The statistic columns of an accuracy table: intervals, paired comparison, verdict."""
    from quantbench.report.compare import STAT_COLUMNS, STAT_RAW_COLUMNS, stat_cells, stat_raw

    stats = table_stats(t)
    ref = next((s.spec for s in stats.values() if s.is_reference), "-")
    cells = [[*_field_cells(r.fields), *stat_cells(stats[r.spec])] for r in t.rows]
    raw = [[r.spec, *_field_cells(r.fields), *stat_raw(stats[r.spec])] for r in t.rows]
    note = (
        f"Against the {ref} row, on the questions both answered. Avg: Wilson 95% interval. Δ: accuracy "
        "difference in points with a paired bootstrap 95% interval (10,000 resamples over questions), widened "
        "to Agresti-Min's adjusted interval where that is wider (few flips). flips: right->wrong / "
        "wrong->right. agree: same predicted letter, Wilson interval. KLD: mean KL(ref || method) of the "
        "answer distribution over A-D (nats; loglikelihood mode only). p: exact McNemar test on the flips. "
        "Verdict: a difference is shown when the interval excludes 0 and p < 0.05; otherwise "
        "'indistinguishable', or 'too few questions to tell' when the interval is wider than ±5 points."
    )
    return Table(
        f"stats-{_slug(t.model)}-{t.task}-{t.shots}shot-{_slug(t.mode)}-{_slug(str(t.limit))}",
        f"Statistics against {ref}: {t.title}",
        [*FIELD_COLUMNS, *STAT_COLUMNS],
        cells,
        raw,
        ["spec", *FIELD_COLUMNS, *STAT_RAW_COLUMNS],
        note,
    )


def latency_tables(m: ModelReport) -> list[Table]:
    groups: dict[tuple, list] = {}
    for p in m.bench:
        groups.setdefault((p.device, p.input_len, p.output_len), []).append(p)
    tables = []
    for (device, inp, out), points in groups.items():
        batches = sorted({p.batch for p in points})
        specs = [s for s in m.specs() if any(p.spec == s for p in points)]
        by = {(p.spec, p.batch): p for p in points}
        base = next((s for s in ("bf16", "fp16", "fp32") if s in specs), None)
        columns = list(FIELD_COLUMNS)
        raw_columns = ["spec", *FIELD_COLUMNS]
        for b in batches:
            columns += [f"b{b} first token ms", f"b{b} next ms/token", f"b{b} tok/s"]
            raw_columns += [f"b{b} first token ms", f"b{b} next ms/token", f"b{b} tok/s"]
        columns += ["Weights GiB", "Path"]
        raw_columns += ["Weights GiB", "Path"]
        cells, raw = [], []
        for spec in specs:
            fields = m.fields.get(spec) or _fields_of(spec)
            line, raw_line = _field_cells(fields), [spec, *_field_cells(fields)]
            path = ""
            for b in batches:
                p = by.get((spec, b))
                if p is None:
                    line += ["-", "-", "-"]
                    raw_line += [None, None, None]
                    continue
                bp = by.get((base, b)) if base and spec != base else None
                line += [
                    _f(p.first_token_ms) + (_ratio(p.first_token_ms, bp.first_token_ms) if bp else ""),
                    _f(p.per_token_ms, 2) + (_ratio(p.per_token_ms, bp.per_token_ms) if bp else ""),
                    _f(p.tokens_per_s),
                ]
                raw_line += [p.first_token_ms, p.per_token_ms, p.tokens_per_s]
                path = p.path
            weights = m.weights(spec)
            line += [_f(weights, 3), path]
            raw_line += [weights, path]
            cells.append(line)
            raw.append(raw_line)
        note = "First token: prompt + first new token. Next: each later token (one decode step of the batch)."
        if base:
            note += f" In parentheses: time relative to {base}."
        tables.append(
            Table(
                f"latency-{_slug(m.model)}-{_slug(device)}-{inp}in-{out}out",
                f"Latency on {device}: {inp} prompt tokens, {out} new tokens",
                columns,
                cells,
                raw,
                raw_columns,
                note,
            )
        )
    return tables


def _fields_of(spec: str) -> dict[str, str]:
    from quantbench.report.data import _fields

    return _fields(spec, None)


def memory_table(m: ModelReport) -> Table | None:
    specs = m.specs()
    if not specs:
        return None
    peak: dict[str, tuple[float, str]] = {}
    for t in m.acc:
        for r in t.rows:
            if r.peak_mem_gib is not None:
                peak[r.spec] = (r.peak_mem_gib, r.peak_mem_kind or "")
    bench_peak: dict[str, float] = {}
    for p in m.bench:
        if p.peak_mem_gib is not None:
            bench_peak[p.spec] = max(bench_peak.get(p.spec, 0.0), p.peak_mem_gib)
    base = next((s for s in ("bf16", "fp16", "fp32") if s in specs), None)
    base_w = m.weights(base) if base else None
    base_ppl = m.ppl.get(base, {}).get("ppl") if base else None
    has_ppl = bool(m.ppl)
    columns = [*FIELD_COLUMNS, "Weights GiB", "Size vs " + (base or "baseline"), "Peak mem GiB (eval)"]
    columns += ["Peak GPU GiB (bench)", "Load + quantize s"] + (["Perplexity"] if has_ppl else [])
    raw_columns = [
        "spec",
        *FIELD_COLUMNS,
        "Weights GiB",
        "Size ratio",
        "Peak mem GiB (eval)",
        "Peak mem kind",
    ]
    raw_columns += ["Peak GPU GiB (bench)", "Load + quantize s"] + (["Perplexity"] if has_ppl else [])
    cells, raw = [], []
    for spec in specs:
        fields = m.fields.get(spec) or _fields_of(spec)
        w = m.weights(spec)
        ratio = w / base_w if (w and base_w) else None
        pk, kind = peak.get(spec, (None, ""))
        ppl = m.ppl.get(spec, {}).get("ppl")
        line = [*_field_cells(fields), _f(w, 3), "-" if ratio is None else f"{ratio:.2f}x"]
        line += [
            _f(pk, 2) + (f" ({'RSS' if 'cpu' in kind else 'CUDA'})" if pk is not None else ""),
            _f(bench_peak.get(spec), 2),
        ]
        line += [_f(m.quantize_s.get(spec))]
        raw_line = [
            spec,
            *_field_cells(fields),
            w,
            ratio,
            pk,
            kind,
            bench_peak.get(spec),
            m.quantize_s.get(spec),
        ]
        if has_ppl:
            d = "" if (ppl is None or base_ppl is None or spec == base) else f" ({ppl - base_ppl:+.3f})"
            line.append(_f(ppl, 3) + d)
            raw_line.append(ppl)
        cells.append(line)
        raw.append(raw_line)
    note = (
        "Weights GiB: bytes of every weight as stored (quantized codes, scales, unquantized layers). "
        "Peak mem (eval): RSS high-water mark of the process on CPU (which counts the dequantized 16-bit "
        "copy the CPU evaluation may cache), max allocated on CUDA."
    )
    if has_ppl:
        any_ppl = next(iter(m.ppl.values()))
        note += f" Perplexity: {any_ppl.get('ctx', '?')}-token windows, {any_ppl.get('tokens', '?')} tokens."
    return Table(f"memory-{_slug(m.model)}", "Memory and size", columns, cells, raw, raw_columns, note)


def failures_table(m: ModelReport) -> Table | None:
    if not m.failures:
        return None
    rows = [[f["spec"], f["stage"], (f.get("error") or "")[:200]] for f in m.failures]
    return Table(
        f"failures-{_slug(m.model)}",
        "Failed configurations",
        ["Spec", "Stage", "Error"],
        rows,
        rows,
        ["spec", "stage", "error"],
    )


def close_rows(t: AccTable) -> tuple[list[Any], str]:
    """The rows "within CLOSE_PTS points of the reference" and how that was decided.

    With per-question results the decision uses the paired 95 % interval of the difference
    (:func:`quantbench.eval.stats.within_margin`): a row is in when its lower bound is >= -CLOSE_PTS (shown
    within the margin). When no other row is shown within it, the rows whose upper bound is >= -CLOSE_PTS
    (not shown worse than the margin) are used instead, and the pick says so. Without per-question results
    the point estimates decide, and the pick says that too.
    """
    from quantbench.eval.stats import within_margin

    base = t.baseline
    if base is None:
        return [], ""
    stats = table_stats(t)
    if any(r is not base and stats[r.spec].comparison is None for r in t.rows):
        rows = [r for r in t.rows if 100 * (base.accuracy - r.accuracy) <= CLOSE_PTS]
        return rows, "point estimates: no per-question results stored"
    verdicts = {r.spec: within_margin(stats[r.spec].comparison, CLOSE_PTS) for r in t.rows if r is not base}
    shown = [base] + [r for r in t.rows if verdicts.get(r.spec) == "shown"]
    if len(shown) > 1:
        return shown, "lower 95% bound of the difference >= -1 point"
    maybe = [base] + [r for r in t.rows if verdicts.get(r.spec) == "not excluded"]
    if len(maybe) > 1:
        return (
            maybe,
            "not shown worse by more than 1 point, not shown within it either: evaluate more questions",
        )
    return shown, "no other configuration is shown within 1 point"


def recommendation(m: ModelReport) -> list[str]:
    if not m.acc:
        return []
    t = m.acc[0]
    base = t.baseline
    if not t.rows:
        return []
    out = []
    best = max(t.rows, key=lambda r: r.accuracy)
    out.append(f"Most accurate on {t.task}: **{best.spec}** ({100 * best.accuracy:.1f}%).")
    if base is not None:
        close, how = close_rows(t)
        close = [r for r in close if r.weights_gib]
        if close:
            small = min(close, key=lambda r: r.weights_gib)
            out.append(
                f"Smallest within {CLOSE_PTS:.0f} point of {base.spec}: **{small.spec}** "
                f"({_f(small.weights_gib, 3)} GiB, {100 * small.accuracy:.1f}%; {how})."
            )
        b1 = _latency_by_spec(m)
        fast = [r for r in close if r.spec in b1]
        if fast:
            quick = min(fast, key=lambda r: b1[r.spec][0])
            ms, device = b1[quick.spec]
            out.append(
                f"Fastest within {CLOSE_PTS:.0f} point of {base.spec} ({device}, smallest batch): **{quick.spec}** "
                f"({ms:.2f} ms/token)."
            )
    return out


def _latency_by_spec(m: ModelReport) -> dict[str, tuple[float, str]]:
    """spec -> (next-token ms at the smallest batch, device); the first device group only."""
    if not m.bench:
        return {}
    first = m.bench[0]
    pts = [
        p
        for p in m.bench
        if (p.device, p.input_len, p.output_len) == (first.device, first.input_len, first.output_len)
    ]
    smallest = min(p.batch for p in pts)
    return {
        p.spec: (p.per_token_ms, p.device)
        for p in pts
        if p.batch == smallest and not math.isnan(p.per_token_ms)
    }


def _error_bars(stats: dict[str, Any], rows: list) -> list[tuple[float, float]]:
    """Each row's Wilson 95 % accuracy interval, in points: the plots' error bars."""
    return [(100 * stats[r.spec].accuracy.low, 100 * stats[r.spec].accuracy.high) for r in rows]


def plots_for(m: ModelReport) -> list[Plot]:
    from quantbench.report.plots import category_bars, scatter

    out = []
    lat = _latency_by_spec(m)
    for t in m.acc:
        base = t.baseline
        rows = [r for r in t.rows if r.weights_gib]
        tag = f"{_slug(m.model)}-{t.task}"
        stats = table_stats(t)

        if rows:
            out.append(
                Plot(
                    f"acc-vs-size-{tag}.png",
                    f"{t.task}: accuracy vs weight size",
                    scatter(
                        [r.weights_gib for r in rows],
                        [100 * r.accuracy for r in rows],
                        [label(r.fields) for r in rows],
                        "weights (GiB)",
                        "Avg accuracy %",
                        f"{m.model}: {t.task} accuracy vs weights",
                        None if base is None else 100 * base.accuracy,
                        base.spec if base else "",
                        front=True,
                        intervals=_error_bars(stats, rows),
                    ),
                )
            )
        timed = [r for r in t.rows if r.spec in lat]
        if timed:
            device = lat[timed[0].spec][1]
            out.append(
                Plot(
                    f"acc-vs-latency-{tag}.png",
                    f"{t.task}: accuracy vs ms/token (Pareto front marked)",
                    scatter(
                        [lat[r.spec][0] for r in timed],
                        [100 * r.accuracy for r in timed],
                        [label(r.fields) for r in timed],
                        f"ms per token (decode, smallest batch, {device})",
                        "Avg accuracy %",
                        f"{m.model}: {t.task} accuracy vs decode latency",
                        None if base is None else 100 * base.accuracy,
                        base.spec if base else "",
                        front=True,
                        intervals=_error_bars(stats, timed),
                    ),
                )
            )
        cats = [c for c in t.categories if any(c in r.categories for r in t.rows)]
        if cats:
            series = {label(r.fields): [100 * r.categories.get(c, 0.0) for c in cats] for r in t.rows}
            out.append(
                Plot(
                    f"categories-{tag}.png",
                    f"{t.task}: accuracy per category",
                    category_bars(
                        [SHORT_CATEGORY.get(c, c) for c in cats], series, f"{m.model}: {t.task} by category"
                    ),
                )
            )
    return out


def build(data: ReportData, with_plots: bool = True) -> list[Section]:
    sections = []
    for m in data.models:
        s = Section(m.model)
        s.notes = recommendation(m)
        for t in m.acc:
            s.tables += [accuracy_table(t), stats_table(t)]
        s.tables += latency_tables(m)
        mem = memory_table(m)
        if mem is not None:
            s.tables.append(mem)
        fail = failures_table(m)
        if fail is not None:
            s.tables.append(fail)
        if with_plots:
            s.plots = plots_for(m)
        sections.append(s)
    return sections


# ---------------------------------------------------------------------------------------------------------
# Writers


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def to_markdown(sections: list[Section], data: ReportData, image_dir: str | None = ".") -> str:
    lines = [
        "# quantbench report",
        "",
        f"From `{Path(data.db).name}`, generated {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}.",
        "",
    ]
    for s in sections:
        lines += [f"## {s.title}", ""]
        if s.notes:
            lines += [f"- {n}" for n in s.notes] + [""]
        for t in s.tables:
            lines += [f"### {t.title}", ""]
            lines.append("| " + " | ".join(_md_cell(c) for c in t.columns) + " |")
            lines.append("|" + "|".join("---" for _ in t.columns) + "|")
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in t.cells]
            lines.append("")
            if t.note:
                lines += [t.note, ""]
        if s.plots and image_dir is not None:
            lines += ["### Plots", ""]
            for p in s.plots:
                lines += [f"![{p.title}]({image_dir.rstrip('/')}/{p.name})", ""]
    return "\n".join(lines).rstrip() + "\n"


_BOLD = re.compile(r"[*][*](.+?)[*][*]")
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:.5em 0 .3em;font-size:.9em}
th,td{border:1px solid #ccc;padding:.3em .6em;text-align:right}
th{background:#f3f3f3} td:nth-child(-n+4){text-align:left}
p.note{color:#555;font-size:.85em;margin:.2em 0 1.2em} img{max-width:100%;margin:.5em 1em .5em 0}
""".strip()


def to_html(sections: list[Section], data: ReportData) -> str:
    e = html.escape
    when = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = [
        "<!doctype html><html><head><meta charset='utf-8'><title>quantbench report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>quantbench report</h1>",
        f"<p class='note'>From <code>{e(Path(data.db).name)}</code>, generated {when}.</p>",
    ]
    for s in sections:
        out.append(f"<h2>{e(s.title)}</h2>")
        if s.notes:
            items = "".join("<li>" + _BOLD.sub(r"<b>\1</b>", e(n)) + "</li>" for n in s.notes)
            out.append(f"<ul>{items}</ul>")
        for t in s.tables:
            out.append(f"<h3>{e(t.title)}</h3><table><thead><tr>")
            out.append("".join(f"<th>{e(c)}</th>" for c in t.columns) + "</tr></thead><tbody>")
            for row in t.cells:
                out.append("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>")
            out.append("</tbody></table>")
            if t.note:
                out.append(f"<p class='note'>{e(t.note)}</p>")
        if s.plots:
            out.append("<h3>Plots</h3><div>")
            for p in s.plots:
                b64 = base64.b64encode(p.png).decode()
                out.append(f"<img alt='{e(p.title)}' title='{e(p.title)}' src='data:image/png;base64,{b64}'>")
            out.append("</div>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _csv_value(value: Any) -> Any:
    if isinstance(value, float):
        return "" if math.isnan(value) else round(value, 6)
    return "" if value is None else value


def write_report(data: ReportData, out_dir: str | Path, formats: list[str], plots: bool = True) -> list[Path]:
    """Write the report in each format under ``out_dir``; returns the files written."""
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ReportError(f"unknown format(s) {', '.join(bad) or '(none)'}; allowed: {', '.join(FORMATS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sections = build(data, with_plots=plots and ("md" in formats or "html" in formats))
    written: list[Path] = []
    if "md" in formats:
        for s in sections:
            for p in s.plots:
                (out / p.name).write_bytes(p.png)
                written.append(out / p.name)
        (out / "report.md").write_text(to_markdown(sections, data))
        written.append(out / "report.md")
    if "html" in formats:
        (out / "report.html").write_text(to_html(sections, data))
        written.append(out / "report.html")
    if "csv" in formats:
        for s in sections:
            for t in s.tables:
                path = out / f"{t.name}.csv"
                with path.open("w", newline="") as handle:
                    writer = csv.writer(handle)
                    writer.writerow(t.raw_columns)
                    writer.writerows([[_csv_value(v) for v in row] for row in t.raw])
                written.append(path)
    if "json" in formats:  # every table's numbers (as the CSV files hold them), with titles and notes
        doc = {
            "sections": [
                {
                    "title": s.title,
                    "notes": s.notes,
                    "tables": [
                        {
                            "name": t.name,
                            "title": t.title,
                            "note": t.note,
                            "columns": t.raw_columns,
                            "rows": [[_json_value(v) for v in row] for row in t.raw],
                        }
                        for t in s.tables
                    ],
                }
                for s in sections
            ]
        }
        (out / "report.json").write_text(json.dumps(doc, indent=1) + "\n")
        written.append(out / "report.json")
    return written


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)

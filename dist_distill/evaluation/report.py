"""The comparison table (markdown, the seeds' form: accuracy and its retention, latency, memory) and
the machine-readable results.json of `dd-evaluate`."""

from __future__ import annotations

import json
from pathlib import Path

COLUMNS = [
    ("exact_match", "exact match"), ("mc_acc", "MC acc"), ("mc_acc_norm", "MC acc_norm"),
    ("retention_pct", "retention %"), ("perplexity", "ppl"), ("kl_teacher", "KL to teacher"),
    ("top1_agreement", "top-1 agree"), ("params", "params"), ("weights_mib", "weights MiB"),
    ("peak_memory_mib", "peak MiB"), ("prefill_ms_per_token", "prefill ms/tok"),
    ("decode_ms_per_token", "decode ms/tok"), ("throughput_tokens_per_s", "tok/s @batch"),
]
"""(result key, column title), in table order; a column appears when any record has its key."""

PERCENT = {"exact_match", "mc_acc", "mc_acc_norm", "top1_agreement"}
RETENTION_METRICS = ("exact_match", "mc_acc", "mc_acc_norm")
"""Default retention metric: the first of these that the records carry."""


def add_retention(records: list[dict], reference: str | None, metric: str | None = None) -> str | None:
    """Set ``retention_pct = 100 * record[metric] / reference[metric]`` on every scored record; returns
    the metric used (None: no reference, or no accuracy metric measured). For a lower-is-better metric
    (perplexity, kl_teacher) retention is ``100 * reference / record``."""
    ref = next((r for r in records if r["model"] == reference and "skipped" not in r), None)
    if ref is None:
        return None
    metric = metric or next((m for m in RETENTION_METRICS if m in ref), None)
    if metric is None or metric not in ref:
        return None
    lower_better = metric in ("perplexity", "kl_teacher", "nll")
    for r in records:
        if metric not in r:
            continue
        num, den = (ref[metric], r[metric]) if lower_better else (r[metric], ref[metric])
        r["retention_pct"] = 100 * num / den if den else None
    return metric


def _cell(key: str, value) -> str:
    if value is None:
        return "-"
    if key in PERCENT:
        return f"{100 * value:.1f}%"
    if key == "params":
        return f"{value / 1e6:.3f}M"
    if key in ("perplexity", "kl_teacher"):
        return f"{value:.3f}" if value < 1000 else f"{value:.4g}"
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def format_table(records: list[dict]) -> str:
    """A markdown table: the model column, then each COLUMNS entry that some record has; a skipped
    model's row says why."""
    keys = [(k, t) for k, t in COLUMNS if any(k in r for r in records)]
    header = "| model | " + " | ".join(t for _, t in keys) + " |"
    rule = "|---|" + "|".join("---" for _ in keys) + "|"
    rows = []
    for r in records:
        if "skipped" in r:
            rows.append(f"| {r['model']} | skipped: {r['skipped']} |" + " |" * max(len(keys) - 1, 0))
        else:
            rows.append(f"| {r['model']} | " + " | ".join(_cell(k, r.get(k)) for k, _ in keys) + " |")
    return "\n".join([header, rule] + rows)


def describe(settings: dict) -> str:
    """One line per setting of the run, for the report's notes."""
    return "\n".join(f"- {k}: {v}" for k, v in settings.items() if v is not None)


def write_report(out: str | Path, records: list[dict], title: str, settings: dict,
                 plots: list[Path] | None = None) -> tuple[Path, Path]:
    """Write ``out/report.md`` (title, table, settings, plot links relative to `out`) and
    ``out/results.json`` ({"settings", "results": one record per model}); returns both paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / "report.md", out / "results.json"
    js.write_text(json.dumps({"settings": settings, "results": records}, indent=2) + "\n")
    text = [f"# {title}", "", format_table(records), "", "## Settings", "", describe(settings), ""]
    if plots:
        text += ["## Training curves (from the runs' TensorBoard event files)", ""]
        for p in plots:
            rel = Path(p).resolve().relative_to(out.resolve()) if Path(p).resolve().is_relative_to(out.resolve()) else p
            text += [f"![{Path(p).stem}]({rel})", ""]
    md.write_text("\n".join(text))
    return md, js

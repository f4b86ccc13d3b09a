"""The comparison table of evaluated models (markdown)."""

from __future__ import annotations

COLUMNS = [("model", "model"), ("accuracy", "held-out acc"), ("perplexity", "ppl"), ("params", "params"),
           ("latency_ms_per_token", "latency ms/tok"), ("memory_mib", "weights MiB"), ("retention_pct", "retention %")]



def format_table(records: list[dict]) -> str:
    """A markdown table of the records, in COLUMNS order."""
    def cell(key, value):
        if value is None:
            return "-"
        if key == "accuracy":
            return f"{100 * value:.1f}%"
        if key == "params":
            return f"{value / 1e6:.3f}M"
        if isinstance(value, float):
            return f"{value:.2f}" if key != "perplexity" else f"{value:.3f}"
        return str(value)

    header = "| " + " | ".join(title for _, title in COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in COLUMNS) + "|"
    rows = ["| " + " | ".join(cell(k, r.get(k)) for k, _ in COLUMNS) + " |" for r in records]
    return "\n".join([header, rule] + rows)


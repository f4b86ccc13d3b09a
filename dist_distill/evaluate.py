"""Evaluate models on held-out prompt/answer data and write a comparison table.

For each model: held-out accuracy (greedy answer == reference answer, exact), perplexity
of the reference answer tokens (teacher forcing), parameters, decoding latency (ms per
generated token, batch 1, KV cache) and weights memory (MiB); with a reference model, the
retention of its accuracy in %. Writes ``report.md`` and ``results.json`` (one record per
model, metric names as keys) to ``--out`` and prints the table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dist_distill.errors import UserError, run_cli
from dist_distill.evaluation.metrics import evaluate_model
from dist_distill.evaluation.report import format_table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dd-evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", required=True, metavar="NAME=DIR",
                        help="a model to evaluate, as name=directory (repeatable; table order)")
    parser.add_argument("--data", required=True, help="held-out prompt/answer data (.jsonl/.parquet or hub name)")
    parser.add_argument("--reference", default=None, help="NAME of the model whose accuracy retention is measured against")
    parser.add_argument("--out", required=True, help="directory for report.md and results.json")
    parser.add_argument("--prompt-field", default="prompt", help="record field with the prompt")
    parser.add_argument("--answer-field", default="answer", help="record field with the reference answer")
    parser.add_argument("--max-samples", type=int, default=None, help="evaluate on the first N records only")
    parser.add_argument("--title", default="Held-out evaluation", help="heading of report.md")
    args = parser.parse_args(argv)
    models = []
    for item in args.model:
        if "=" not in item:
            raise UserError(f"--model {item!r}: expected NAME=DIR, e.g. --model student=runs/x/model")
        models.append(tuple(item.split("=", 1)))
    names = [n for n, _ in models]
    if args.reference is not None and args.reference not in names:
        raise UserError(f"--reference {args.reference!r} is not one of the --model names ({', '.join(names)})")
    records = [evaluate_model(name, path, args.data, args) for name, path in models]
    ref = next((r for r in records if r["model"] == args.reference), None)
    for r in records:
        r["retention_pct"] = 100 * r["accuracy"] / ref["accuracy"] if ref and ref["accuracy"] > 0 else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = format_table(records)
    (out / "results.json").write_text(json.dumps(records, indent=2) + "\n")
    (out / "report.md").write_text(f"# {args.title}\n\nData: {args.data} ({records[0]['num_samples']} samples)\n\n"
                                   f"{table}\n")
    print(table)
    print(f"\nreport: {out / 'report.md'}\nresults (JSON): {out / 'results.json'}")
    return 0


def cli() -> None:
    """Console-script entry point: bad input exits 2 with a one-paragraph message."""
    raise SystemExit(run_cli(main, "dd-evaluate"))


if __name__ == "__main__":
    cli()

"""Evaluate models side by side and write the comparison table (report.md, results.json, plots).

Models: ``--model NAME=DIR`` (repeatable, table order): an HF directory or hub name, a committed
``<run>/checkpoints/step-N``, with ``@8bit`` / ``@4bit`` for a bitsandbytes load (skipped with the
reason where the device does not support it). Metrics (``--metrics``, comma-separated; default: the
quality metrics whose data is given, params and memory):

  perplexity   exp(mean NLL) of held-out text (--data: a text field, or prompt/answer records; read
               through the token store, tokenized once by all ranks together)
  kl           KL(teacher || model) at T=1 and top-1 agreement on the same tokens (--teacher NAME)
  mc           multiple-choice accuracy by log-likelihood, sum (acc) and per character (acc_norm) (--mc-data)
  exact_match  greedy generated answer == reference answer, batched (--qa-data, or --data prompt/answer)
  latency      batch-1 ms per token, prefill and decode separately (rank 0)
  throughput   generated tokens/s at batch --throughput-batch (rank 0)
  memory       peak memory while the model is evaluated (CUDA allocator, or sampled RSS on CPU)
  params       parameters and weight MiB

Under torchrun the quality metrics are split over the ranks and all-reduced (the same numbers as one
process); rank 0 writes the outputs. ``--runs LABEL=DIR`` draws the runs' TensorBoard curves as PNGs
linked from the report.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dist_distill.errors import UserError, run_cli
from dist_distill.evaluation.runner import (METRICS, EvalInputs, check_names, evaluate_models, parse_model_arg,
                                            parse_pairs, select_metrics)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="dd-evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--model", action="append", required=True, metavar="NAME=DIR[@8bit|@4bit]",
                   help="a model to evaluate (repeatable; table order)")
    p.add_argument("--data", default=None, help="held-out text for perplexity/KL: .jsonl/.parquet/... or hub name")
    p.add_argument("--qa-data", default=None, help="prompt/answer records for exact_match (default: --data)")
    p.add_argument("--mc-data", default=None, help="MMLU-format records (question, choices, answer) for mc")
    p.add_argument("--split", default="train", help="split of a hub dataset (local files always give train)")
    p.add_argument("--metrics", default=None, help=f"comma-separated, from: {', '.join(METRICS)}")
    p.add_argument("--teacher", default=None, metavar="NAME", help="the --model whose distribution kl compares to")
    p.add_argument("--reference", default=None, metavar="NAME", help="the --model whose accuracy retention is measured against")
    p.add_argument("--retention-metric", default=None,
                   help="metric of the retention column (default: the first of exact_match, mc_acc, mc_acc_norm)")
    p.add_argument("--out", required=True, help="directory for report.md, results.json and plots/")
    p.add_argument("--title", default="Held-out evaluation", help="heading of report.md")
    p.add_argument("--runs", action="append", default=[], metavar="LABEL=DIR",
                   help="a training run's output.dir whose TensorBoard curves are plotted into the report (repeatable)")
    p.add_argument("--text-field", default="text", help="record field with plain text (perplexity, kl)")
    p.add_argument("--prompt-field", default="prompt", help="record field with the prompt")
    p.add_argument("--answer-field", default="answer", help="record field with the reference answer")
    p.add_argument("--mc-question-field", default="question", help="multiple-choice question field")
    p.add_argument("--mc-choices-field", default="choices", help="multiple-choice field with the list of choices")
    p.add_argument("--mc-answer-field", default="answer", help="multiple-choice answer field (index or letter)")
    p.add_argument("--mc-continuation", default="letter", choices=["letter", "text", "continue"],
                   help="score the letters after a lettered prompt (MMLU, lm-eval-harness), each choice's text after "
                        "'Answer:', or each choice's text as the question's continuation (cloze)")
    p.add_argument("--max-samples", type=int, default=None, help="use the first N records of each data set")
    p.add_argument("--max-len", type=int, default=512, help="truncate text records to this many tokens")
    p.add_argument("--store-dir", default=None,
                   help="token store folder for --data (default: $DD_DATA_STORE, else ~/.cache/dist_distill/token_store; "
                        "tokenized once, then mapped by every process)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward (perplexity, kl, mc)")
    p.add_argument("--gen-batch-size", type=int, default=32, help="prompts per batched generate (exact_match)")
    p.add_argument("--latency-prompts", type=int, default=8, help="prompts timed at batch 1 (median)")
    p.add_argument("--new-tokens", type=int, default=16, help="tokens generated per timed prompt")
    p.add_argument("--throughput-batch", type=int, default=16, help="batch size N of the throughput metric")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weights dtype")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    for name in ("max_samples", "max_len", "batch_size", "gen_batch_size", "latency_prompts", "new_tokens",
                 "throughput_batch"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')}={value}: must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    from dist_distill.evaluation.report import add_retention, format_table, write_report
    from dist_distill.training.distributed import init_from_env

    args = parse_args(argv)
    entries = [parse_model_arg(m) for m in args.model]
    check_names(entries, {"--reference": args.reference, "--teacher": args.teacher})
    runs = parse_pairs(args.runs, "--runs", "--runs distilled=runs/quickstart/student_distill")
    metrics = select_metrics(args.metrics, args.data is not None, args.teacher is not None, args.mc_data is not None,
                             args.qa_data is not None or args.data is not None)
    if not (args.data or args.qa_data or args.mc_data) and set(metrics) - {"params", "memory"}:
        raise UserError("give held-out data: --data, --qa-data or --mc-data")
    inputs = EvalInputs(**{k: getattr(args, k) for k in EvalInputs.__dataclass_fields__ if hasattr(args, k)},
                        progress=not args.no_progress)
    rank, _ = init_from_env(timeout_s=7200.0)  # other ranks wait while rank 0 alone times latency/throughput
    records = evaluate_models(entries, inputs, metrics, args.teacher)
    if rank != 0:
        return 0
    metric = add_retention(records, args.reference, args.retention_metric)
    plots = []
    if runs:
        from dist_distill.evaluation.plots import plot_runs

        plots = plot_runs(runs, Path(args.out) / "plots")
    settings = {"metrics": ", ".join(metrics), "data": args.data, "qa_data": args.qa_data, "mc_data": args.mc_data,
                "teacher (kl)": args.teacher, "retention": f"{metric} relative to {args.reference}" if metric else None,
                "max_samples": args.max_samples, "dtype": args.dtype,
                "samples": {k: records[0].get(k) for k in ("tokens", "mc_questions", "qa_samples") if k in records[0]}
                or None}
    md, js = write_report(args.out, records, args.title, settings, plots)
    print(format_table(records))
    print(f"\nreport: {md}\nresults (JSON): {js}")
    for p in plots:
        print(f"plot: {p}")
    return 0


def cli() -> None:
    """Console-script entry point: bad input exits 2 with a one-paragraph message."""
    raise SystemExit(run_cli(main, "dd-evaluate"))


if __name__ == "__main__":
    cli()

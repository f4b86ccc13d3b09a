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
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import UserError, run_cli

COLUMNS = [("model", "model"), ("accuracy", "held-out acc"), ("perplexity", "ppl"), ("params", "params"),
           ("latency_ms_per_token", "latency ms/tok"), ("memory_mib", "weights MiB"), ("retention_pct", "retention %")]


@dataclass
class EvalData:
    """prompts: list of token-id lists (with BOS); answers: list of token-id lists (answer + EOS)."""

    prompts: list[list[int]]
    answers: list[list[int]]


def load_eval_data(path: str, tokenizer, prompt_field: str, answer_field: str, max_samples: int | None) -> EvalData:
    from .data import load_records

    records = load_records(path, max_samples=max_samples)
    for name in (prompt_field, answer_field):
        if name not in records.column_names:
            raise UserError(f"eval data {path}: records have no field {name!r} (fields: {', '.join(records.column_names)})")
    prompts = tokenizer(list(records[prompt_field]))["input_ids"]
    answers = [a + [tokenizer.eos_token_id] for a in
               tokenizer(list(records[answer_field]), add_special_tokens=False)["input_ids"]]
    return EvalData(prompts, answers)


def _left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s)
        mask[i, width - len(s):] = 1
    return ids, mask


@torch.no_grad()
def accuracy(model, data: EvalData, pad_id: int, eos_id: int, batch_size: int = 128) -> float:
    """Fraction of prompts whose greedy continuation up to EOS equals the reference answer exactly."""
    correct = 0
    max_new = max(len(a) for a in data.answers)
    for start in range(0, len(data.prompts), batch_size):
        prompts = data.prompts[start:start + batch_size]
        ids, mask = _left_pad(prompts, pad_id)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                             pad_token_id=pad_id, eos_token_id=eos_id)[:, ids.shape[1]:]
        for row, answer in zip(out.tolist(), data.answers[start:start + batch_size]):
            correct += row[:len(answer)] == answer
    return correct / len(data.prompts)


@torch.no_grad()
def perplexity(model, data: EvalData, pad_id: int, vocab_size: int, batch_size: int = 128) -> float:
    """exp(mean cross-entropy of the answer tokens given prompt and preceding answer tokens), real vocab only."""
    total, count = 0.0, 0
    for start in range(0, len(data.prompts), batch_size):
        seqs = [p + a for p, a in zip(data.prompts[start:start + batch_size], data.answers[start:start + batch_size])]
        ids, mask = _left_pad(seqs, pad_id)
        targets = torch.full_like(ids, -100)
        for i, a in enumerate(data.answers[start:start + batch_size]):
            targets[i, ids.shape[1] - len(a) - 1:ids.shape[1] - 1] = torch.tensor(a)
        logits = model(input_ids=ids, attention_mask=mask).logits[..., :vocab_size].float()
        total += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
        count += int((targets != -100).sum())
    return math.exp(total / count)


@torch.no_grad()
def latency_ms_per_token(model, data: EvalData, pad_id: int, num_prompts: int = 16, new_tokens: int = 8) -> float:
    """Wall time of batch-1 greedy decoding with KV cache, ms per generated token (median over prompts)."""
    times = []
    for prompt in data.prompts[:num_prompts + 1]:
        ids = torch.tensor([prompt])
        begin = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_id)
        times.append((time.perf_counter() - begin) * 1000 / new_tokens)
    return sorted(times[1:])[len(times[1:]) // 2]  # the first call warms up


def evaluate_model(name: str, path: str, data_path: str, args) -> dict:
    """All metrics of one model directory."""
    from .models import load_model, load_tokenizer
    from .recipe import ModelSpec

    spec = ModelSpec(name_or_path=path, dtype="float32", attn_implementation="sdpa")
    tokenizer = load_tokenizer(spec, f"--model {name}")
    model = load_model(spec, f"--model {name}").eval()
    data = load_eval_data(data_path, tokenizer, args.prompt_field, args.answer_field, args.max_samples)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    weights = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    return {
        "model": name, "path": path,
        "accuracy": accuracy(model, data, pad, eos),
        "perplexity": perplexity(model, data, pad, len(tokenizer)),
        "params": sum(p.numel() for p in model.parameters()),
        "latency_ms_per_token": latency_ms_per_token(model, data, pad),
        "memory_mib": weights / 2**20,
        "num_samples": len(data.prompts),
    }


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

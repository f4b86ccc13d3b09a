"""Metrics of one model on held-out prompt/answer data: exact-match accuracy, perplexity, latency."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dist_distill.errors import UserError

@dataclass
class EvalData:
    """prompts: list of token-id lists (with BOS); answers: list of token-id lists (answer + EOS)."""

    prompts: list[list[int]]
    answers: list[list[int]]


def load_eval_data(path: str, tokenizer, prompt_field: str, answer_field: str, max_samples: int | None) -> EvalData:
    from dist_distill.data.records import load_records

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
    from dist_distill.models.loading import load_model, load_tokenizer
    from dist_distill.recipe import ModelSpec

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


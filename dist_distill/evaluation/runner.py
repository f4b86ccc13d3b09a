"""Evaluate a set of models (teacher, base student, distilled student, ...) on the metrics a user picks.

A model is named on the command line as ``NAME=PATH[@8bit|@4bit]``: PATH is a Hugging Face model
directory (or hub name), or a committed DeepSpeed checkpoint of a training run
(``<run>/checkpoints/step-N``, consolidated to a temporary HF directory with the run's initial
student config and tokenizer); ``@8bit`` / ``@4bit`` load it through bitsandbytes (LLM.int8 / NF4).
A variant the device does not support is skipped with the reason in its row.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dist_distill.errors import UserError
from dist_distill.evaluation import metrics as M

METRICS = ("perplexity", "kl", "mc", "exact_match", "latency", "throughput", "memory", "params")
"""What dd-evaluate can measure: perplexity (held-out text), kl (KL to the teacher and top-1 agreement on
the same text), mc (multiple-choice accuracy), exact_match (generated answers), latency (batch-1 prefill and
decode), throughput (tokens/s at batch N), memory (peak during evaluation), params (parameters, weight MiB)."""


@dataclass
class ModelEntry:
    """One model of the table: its name, where it is, and an optional bitsandbytes load ("8bit"/"4bit")."""

    name: str
    path: str
    quantize: str | None = None


def parse_model_arg(text: str) -> ModelEntry:
    """``NAME=PATH[@8bit|@4bit]`` -> ModelEntry; a clear error otherwise."""
    if "=" not in text:
        raise UserError(f"--model {text!r}: expected NAME=DIR, e.g. --model student=runs/x/model "
                        "(optionally DIR@8bit or DIR@4bit for a bitsandbytes-quantised load)")
    name, path = text.split("=", 1)
    quantize = None
    for suffix in ("@8bit", "@4bit"):
        if path.endswith(suffix):
            path, quantize = path[:-len(suffix)], suffix[1:]
    if not name or not path:
        raise UserError(f"--model {text!r}: NAME and DIR must both be non-empty")
    return ModelEntry(name, path, quantize)


def check_names(entries: list[ModelEntry], refs: dict[str, str | None]) -> None:
    """Model names are unique, and each flag in `refs` ({flag: name or None}) names one of them."""
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise UserError(f"--model names must be unique, got {', '.join(names)}")
    for flag, value in refs.items():
        if value is not None and value not in names:
            raise UserError(f"{flag} {value!r} is not one of the --model names ({', '.join(names)})")


def parse_pairs(items: list[str], flag: str, example: str) -> dict[str, str]:
    """``LABEL=VALUE`` arguments -> {label: value}, in order; a clear error otherwise."""
    out = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"{flag} {item!r}: expected LABEL=DIR, e.g. {example}")
        label, value = item.split("=", 1)
        out[label] = value
    return out


def select_metrics(text: str | None, have_text: bool, have_teacher: bool, have_mc: bool, have_qa: bool) -> list[str]:
    """The metrics to run: the comma-separated `text` (validated against METRICS), or by default every
    quality metric whose data was given plus params and memory (never latency/throughput/generation
    unless asked: they are the slow ones)."""
    if text is None:
        picked = (["perplexity"] if have_text else []) + (["kl"] if have_text and have_teacher else []) \
            + (["mc"] if have_mc else []) + ["params", "memory"]
        return picked
    picked = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in picked if m not in METRICS]
    if unknown:
        raise UserError(f"--metrics: unknown metric {unknown[0]!r}; choose from {', '.join(METRICS)}")
    needs = {"perplexity": (have_text, "--data"), "kl": (have_text and have_teacher, "--data and --teacher"),
             "mc": (have_mc, "--mc-data"), "exact_match": (have_qa, "--qa-data (or --data with prompt/answer records)"),
             "latency": (have_text or have_qa, "--data or --qa-data (its prompts are timed)"),
             "throughput": (have_text or have_qa, "--data or --qa-data (its prompts are timed)")}
    for m in picked:
        ok, what = needs.get(m, (True, ""))
        if not ok:
            raise UserError(f"--metrics {m} needs {what}")
    return picked


def checkpoint_to_hf(path: Path, workdir: Path) -> Path:
    """A committed ``checkpoints/step-N`` of a training run, consolidated into an HF directory under
    `workdir` (the run's recipe.yaml names the student's initial directory: config and tokenizer)."""
    from dist_distill.models.export import export_checkpoint
    from dist_distill.recipe import load_recipe
    from dist_distill.training.checkpoint import COMMIT_MARKER

    if not (path / COMMIT_MARKER).is_file():
        raise UserError(f"{path} is neither a model directory (config.json) nor a committed checkpoint "
                        f"({COMMIT_MARKER} marker)")
    recipe = load_recipe(path / "recipe.yaml")
    return export_checkpoint(path.parent, recipe.student.name_or_path, workdir / path.name, tag=path.name)


def load_entry(entry: ModelEntry, dtype: str, workdir: Path):
    """(model in eval mode, tokenizer) of an entry. Raises UserError for a bad path; RuntimeError-like
    errors of a quantised load are re-raised as `QuantizationUnsupported`."""
    from dist_distill.models.export import outside_zero3_init
    from dist_distill.models.loading import load_model, load_tokenizer
    from dist_distill.recipe import ModelSpec
    from dist_distill.teacher.colocated import bnb_kwargs

    path = Path(entry.path).expanduser()
    if path.is_dir() and not (path / "config.json").is_file():
        path = checkpoint_to_hf(path, workdir)
    spec = ModelSpec(name_or_path=str(path) if path.exists() else entry.path, dtype=dtype, attn_implementation="sdpa")
    tokenizer = load_tokenizer(spec, f"--model {entry.name}")
    kwargs = {}
    if entry.quantize:
        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        kwargs = bnb_kwargs(entry.quantize, device, f"--model {entry.name} @{entry.quantize}")
    try:
        with outside_zero3_init():
            model = load_model(spec, f"--model {entry.name}", **kwargs)
        if entry.quantize:  # a quantised model that loads but cannot run forward on this device is unsupported too
            with torch.no_grad():
                model(input_ids=torch.tensor([[tokenizer.eos_token_id or 0] * 2], device=M._device(model)))
    except (RuntimeError, ValueError, NotImplementedError, ImportError, AssertionError) as err:
        if entry.quantize:
            raise QuantizationUnsupported(f"{entry.quantize} via bitsandbytes is not supported here: "
                                          f"{str(err).splitlines()[0][:160]}") from None
        raise
    if not torch.cuda.is_available() or entry.quantize:
        return model.eval(), tokenizer
    return model.to("cuda").eval(), tokenizer


class QuantizationUnsupported(Exception):
    """A bitsandbytes variant this device cannot load or run; its row is skipped with the reason."""


@dataclass
class EvalInputs:
    """Everything `evaluate_models` reads: data sources, field names and sizes (see dd-evaluate --help)."""

    data: str | None = None
    qa_data: str | None = None
    mc_data: str | None = None
    split: str = "train"
    text_field: str = "text"
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    mc_question_field: str = "question"
    mc_choices_field: str = "choices"
    mc_answer_field: str = "answer"
    mc_continuation: str = "letter"
    max_samples: int | None = None
    max_len: int = 512
    store_dir: str | None = None
    batch_size: int = 8
    gen_batch_size: int = 32
    latency_prompts: int = 8
    new_tokens: int = 16
    throughput_batch: int = 16
    dtype: str = "float32"
    progress: bool = True


class _Data:
    """The tokenized datasets, built once with the first model's tokenizer (all models must share it)."""

    def __init__(self, inputs: EvalInputs, tokenizer, needed: list[str]):
        from dist_distill.evaluation import data as D

        i = inputs
        self.sequences = self.qa = self.mc = None
        if i.data and ({"perplexity", "kl"} & set(needed)):
            self.sequences = D.load_sequences(i.data, tokenizer, text_field=i.text_field, prompt_field=i.prompt_field,
                                              answer_field=i.answer_field, max_len=i.max_len,
                                              max_samples=i.max_samples, split=i.split, store_dir=i.store_dir)
        qa_source = i.qa_data or i.data
        if "exact_match" in needed:
            self.qa = D.load_qa(qa_source, tokenizer, prompt_field=i.prompt_field, answer_field=i.answer_field,
                                max_samples=i.max_samples, split=i.split)
        if "mc" in needed:
            self.mc = D.load_multiple_choice(i.mc_data, tokenizer, question_field=i.mc_question_field,
                                             choices_field=i.mc_choices_field, answer_field=i.mc_answer_field,
                                             continuation=i.mc_continuation, max_samples=i.max_samples, split=i.split)
        if {"latency", "throughput"} & set(needed):
            if self.qa is not None:
                self.prompts = self.qa[0]
            elif self.sequences is not None:  # scored sequences: the first half of each is the prompt
                self.prompts = [s[:max(len(s) // 2, 1)] for s in self.sequences.ids[:64]]
            else:
                self.prompts = D.load_qa(qa_source, tokenizer, prompt_field=i.prompt_field,
                                         answer_field=i.answer_field, max_samples=64, split=i.split)[0]


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def evaluate_models(entries: list[ModelEntry], inputs: EvalInputs, metrics: list[str],
                    teacher: str | None = None) -> list[dict]:
    """One record per entry, in order: {"model", "path", <metric keys>, "seconds"} or {"skipped": why}.

    With "kl" the `teacher` entry is loaded once and kept while each other model is scored against it
    (on the same batches, both forwards). Memory is measured over the model's own metrics only.
    """
    from dist_distill.models.loading import tokenizer_fingerprint

    records, data, fingerprint = [], None, None
    teacher_model = None
    with tempfile.TemporaryDirectory(prefix="dd-evaluate-") as tmp:
        workdir = Path(tmp)
        if "kl" in metrics:
            t_entry = next(e for e in entries if e.name == teacher)
            teacher_model, t_tok = load_entry(t_entry, inputs.dtype, workdir)
            teacher_model.requires_grad_(False)
            fingerprint = tokenizer_fingerprint(t_tok)
        for entry in entries:
            begin = time.time()
            M.release_memory()
            record = {"model": entry.name, "path": entry.path + (f"@{entry.quantize}" if entry.quantize else "")}
            try:
                with M.PeakMemory() as mem:
                    model, tok = load_entry(entry, inputs.dtype, workdir)
                    if fingerprint is None:
                        fingerprint = tokenizer_fingerprint(tok)
                    elif tokenizer_fingerprint(tok) != fingerprint:
                        raise UserError(f"--model {entry.name}: its tokenizer differs from the first model's; the "
                                        "table compares models on the same token ids (and KL needs one vocabulary)")
                    if data is None:
                        data = _Data(inputs, tok, metrics)
                    record.update(_own_metrics(model, tok, data, inputs, metrics))
            except QuantizationUnsupported as err:
                print(f"dd-evaluate: skipping {entry.name}: {err}", flush=True)
                records.append(dict(record, skipped=str(err)))
                continue
            if "memory" in metrics:
                record["peak_memory_mib"] = mem.peak_mib
            if "kl" in metrics:
                if entry.name == teacher:
                    record.update(kl_teacher=0.0, top1_agreement=1.0)
                else:
                    record.update(M.teacher_agreement(teacher_model, model, data.sequences, _pad_id(tok), len(tok),
                                                      inputs.batch_size, inputs.progress))
            record["seconds"] = time.time() - begin
            records.append(record)
            del model
    return records


def _own_metrics(model, tok, data: _Data, i: EvalInputs, metrics: list[str]) -> dict:
    """The metrics of one model alone (everything but KL), in a fixed order."""
    out, pad, vocab = {}, _pad_id(tok), len(tok)
    if "params" in metrics or "memory" in metrics:
        out.update(params=M.parameter_count(model), weights_mib=M.weights_mib(model))
    if "perplexity" in metrics:
        out.update(M.perplexity(model, data.sequences, pad, vocab, i.batch_size, i.progress))
    if "mc" in metrics:
        out.update(M.multiple_choice(model, data.mc, pad, vocab, i.batch_size, i.progress))
    if "exact_match" in metrics:
        out.update(M.exact_match(model, *data.qa, pad, tok.eos_token_id, i.gen_batch_size, i.progress))
    rank = M.rank_world()[0]
    if "latency" in metrics and rank == 0:
        out.update(M.latency(model, data.prompts, i.latency_prompts, i.new_tokens))
    if "throughput" in metrics and rank == 0:
        out.update(M.throughput(model, data.prompts, pad, i.throughput_batch, i.new_tokens))
    return out

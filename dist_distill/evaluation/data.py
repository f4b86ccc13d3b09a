"""Held-out data for evaluation, as token ids.

Three shapes, each from a local file (jsonl/json/parquet/arrow/csv) or a hub dataset through
:func:`read_records` (the one place records are read; swap it for another store):

- scored sequences (perplexity, KL to the teacher, top-1 agreement): records with a text field
  (every token after the first is scored) or prompt/answer records (the answer tokens and EOS
  are scored, given the prompt);
- question/answer pairs (exact match of a generated answer);
- multiple choice in the MMLU format: a question, a list of choices, and the answer as an index
  (``0``-based int, as in ``cais/mmlu``) or a letter (``"A"``, ``"B"``, ...).
"""

from __future__ import annotations

import string
from dataclasses import dataclass

from dist_distill.errors import UserError


def read_records(source: str, split: str = "train", max_samples: int | None = None):
    """Records (a `datasets.Dataset`) of a local file or a hub dataset; the only data access here."""
    from dist_distill.data.records import load_records

    return load_records(source, split=split, max_samples=max_samples)


def _require(records, source: str, fields: list[str], flags: list[str]) -> None:
    for name, flag in zip(fields, flags):
        if name not in records.column_names:
            raise UserError(f"eval data {source}: records have no field {name!r} (fields: "
                            f"{', '.join(records.column_names)}); set {flag}")


@dataclass
class Sequences:
    """Token sequences to score: ``ids[i]`` (list of int token ids); tokens ``ids[i][start[i]:]``
    are scored, each predicted from the tokens before it (``1 <= start[i] < len(ids[i])``)."""

    ids: list[list[int]]
    start: list[int]

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_tokens(self) -> int:
        return sum(len(s) - b for s, b in zip(self.ids, self.start))


def load_sequences(source: str, tokenizer, *, text_field: str = "text", prompt_field: str = "prompt",
                   answer_field: str = "answer", max_len: int = 512, max_samples: int | None = None,
                   split: str = "train") -> Sequences:
    """Sequences for perplexity and KL: a `text_field` record is scored from its second token on,
    truncated to `max_len` tokens; a prompt/answer record scores answer + EOS given the prompt."""
    records = read_records(source, split, max_samples)
    ids, start = [], []
    if text_field in records.column_names:
        for i, seq in enumerate(tokenizer(list(records[text_field]))["input_ids"]):
            seq = seq[:max_len]
            if len(seq) >= 2:
                ids.append(seq)
                start.append(1)
    else:
        if prompt_field not in records.column_names:
            raise UserError(f"eval data {source}: records have neither a text field {text_field!r} nor a prompt "
                            f"field {prompt_field!r} (fields: {', '.join(records.column_names)}); set --text-field, "
                            "or --prompt-field and --answer-field")
        _require(records, source, [answer_field], ["--answer-field"])
        for prompt, answer in zip(*qa_token_ids(records, tokenizer, prompt_field, answer_field)):
            seq = (prompt + answer)[:max_len]
            if len(prompt) < len(seq):
                ids.append(seq)
                start.append(max(len(prompt), 1))
    if not ids:
        raise UserError(f"eval data {source}: no record has a token to score")
    return Sequences(ids, start)


def qa_token_ids(records, tokenizer, prompt_field: str, answer_field: str) -> tuple[list[list[int]], list[list[int]]]:
    """(prompts with the tokenizer's special tokens, answers + EOS), token ids."""
    if tokenizer.eos_token_id is None:
        raise UserError("the model's tokenizer has no eos_token: answers cannot be terminated")
    prompts = tokenizer(list(records[prompt_field]))["input_ids"]
    answers = tokenizer(list(records[answer_field]), add_special_tokens=False)["input_ids"]
    return prompts, [a + [tokenizer.eos_token_id] for a in answers]


def load_qa(source: str, tokenizer, *, prompt_field: str = "prompt", answer_field: str = "answer",
            max_samples: int | None = None, split: str = "train") -> tuple[list[list[int]], list[list[int]]]:
    """(prompts, answers + EOS) token ids of prompt/answer records, for exact match."""
    records = read_records(source, split, max_samples)
    _require(records, source, [prompt_field, answer_field], ["--prompt-field", "--answer-field"])
    return qa_token_ids(records, tokenizer, prompt_field, answer_field)


@dataclass
class ChoiceItem:
    """One multiple-choice question: context token ids, one continuation per choice (token ids and
    its text, whose length in characters normalises acc_norm), and the index of the right one."""

    context: list[int]
    continuations: list[list[int]]
    texts: list[str]
    label: int


def format_question(question: str, choices: list[str]) -> str:
    """The MMLU prompt of lm-evaluation-harness: question, lettered choices, then "Answer:"."""
    lines = [question.strip()] + [f"{string.ascii_uppercase[i]}. {c}" for i, c in enumerate(choices)]
    return "\n".join(lines) + "\nAnswer:"


def _label(value, n: int, source: str, i: int) -> int:
    if isinstance(value, str) and len(value.strip()) == 1 and value.strip().upper() in string.ascii_uppercase[:n]:
        return string.ascii_uppercase.index(value.strip().upper())
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < n:
        return value
    raise UserError(f"multiple-choice data {source}: record {i} has answer {value!r}; expected a 0-based index "
                    f"below {n} or a letter A-{string.ascii_uppercase[n - 1]}")


def load_multiple_choice(source: str, tokenizer, *, question_field: str = "question", choices_field: str = "choices",
                         answer_field: str = "answer", continuation: str = "letter", max_samples: int | None = None,
                         split: str = "train") -> list[ChoiceItem]:
    """MMLU-format records -> ChoiceItems. continuation="letter": the choices are " A", " B", ... after
    the lettered prompt (lm-evaluation-harness's MMLU); "text": each choice's own text after
    "question\\nAnswer:" (the ARC style, where acc_norm matters); "continue": each choice's text right
    after the question, which is a context to complete (the HellaSwag / cloze style)."""
    if continuation not in ("letter", "text", "continue"):
        raise UserError(f"--mc-continuation {continuation!r}: expected letter, text or continue")
    records = read_records(source, split, max_samples)
    _require(records, source, [question_field, choices_field, answer_field],
             ["--mc-question-field", "--mc-choices-field", "--mc-answer-field"])
    items = []
    for i, rec in enumerate(records):
        choices = rec[choices_field]
        if not isinstance(choices, list) or len(choices) < 2 or len(choices) > 26:
            raise UserError(f"multiple-choice data {source}: record {i} field {choices_field!r} is {choices!r}; "
                            "expected a list of 2 to 26 choice strings")
        choices = [str(c) for c in choices]
        if continuation == "letter":
            context, texts = format_question(rec[question_field], choices), \
                [f" {string.ascii_uppercase[j]}" for j in range(len(choices))]
        elif continuation == "text":
            context, texts = f"{rec[question_field].strip()}\nAnswer:", [f" {c}" for c in choices]
        else:
            context, texts = rec[question_field].strip(), [f" {c}" for c in choices]
        items.append(ChoiceItem(tokenizer(context)["input_ids"],
                                [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts], texts,
                                _label(rec[answer_field], len(choices), source, i)))
    if not items:
        raise UserError(f"multiple-choice data {source} holds no records")
    return items

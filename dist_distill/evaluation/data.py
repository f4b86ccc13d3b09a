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

import dataclasses
import string
from dataclasses import dataclass

import numpy as np

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
    are scored, each predicted from the tokens before it (``1 <= start[i] < len(ids[i])``).
    `ids` is a list, or a `StoreSequences` reading each sequence from the token store when indexed."""

    ids: list[list[int]]
    start: list[int]

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_tokens(self) -> int:
        return sum(len(s) - b for s, b in zip(self.ids, self.start))


class StoreSequences:
    """The samples of a token store as lists of token ids, read with pread when indexed (an int gives one
    list, a slice a list of lists); nothing but the offsets is held, whatever the store's size."""

    def __init__(self, store):
        self.store = store

    def __len__(self) -> int:
        return len(self.store)

    def _one(self, i: int) -> list[int]:
        a, b = int(self.store.offsets[i]), int(self.store.offsets[i + 1])
        return self.store._pread("tokens", "uint32", a, b).tolist()

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self._one(i) for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(f"sequence {index} out of range for {len(self)}")
        return self._one(index % len(self))

    def __iter__(self):
        return (self._one(i) for i in range(len(self)))


def _store_tokenizer(tokenizer):
    """The tokenizer as the store needs it (a pad token): a model without one pads with its EOS, as scoring does."""
    if tokenizer.pad_token_id is not None or tokenizer.eos_token_id is None:
        return tokenizer
    import copy

    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_sequences(source: str, tokenizer, *, text_field: str = "text", prompt_field: str = "prompt",
                   answer_field: str = "answer", max_len: int = 512, max_samples: int | None = None,
                   split: str = "train", store_dir: str | None = None) -> Sequences:
    """Sequences for perplexity and KL, read through the token store (data/store.py: tokenized once, by all
    ranks together under torchrun, then mapped by every process): a `text_field` record is scored from its
    second token on, truncated to `max_len` tokens (data.format=text); a prompt/answer record scores answer
    + EOS given the prompt (truncated likewise; dropped if no answer token is left). Records with nothing to
    score (empty, missing or mistyped fields) are dropped and counted in the store's report line."""
    from dist_distill.data.records import load_tokenized
    from dist_distill.data.store import RecordSource
    from dist_distill.recipe import DataSpec

    spec = DataSpec(train=source, split=split, prompt_field=prompt_field, answer_field=answer_field,
                    text_field=text_field, max_seq_len=max_len, max_samples=max_samples, too_long="truncate",
                    bad_rows="skip", store_dir=store_dir)
    columns = RecordSource(source, spec).columns
    if text_field in columns:
        fmt = "text"
    elif prompt_field in columns:
        fmt = "prompt_answer"
        if answer_field not in columns:
            raise UserError(f"eval data {source}: records have no field {answer_field!r} (fields: "
                            f"{', '.join(columns)}); set --answer-field")
    else:
        raise UserError(f"eval data {source}: records have neither a text field {text_field!r} nor a prompt "
                        f"field {prompt_field!r} (fields: {', '.join(columns)}); set --text-field, "
                        "or --prompt-field and --answer-field")
    spec = dataclasses.replace(spec, format=fmt)
    try:
        data = load_tokenized(source, _store_tokenizer(tokenizer), spec, max_samples)
    except UserError as err:
        if "no usable record" in str(err):
            raise UserError(f"eval data {source}: no record has a token to score ({err})") from None
        raise
    store = data.store
    starts = [_first_target(store, i) for i in range(len(store))]
    return Sequences(StoreSequences(store), starts)


def _first_target(store, i: int) -> int:
    """Position of sample i's first scored token (its first label), >= 1."""
    a, b = int(store.offsets[i]), int(store.offsets[i + 1])
    labels = store._pread("labels", "uint8", a, b)
    return max(int(np.flatnonzero(labels)[0]), 1)


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

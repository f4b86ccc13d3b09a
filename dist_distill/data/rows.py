"""One record -> (token ids, label mask), or the kind of bad row it is.

A sample is a token sequence `seq` (at most data.max_seq_len ids) and a uint8 label mask of the
same length: ``label[j] = 1`` when token j is a training target (predicted from position j - 1).
records.TokenizedData turns that into the next-token `targets` the rest of the code reads.

Shapes: prompt/answer records give ``<bos> prompt answer <eos>`` (the tokenizer's own special
tokens on the prompt), labels on the answer and the EOS; plain text records (data.format=text) the
tokenizer's tokens with its special tokens, labels on every token after the first. Chat records (`messages`) are rendered
with the tokenizer's chat template; labels on the assistant turns (data.loss_on). A bad row is
never tokenized into the store: the builder counts it by kind (`BAD_KINDS`) and skips it, or
stops, by data.too_long / data.bad_rows.
"""

from __future__ import annotations

import numpy as np

from dist_distill.errors import UserError

BAD_KINDS = ("too_long", "truncated", "empty", "missing_field", "wrong_type", "undecodable")
"""Counted per store. "truncated" rows are kept (data.too_long=truncate); every other kind is dropped."""


class BadRow(Exception):
    """A record the store does not train on as written: `kind` is one of BAD_KINDS."""

    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind, self.detail = kind, detail


def _text(record: dict, name: str) -> str:
    if name not in record or record[name] is None:
        raise BadRow("missing_field", f"has no field {name!r} (fields: {', '.join(map(str, record)) or 'none'})")
    value = record[name]
    if not isinstance(value, str):
        raise BadRow("wrong_type", f"field {name!r} is {type(value).__name__}, expected a string")
    if value.strip() == "":
        raise BadRow("empty", f"field {name!r} is empty")
    return value


def record_format(spec, columns) -> str:
    """"prompt_answer" or "messages" for records with these column names (data.format="auto" picks)."""
    if spec.format != "auto":
        return spec.format
    return "messages" if spec.messages_field in columns else "prompt_answer"


def token_ids(tokenizer, texts: list[str], special: bool) -> list[list[int]]:
    """`tokenizer(texts, add_special_tokens=special)["input_ids"]`, through the Rust tokenizer's encode_batch
    directly when it is a fast one (transformers' per-row conversion is ~1/3 of the time). The first text is
    also run through the tokenizer's own call; on any difference the whole batch takes that path."""
    backend = getattr(tokenizer, "_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is not None and texts:
        ids = [e.ids for e in backend.encode_batch(texts, add_special_tokens=special)]
        if ids[0] == tokenizer(texts[:1], add_special_tokens=special)["input_ids"][0]:
            return ids
    return tokenizer(texts, add_special_tokens=special)["input_ids"]


def prompt_answer_batch(records: list[dict], tokenizer, spec) -> list:
    """[(seq, label) or BadRow] per record; prompts and answers tokenized in one batched call each
    (the same calls the in-memory path made, so token ids and fingerprints are unchanged)."""
    out, good, prompts, answers = [None] * len(records), [], [], []
    for i, rec in enumerate(records):
        try:
            prompts.append(_text(rec, spec.prompt_field))
            try:
                answers.append(_text(rec, spec.answer_field))
            except BadRow:
                prompts.pop()
                raise
            good.append(i)
        except BadRow as bad:
            out[i] = bad
    if good:
        p_ids = token_ids(tokenizer, prompts, True)
        a_ids = token_ids(tokenizer, answers, False)
        for i, p, a in zip(good, p_ids, a_ids):
            if not p:
                out[i] = BadRow("empty", f"prompt {spec.prompt_field!r} tokenizes to no tokens")
                continue
            seq = p + a + [tokenizer.eos_token_id]
            label = np.zeros(len(seq), np.uint8)
            label[len(p):] = 1
            out[i] = (seq, label)
    return out


def text_batch(records: list[dict], tokenizer, spec) -> list:
    """[(seq, label) or BadRow] per record of plain text (data.format=text: field data.text_field): the
    tokenizer's tokens with its special tokens, every token after the first a target."""
    out, good, texts = [None] * len(records), [], []
    for i, rec in enumerate(records):
        try:
            texts.append(_text(rec, spec.text_field))
            good.append(i)
        except BadRow as bad:
            out[i] = bad
    for i, seq in zip(good, token_ids(tokenizer, texts, True) if good else []):
        if len(seq) < 2:
            out[i] = BadRow("empty", f"text {spec.text_field!r} tokenizes to {len(seq)} token(s): nothing to predict")
            continue
        label = np.ones(len(seq), np.uint8)
        label[0] = 0
        out[i] = (seq, label)
    return out


def _check_messages(messages, spec) -> list[dict]:
    if not isinstance(messages, list):
        raise BadRow("wrong_type", f"field {spec.messages_field!r} is {type(messages).__name__}, expected a list of turns")
    if not messages:
        raise BadRow("empty", f"field {spec.messages_field!r} has no turns")
    for j, turn in enumerate(messages):
        if not isinstance(turn, dict) or not isinstance(turn.get("role"), str) or not isinstance(turn.get("content"), str):
            raise BadRow("wrong_type", f"turn {j} of {spec.messages_field!r} is not {{'role': str, 'content': str}}")
    if not any(t["role"] == "assistant" for t in messages) and spec.loss_on != "all":
        raise BadRow("empty", f"{spec.messages_field!r} has no assistant turn (data.loss_on={spec.loss_on})")
    return [{"role": t["role"], "content": t["content"]} for t in messages]


def _render(tokenizer, messages, generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def messages_row(record: dict, tokenizer, spec):
    """(seq, label) of one chat record rendered with the chat template.

    Assistant turn j's tokens are those between the rendering of turns [0, j) with the generation
    prompt and the rendering of turns [0, j]; that needs each rendering's tokens to be a prefix of
    the next one's (true of templates that close each turn with a special token). A template for which
    it is not is refused (undecodable) rather than masked wrongly.
    """
    if spec.messages_field not in record or record[spec.messages_field] is None:
        raise BadRow("missing_field", f"has no field {spec.messages_field!r} (fields: {', '.join(map(str, record))})")
    messages = _check_messages(record[spec.messages_field], spec)
    try:
        seq = _render(tokenizer, messages, False)
        label = np.zeros(len(seq), np.uint8)
        if spec.loss_on == "all":
            label[1:] = 1  # position 0 has no context to predict it from
            return seq, label
        turns = [j for j, t in enumerate(messages) if t["role"] == "assistant"]
        for j in turns[-1:] if spec.loss_on == "last_assistant" else turns:
            start = _render(tokenizer, messages[:j], True) if j else []
            stop = _render(tokenizer, messages[:j + 1], False)
            if seq[:len(stop)] != stop or stop[:len(start)] != start:
                raise BadRow("undecodable", "the chat template's rendering of a prefix of the turns is not a prefix "
                                            "of the whole conversation's tokens; assistant tokens cannot be located")
            label[max(len(start), 1):len(stop)] = 1
    except BadRow:
        raise
    except Exception as err:  # jinja errors of a template that refuses these turns (e.g. role order)
        raise BadRow("undecodable", f"the chat template failed: {type(err).__name__}: {err}") from None
    if not label.any():
        raise BadRow("empty", "no target token (the assistant turns render to nothing)")
    return seq, label


def encode_batch(records: list, tokenizer, spec, fmt: str) -> list:
    """[(seq, label) or BadRow] per record (a record may itself be a BadRow from decoding); then the
    length policy: over-long rows fail / skip (BadRow too_long) / truncate (kept, counted)."""
    decoded = [r for r in records if not isinstance(r, BadRow)]
    if fmt == "messages":
        rows = []
        for rec in decoded:
            try:
                rows.append(messages_row(rec, tokenizer, spec))
            except BadRow as bad:
                rows.append(bad)
    elif fmt == "text":
        rows = text_batch(decoded, tokenizer, spec)
    else:
        rows = prompt_answer_batch(decoded, tokenizer, spec)
    it = iter(rows)
    out = [r if isinstance(r, BadRow) else next(it) for r in records]
    length = spec.max_seq_len
    for i, row in enumerate(out):
        if isinstance(row, BadRow) or len(row[0]) <= length:
            continue
        n = len(row[0])
        if spec.too_long == "truncate" and row[1][:length].any():
            out[i] = (row[0][:length], row[1][:length], "truncated")
        else:
            why = "no target token is left after truncation" if spec.too_long == "truncate" else ""
            out[i] = BadRow("too_long", f"has {n} tokens, more than data.max_seq_len={length}" + (f" ({why})" if why else ""))
    return out


def check_tokenizer(tokenizer, fmt: str) -> None:
    if tokenizer.eos_token_id is None or tokenizer.pad_token_id is None:
        raise UserError("the student tokenizer needs an eos_token and a pad_token")
    if fmt == "messages" and not getattr(tokenizer, "chat_template", None):
        raise UserError("data.format=messages needs a tokenizer with a chat_template (tokenizer_config.json "
                        "'chat_template'); this tokenizer has none")

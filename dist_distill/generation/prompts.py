"""Prompt records -> the token ids the teacher continues, and what of the record goes back into the output.

Two record shapes, as the token store reads them (data/rows.py, chosen by data.format):

- prompt/answer: the text of data.prompt_field, tokenized with the tokenizer's own special tokens
  (``<bos> prompt``, exactly the prefix `rows.prompt_answer_batch` later gives the student); an answer
  column, if any, is ignored.
- chat: the turns of data.messages_field up to and including the last non-assistant turn (trailing
  assistant turns are dropped: the teacher writes its own), rendered with the teacher tokenizer's chat
  template and the generation prompt.

A record that cannot be used is a `rows.BadRow` (kinds from `rows.BAD_KINDS`): the runner stops on it or
counts it by data.bad_rows / data.too_long.
"""

from __future__ import annotations

from dataclasses import dataclass

from dist_distill.data.rows import BadRow, token_ids


@dataclass
class Prompt:
    """One usable prompt: `index` = its record index in the prompt set, `ids` = the teacher's input tokens,
    `echo` = what the output record repeats (the prompt text, or the list of prompt turns)."""

    index: int
    ids: list[int]
    echo: str | list[dict]


def _prompt_text(record: dict, field: str) -> str:
    value = record.get(field)
    if value is None:
        raise BadRow("missing_field", f"has no field {field!r} (fields: {', '.join(map(str, record)) or 'none'})")
    if not isinstance(value, str):
        raise BadRow("wrong_type", f"field {field!r} is {type(value).__name__}, expected a string")
    if not value.strip():
        raise BadRow("empty", f"field {field!r} is empty")
    return value


def _prompt_turns(record: dict, field: str) -> list[dict]:
    turns = record.get(field)
    if turns is None:
        raise BadRow("missing_field", f"has no field {field!r} (fields: {', '.join(map(str, record)) or 'none'})")
    if not isinstance(turns, list):
        raise BadRow("wrong_type", f"field {field!r} is {type(turns).__name__}, expected a list of turns")
    for j, t in enumerate(turns):
        if not isinstance(t, dict) or not isinstance(t.get("role"), str) or not isinstance(t.get("content"), str):
            raise BadRow("wrong_type", f"turn {j} of {field!r} is not {{'role': str, 'content': str}}")
    turns = [{"role": t["role"], "content": t["content"]} for t in turns]
    while turns and turns[-1]["role"] == "assistant":
        turns.pop()
    if not turns:
        raise BadRow("empty", f"field {field!r} has no turn before the (dropped) assistant turns")
    return turns


def encode_prompts(records: list, start: int, tokenizer, spec, fmt: str, max_tokens: int | None) -> list:
    """[Prompt or BadRow] for records start, start+1, ... (a record may already be a BadRow from decoding).

    spec: the recipe's DataSpec (prompt_field, messages_field); fmt: "prompt_answer" or "messages";
    max_tokens: a longer prompt is BadRow("too_long") (None: no limit)."""
    out: list = []
    texts, where = [], []
    for k, rec in enumerate(records):
        if isinstance(rec, BadRow):
            out.append(rec)
            continue
        try:
            if fmt == "messages":
                turns = _prompt_turns(rec, spec.messages_field)
                try:
                    text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
                except Exception as err:  # jinja errors of a template that refuses these turns
                    raise BadRow("undecodable", f"the chat template failed: {type(err).__name__}: {err}") from None
                ids = tokenizer(text, add_special_tokens=False)["input_ids"]
                out.append(Prompt(start + k, ids, turns))
            else:
                texts.append(_prompt_text(rec, spec.prompt_field))
                where.append(len(out))
                out.append(None)
        except BadRow as bad:
            out.append(bad)
    for slot, text, ids in zip(where, texts, token_ids(tokenizer, texts, True) if texts else []):
        out[slot] = Prompt(start + slot, ids, text)
    for k, p in enumerate(out):
        if isinstance(p, Prompt) and not p.ids:
            out[k] = BadRow("empty", "the prompt tokenizes to no tokens")
        elif isinstance(p, Prompt) and max_tokens is not None and len(p.ids) > max_tokens:
            out[k] = BadRow("too_long", f"has {len(p.ids)} prompt tokens, more than generate.max_prompt_tokens={max_tokens}")
    return out

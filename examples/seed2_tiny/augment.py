"""A user augmentation for the tiny world's task (data.augment, README "Augmentation").

The task is sorting the digits of a string ("314159=" -> "113459"): any permutation of the prompt's
digits has the same answer, so a shuffled prompt is a new, correct training record -- the tiny
world's stand-in for back-translation (same meaning, other surface form).
"""

from __future__ import annotations


def shuffle_digits(record: dict, *, rng, copy: int, fields: list[str]) -> dict | None:
    """`record` with the digits before "=" of each field in `fields` shuffled by `rng` (deterministic per
    record and copy); None when the shuffle gives back the original (no duplicate sample)."""
    changed = False
    for name in fields:
        text = record[name]
        digits, sep, rest = text.partition("=")
        order = list(digits)
        rng.shuffle(order)
        record[name] = "".join(order) + sep + rest
        changed |= record[name] != text
    return record if changed else None

"""Prompt/answer records -> fixed-length token tensors with next-token targets.

Each sample is ``<bos> prompt answer <eos> <pad>...`` of length `max_seq_len`. Targets are
already shifted: ``targets[t]`` is the token the model must predict from position t, set
only where that token belongs to the answer (or is the final EOS); every other position is
``IGNORE_INDEX``. The teacher cache stores its signal at the same positions, so cache rows
and student tokens align by (sample index, position).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from dist_distill.errors import UserError
from dist_distill.recipe import DataSpec

IGNORE_INDEX = -100
LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow", ".csv": "csv"}


@dataclass
class TokenizedData:
    """input_ids, attention_mask, targets: int64 [S, L]; `fingerprint` hashes the token ids."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    targets: torch.Tensor
    source: str

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.input_ids.numpy().tobytes()).hexdigest()

    @property
    def targets_fingerprint(self) -> str:
        """sha256 of which positions are targets (the prompt/answer split), bit-packed per sample."""
        import numpy as np

        return hashlib.sha256(np.packbits((self.targets != IGNORE_INDEX).numpy(), axis=1).tobytes()).hexdigest()

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def load_records(source: str, split: str = "train", max_samples: int | None = None):
    """A `datasets.Dataset` from a local file (jsonl/json/parquet/arrow/csv) or a hub dataset name."""
    import datasets

    path = Path(source).expanduser()
    suffix = path.suffix.lower()
    if suffix in LOCAL_FORMATS or path.exists():
        if not path.is_file():
            raise UserError(f"data file {source} does not exist (expected a local "
                            f"{'/'.join(LOCAL_FORMATS)} file or a hub dataset name)")
        if suffix not in LOCAL_FORMATS:
            raise UserError(f"data file {source}: unsupported format {suffix!r}; expected one of {', '.join(LOCAL_FORMATS)}")
        ds = datasets.load_dataset(LOCAL_FORMATS[suffix], data_files=str(path), split="train")
    else:
        try:
            ds = datasets.load_dataset(source, split=split)
        except Exception as err:  # datasets raises many types for a missing/offline hub dataset
            raise UserError(f"cannot load hub dataset {source!r} split {split!r}: {err}") from None
    if max_samples is not None:
        ds = ds.select(range(min(max_samples, len(ds))))
    return ds


def tokenize_records(records, tokenizer, spec: DataSpec, source: str) -> TokenizedData:
    """Tokenize prompt/answer records into fixed-length tensors (see the module docstring)."""
    for name in (spec.prompt_field, spec.answer_field):
        if name not in records.column_names:
            raise UserError(f"data {source}: records have no field {name!r} (fields: {', '.join(records.column_names)}); "
                            "set data.prompt_field / data.answer_field")
    if tokenizer.eos_token_id is None or tokenizer.pad_token_id is None:
        raise UserError("the student tokenizer needs an eos_token and a pad_token")
    prompts = tokenizer(list(records[spec.prompt_field]))["input_ids"]
    answers = tokenizer(list(records[spec.answer_field]), add_special_tokens=False)["input_ids"]
    n, length = len(prompts), spec.max_seq_len
    input_ids = torch.full((n, length), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((n, length), dtype=torch.long)
    targets = torch.full((n, length), IGNORE_INDEX, dtype=torch.long)
    for i, (prompt, answer) in enumerate(zip(prompts, answers)):
        seq = prompt + answer + [tokenizer.eos_token_id]
        if len(seq) > length:
            raise UserError(f"data {source}: record {i} has {len(seq)} tokens, more than data.max_seq_len={length}")
        input_ids[i, :len(seq)] = torch.tensor(seq)
        attention_mask[i, :len(seq)] = 1
        targets[i, len(prompt) - 1:len(seq) - 1] = torch.tensor(seq[len(prompt):])
    return TokenizedData(input_ids, attention_mask, targets, source)


def load_tokenized(source: str, tokenizer, spec: DataSpec, max_samples: int | None = None) -> TokenizedData:
    """load_records + tokenize_records."""
    return tokenize_records(load_records(source, spec.split, max_samples), tokenizer, spec, source)

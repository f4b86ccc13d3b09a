"""Records -> fixed-length token batches with next-token targets, read from the token store.

Each sample is ``<bos> prompt answer <eos> <pad>...`` of length `max_seq_len` (or a chat
conversation rendered with the tokenizer's template, see data/rows.py). Targets are already
shifted: ``targets[t]`` is the token the model must predict from position t, set only where that
token is a training target (the answer and the final EOS, or the assistant turns); every other
position is ``IGNORE_INDEX``. The teacher cache stores its signal at the same positions, so cache
rows and student tokens align by (sample index, position).

`load_tokenized` tokenizes once into the memory-mapped token store (data/store.py) and returns
lazy columns over it: ``data.input_ids[idx]`` pads only the samples asked for, so a process's
memory does not grow with the data set.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from dist_distill.data.store import LOCAL_FORMATS, TokenStore, load_records, prepare  # noqa: F401 (re-exported)
from dist_distill.recipe import DataSpec

IGNORE_INDEX = -100


class StoreColumn:
    """One int64 [S, L] column of a token store, read on indexing: an int gives [L], a slice, a list, an
    int64 tensor or array of sample ids gives [n, L] (a new CPU tensor; nothing is cached)."""

    KINDS = ("input_ids", "attention_mask", "targets")

    def __init__(self, store: TokenStore, kind: str):
        assert kind in self.KINDS
        self.store, self.kind = store, kind

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.store), self.store.max_seq_len))

    dtype = torch.int64

    def __len__(self) -> int:
        return len(self.store)

    def _ids(self, index) -> tuple[np.ndarray, bool]:
        n = len(self.store)
        if isinstance(index, torch.Tensor):
            index = index.cpu().numpy()
        if isinstance(index, slice):
            return np.arange(*index.indices(n)), False
        if isinstance(index, (int, np.integer)) or (isinstance(index, np.ndarray) and index.ndim == 0):
            i = int(index)
            if not -n <= i < n:
                raise IndexError(f"sample {i} out of range for a store of {n} samples")
            return np.array([i % n]), True
        ids = np.asarray(index, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < -n or ids.max() >= n):
            raise IndexError(f"sample ids {ids.min()}..{ids.max()} out of range for a store of {n} samples")
        return ids % n if ids.size else ids, False

    def __getitem__(self, index) -> torch.Tensor:
        ids, scalar = self._ids(index)
        input_ids, attention, target = self.store.block(ids)
        if self.kind == "input_ids":
            out = input_ids
        elif self.kind == "attention_mask":
            out = attention
        else:
            out = np.full_like(input_ids, IGNORE_INDEX)
            out[:, :-1] = np.where(target[:, :-1], input_ids[:, 1:], IGNORE_INDEX)
        out = torch.from_numpy(out)
        return out[0] if scalar else out


@dataclass
class TokenizedData:
    """input_ids, attention_mask, targets: int64 [S, L] each, as tensors or lazy `StoreColumn`s (same indexing);
    `fingerprint` hashes the padded token ids, `targets_fingerprint` the target positions (a store keeps both,
    computed once when it was built)."""

    input_ids: torch.Tensor | StoreColumn
    attention_mask: torch.Tensor | StoreColumn
    targets: torch.Tensor | StoreColumn
    source: str
    store: TokenStore | None = None
    bad_rows: dict = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        if self.store is not None:
            return self.store.meta["token_ids_sha256"]
        return hashlib.sha256(self.input_ids.numpy().tobytes()).hexdigest()

    @property
    def targets_fingerprint(self) -> str:
        """sha256 of which positions are targets (the prompt/answer split), bit-packed per sample."""
        if self.store is not None:
            return self.store.meta["targets_sha256"]
        return hashlib.sha256(np.packbits((self.targets != IGNORE_INDEX).numpy(), axis=1).tobytes()).hexdigest()

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def from_store(store: TokenStore, source: str) -> TokenizedData:
    return TokenizedData(*(StoreColumn(store, k) for k in StoreColumn.KINDS), source, store, dict(store.meta["bad_rows"]))


def load_tokenized(source: str, tokenizer, spec: DataSpec, max_samples: int | None = None,
                   progress: bool = False) -> TokenizedData:
    """The store of `source` under this tokenizer and `spec` (built on first use by every calling rank together,
    see data/store.py), as lazy columns. `max_samples` overrides spec.max_samples (the first N records)."""
    import dataclasses

    if max_samples != spec.max_samples:
        spec = dataclasses.replace(spec, max_samples=max_samples)
    store = TokenStore(prepare(source, tokenizer, spec, progress=progress))
    if _rank0():
        print(f"data {source}: {store.report()} [store {store.path}]", flush=True)
    return from_store(store, source)


def _rank0() -> bool:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"

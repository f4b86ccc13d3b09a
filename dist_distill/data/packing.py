"""Packing: several samples of the token store in one sequence, with no attention across them.

A packed batch holds rows of `max_len` tokens; each row is a run of whole samples (documents) laid end to
end, the rest padding. Positions restart at 0 for each document, and a document attends only to itself:

- sdpa (and the CPU): a 4-D block-diagonal causal mask, bool [B, 1, L, L] (True = may attend), which
  transformers uses as given when a 4-D mask is passed;
- eager: the same mask as an additive float mask in the model's dtype (0 = may attend, dtype min = may not):
  transformers passes a 4-D mask through unchanged and eager attention ADDS it to the scores, so a bool
  mask there would add 1 or 0 and mask nothing;
- any other implementation is refused (`packed_model_inputs`);
- flash_attention_2 (CUDA): no mask at all, only position_ids; transformers sees positions that restart
  and runs the varlen kernel over the documents (its packed position_ids path). `model_inputs` says which.

The teacher signal is keyed by (sample, position) whatever the packing: `source[b, t]` is the (sample id,
position in that sample) of packed token (b, t), and `teacher_rows` maps the packed batch's target tokens
(row-major) onto the rows an unpacked batch of the same samples has, so a cache built for unpacked samples
serves a packed run. dd-train packs with data.packing=true: data/batching.py decides which samples share a
row (`PackedSampler`), `pack_rows` lays them out, `packed_model_inputs` gives each model its inputs.

Memory: the 4-D mask is B * L * L bytes (8 rows of 4096: 128 MiB; eager turns it into an additive float
mask, 2-4x that by dtype) and sdpa with an explicit mask cannot use its flash kernel, so its scores are materialised per
head: fine at L <= 4096 for small students and the CPU tests, the wrong path for a 70B run at 4k. That is why
CUDA + flash_attention_2 uses position_ids only (no L x L tensor at all). The mask is built on the device
from `doc` (int64 [B, L]), so only B * L ids cross to the GPU, never the L x L mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

IGNORE_INDEX = -100


def first_fit(lengths: list[int], max_len: int) -> list[list[int]]:
    """Indices of `lengths` grouped into bins of total length <= max_len, first fit in the given order
    (deterministic: the same samples always pack the same way, so resume and cache lookups agree)."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i, n in enumerate(lengths):
        if n > max_len:
            raise ValueError(f"sample {i} has {n} tokens, more than the packed length {max_len}")
        for b, r in enumerate(room):
            if n <= r:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(max_len - n)
    return bins


@dataclass
class PackedBatch:
    """input_ids, position_ids, targets: int64 [B, L]; doc: int64 [B, L], the packed document's index in
    `samples` (-1 on padding); source: int64 [B, L, 2], (sample id, position in it) per token (-1 on padding)."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    targets: torch.Tensor
    doc: torch.Tensor
    source: torch.Tensor
    samples: torch.Tensor

    def block_mask(self) -> torch.Tensor:
        """bool [B, 1, L, L]: see `block_mask`."""
        return block_mask(self.doc)

    def model_inputs(self, attn_implementation: str, dtype: torch.dtype = torch.float32) -> tuple[dict, str]:
        """(kwargs for the HF model, one line for the start-up log saying how documents are kept apart);
        `dtype`: the model's (eager's additive mask)."""
        kwargs = packed_model_inputs(self.input_ids, self.position_ids, self.doc, self.targets, attn_implementation,
                                     dtype)
        kwargs.pop("targets")
        return kwargs, attention_path(attn_implementation)

    def teacher_rows(self, unpacked_targets: torch.Tensor) -> torch.Tensor:
        """int64 [n_targets]: for each target token of this packed batch (row-major), its row in the teacher
        signal of the unpacked batch `unpacked_targets` (int64 [len(samples), L'], the store's targets of the
        same samples in `samples` order, whose target tokens are that signal's rows, row-major)."""
        row_of = torch.full(unpacked_targets.shape, -1, dtype=torch.long)
        keep = unpacked_targets != IGNORE_INDEX
        row_of[keep] = torch.arange(int(keep.sum()))
        where = self.targets != IGNORE_INDEX
        doc, pos = self.doc[where], self.source[..., 1][where]
        rows = row_of[doc, pos]
        assert (rows >= 0).all(), "a packed target has no unpacked teacher row"
        return rows


def block_mask(doc: torch.Tensor) -> torch.Tensor:
    """bool [B, 1, L, L] on doc's device from doc (int64 [B, L], -1 on padding): query t may attend to key s
    iff both are in the same document and s <= t. A padding query attends to itself only (a row of all False
    gives NaN in sdpa)."""
    length = doc.shape[1]
    same = (doc[:, :, None] == doc[:, None, :]) & (doc[:, :, None] >= 0)
    causal = torch.ones(length, length, dtype=torch.bool, device=doc.device).tril()
    mask = same & causal
    mask |= torch.eye(length, dtype=torch.bool, device=doc.device)
    return mask[:, None]


def attention_path(attn_implementation: str) -> str:
    """One line for the start-up log: how a packed batch keeps documents apart under this implementation."""
    if attn_implementation == "flash_attention_2":
        return ("packing: flash_attention_2 varlen over position_ids that restart per document (rows flattened to "
                "[1, B*L], no mask)")
    kind = "additive float" if attn_implementation == "eager" else "bool"
    return f"packing: {attn_implementation} with a 4-D block-diagonal causal mask [B, 1, L, L] ({kind})"


PACKED_ATTENTION = ("sdpa", "eager", "flash_attention_2")
"""Attention implementations a packed batch supports (each keeps documents apart its own way, see above)."""


def packed_model_inputs(input_ids: torch.Tensor, position_ids: torch.Tensor, doc: torch.Tensor, targets: torch.Tensor,
                        attn_implementation: str, dtype: torch.dtype = torch.float32) -> dict:
    """Model kwargs of a packed batch (all int64 [B, L] on one device), targets included.

    flash_attention_2: transformers (5.x) takes its packed path only for batch size 1 (it finds the documents
    where position_ids restart: `_is_packed_sequence`), so the B rows are flattened to [1, B * L] -- input_ids,
    position_ids and targets alike; each row's padding starts its own position run, so it is one more
    "document" with no target. Target tokens keep their row-major order, hence their teacher rows.
    sdpa: [B, L] with the bool 4-D block mask built on that device; eager: the same as an additive mask in
    `dtype` (the model's: eager adds the mask to its scores). Any other implementation: ValueError."""
    if attn_implementation not in PACKED_ATTENTION:
        raise ValueError(f"data.packing=true with attn_implementation={attn_implementation!r}: packed batches "
                         f"support {', '.join(PACKED_ATTENTION)}")
    if attn_implementation == "flash_attention_2":
        return {"input_ids": input_ids.reshape(1, -1), "position_ids": position_ids.reshape(1, -1),
                "attention_mask": None, "targets": targets.reshape(1, -1)}
    mask = block_mask(doc)
    if attn_implementation == "eager":
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)
    return {"input_ids": input_ids, "position_ids": position_ids, "attention_mask": mask, "targets": targets}


def pack(data, samples: torch.Tensor, max_len: int) -> PackedBatch:
    """Pack store samples `samples` (int64 [n]) of `data` (records.TokenizedData) into rows of max_len tokens.
    Reads each sample's real tokens only (attention_mask gives the length); targets keep their positions
    relative to their sample, so a target predicted at a document's last real token stays its EOS."""
    lengths = data.attention_mask[samples].sum(1).tolist()
    return pack_rows(data, samples, first_fit(lengths, max_len), max_len)


def pack_rows(data, samples: torch.Tensor, bins: list[list[int]], max_len: int) -> PackedBatch:
    """Lay out samples `samples` (int64 [n]) of `data` as rows: row b holds samples[bins[b]] end to end, in
    that order (each bin's lengths must sum to <= max_len). One store read of the n samples."""
    ids, att, tgt = data.input_ids[samples], data.attention_mask[samples], data.targets[samples]
    lengths = att.sum(1).tolist()
    shape = (len(bins), max_len)
    pad = data.store.pad_token_id if getattr(data, "store", None) is not None else 0
    out_ids = torch.full(shape, pad, dtype=torch.long)
    out_pos = torch.zeros(shape, dtype=torch.long)
    out_tgt = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    out_doc = torch.full(shape, -1, dtype=torch.long)
    out_src = torch.full((*shape, 2), -1, dtype=torch.long)
    for b, members in enumerate(bins):
        t = 0
        for k in members:
            n = lengths[k]
            if t + n > max_len:
                raise ValueError(f"row {b}: samples {[int(samples[j]) for j in members]} have "
                                 f"{sum(lengths[j] for j in members)} tokens, more than the packed length {max_len}")
            out_ids[b, t:t + n], out_tgt[b, t:t + n] = ids[k, :n], tgt[k, :n]
            out_pos[b, t:t + n] = torch.arange(n)
            out_doc[b, t:t + n] = k
            out_src[b, t:t + n, 0], out_src[b, t:t + n, 1] = int(samples[k]), torch.arange(n)
            t += n
        out_pos[b, t:] = torch.arange(max_len - t)  # padding: any positions, it is masked out and has no target
    return PackedBatch(out_ids, out_pos, out_tgt, out_doc, out_src, samples.clone())


def packing_efficiency(lengths: np.ndarray, max_len: int) -> float:
    """Real tokens / padded slots when packing `lengths` (vs unpacked: sum(lengths) / (n * max_len))."""
    bins = first_fit(list(map(int, lengths)), max_len)
    return float(np.sum(lengths)) / (len(bins) * max_len)

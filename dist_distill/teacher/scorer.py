"""The teacher scorer: one way to run a teacher and turn its logits into the signal the student reads.

Both the offline cache builder (``dd-cache build``) and the online teacher group call
:meth:`TeacherScorer.score`: given a token batch and its target positions it runs the
teacher's decoder once, keeps the final hidden states of the target tokens only, and runs
the lm_head over them **chunk by chunk** and **vocab-parallel**. For each chunk of rows it
takes the top-k, the logsumexp over the real vocabulary and the exact tail mass outside the
top-k at each of the recipe's temperatures (:mod:`dist_distill.teacher.tails`) and drops the logits, so at most
``[chunk rows, V / tp]`` logits exist at any time (``chunk_bytes``, 256 MiB by default) --
never ``[B, L, V]``. At B=32, L=4096, V=152064 the old whole-batch path held ~120 GB of
bf16 + fp32 logits; here it is one 256 MiB chunk per rank whatever B and L.

The teacher may be:

- whole on this device (``tp_group=None``), in its own dtype or bitsandbytes 8/4-bit (the
  lm_head stays in the teacher's dtype, as transformers keeps it);
- tensor-parallel over ``tp_group`` (:mod:`dist_distill.teacher.tensor_parallel`: the lm_head
  column-parallel, each rank holding vocabulary columns ``[vocab_offset, vocab_offset + V/tp)``).
  Every rank of the group calls ``score`` with the same batch; each returns the same result.

Precision: logits are promoted to at least float32 before the top-k and logsumexp (a float64
teacher keeps float64 until the result is rounded to float32 once, which makes a TP result
bit-identical to a single-process one for tests).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from dist_distill.data.records import IGNORE_INDEX

LOGITS_CHUNK_BYTES = 256 << 20
"""Budget of one chunk's work buffers on a rank: its [rows, V / tp] logits at the compute precision and
their tail-masked copy (teacher.tails.tail_logsumexp)."""


def vocab_parallel_topk(local_logits: torch.Tensor, offset: int, vocab_size: int, k: int, group,
                        temperatures=(1.0,)):
    """Top-k, logsumexp and exact tail mass over the real vocabulary [0, vocab_size) from vocabulary slices.

    local_logits [n, V_local] hold columns [offset, offset + V_local) of the full logits. Each
    rank takes its local top-k (ids shifted by its offset), local logsumexp and, per temperature,
    the logsumexp of its columns outside its local top-k (teacher.tails.tail_logsumexp); an
    all_gather of those [n, k] / [n] / [n, nT] pieces and one more top-k give the exact result
    without ever gathering [n, V] logits (group None: one rank holds the whole vocabulary). The
    candidates the merge drops join the tail, so the tail is a sum over the tail itself, never
    1 - top-k. Padded columns (id >= vocab_size) are cut off before anything is computed (a
    slice of padding only gives an lse of -inf). Every rank of `group` must pass the same n
    (all_gather needs equal shapes: a slice with fewer than k real columns is padded with -inf).
    All tensors stay on the logits' device (a CUDA tensor for NCCL groups).
    Returns ids int64 [n, k], logits [n, k], lse [n] at the compute precision (float32, or
    float64 for a float64 teacher) and log_tails float64 [n, len(temperatures)] (log of the
    probability mass outside the top-k at each temperature; -inf for an empty tail), the same on
    every rank.
    """
    from dist_distill.teacher.tails import log_tail_mass, tail_logsumexp

    real = max(0, min(local_logits.shape[1], vocab_size - offset))
    logits = local_logits[:, :real].to(torch.promote_types(local_logits.dtype, torch.float32))
    ids = torch.arange(offset, offset + real, device=logits.device)
    if real < k:
        logits = torch.cat([logits, logits.new_full((logits.shape[0], k - logits.shape[1]), float("-inf"))], 1)
        ids = torch.cat([ids, ids.new_full((k - ids.shape[0],), vocab_size)])
    values, local_pick = logits.topk(k, dim=-1)
    local_ids = ids[local_pick]
    lse = torch.logsumexp(logits, dim=-1)
    tail = tail_logsumexp(logits, local_pick, temperatures)
    del logits
    world = dist.get_world_size(group) if group is not None else 1
    if world > 1:
        gathered = []
        for x in (values.contiguous(), local_ids.contiguous(), lse, tail.contiguous()):
            parts = [torch.empty_like(x) for _ in range(world)]
            dist.all_gather(parts, x, group=group)
            gathered.append(parts)
        candidates = torch.cat(gathered[0], 1)
        values, pick = candidates.topk(k, dim=-1)
        local_ids = torch.cat(gathered[1], 1).gather(1, pick)
        lse = torch.logsumexp(torch.stack(gathered[2]), dim=0)
        dropped = tail_logsumexp(candidates, pick, temperatures)  # the candidates the merge left out
        tail = torch.logaddexp(torch.logsumexp(torch.stack(gathered[3]), dim=0), dropped)
    return local_ids, values, lse, log_tail_mass(values, tail, temperatures)


def vocab_parallel_target_logprob(local_logits: torch.Tensor, offset: int, vocab_size: int, target_ids: torch.Tensor,
                                  group, lse: torch.Tensor | None = None) -> torch.Tensor:
    """log p(target) of each row over the real vocabulary [0, vocab_size), from vocabulary slices.

    local_logits [n, V_local] hold columns [offset, offset + V_local); target_ids int64 [n] (any id in
    [0, vocab_size)). The rank whose slice holds a row's target reads its logit, the others put -inf, and an
    all_reduce(MAX) of that [n] vector gives every rank the value (no [n, V] gather). `lse` [n]: the row's
    full-vocabulary logsumexp when the caller has it (vocab_parallel_topk's); None: computed here the same
    way (local logsumexp, all_gather of [n], logsumexp). Returns [n] at the compute precision (float32, or
    float64 for a float64 teacher), on the logits' device, the same on every rank of `group`.
    """
    real = max(0, min(local_logits.shape[1], vocab_size - offset))
    logits = local_logits[:, :real].to(torch.promote_types(local_logits.dtype, torch.float32))
    local = target_ids.to(logits.device) - offset
    mine = (local >= 0) & (local < real)
    value = logits.new_full((logits.shape[0],), float("-inf"))
    if real:
        picked = logits.gather(1, local.clamp(0, real - 1)[:, None])[:, 0]
        value = torch.where(mine, picked, value)
    world = dist.get_world_size(group) if group is not None else 1
    if lse is None:
        lse = torch.logsumexp(logits, dim=-1) if real else value.clone()
        if world > 1:
            parts = [torch.empty_like(lse) for _ in range(world)]
            dist.all_gather(parts, lse.contiguous(), group=group)
            lse = torch.logsumexp(torch.stack(parts), dim=0)
    if world > 1:
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
    return value - lse.to(value.dtype)


class TeacherScorer:
    """Runs a frozen teacher over token batches; per target token: top-k ids, raw logits, logsumexp.

    model: a Hugging Face causal LM in eval mode (whole, quantised, or TP-sharded over `tp_group`);
    vocab_size: the real (tokenizer) vocabulary, columns past it are padding and ignored;
    k: logits kept per token; vocab_offset: first vocabulary id of this rank's lm_head slice
    (0 without TP); chunk_bytes: budget of one logits chunk (see the module docstring).
    """

    def __init__(self, model, vocab_size: int, k: int, *, tp_group=None, vocab_offset: int = 0,
                 chunk_bytes: int = LOGITS_CHUNK_BYTES, temperatures=(1.0,)):
        self.model, self.vocab_size, self.k = model, vocab_size, k
        self.temperatures = tuple(float(t) for t in temperatures)
        self.tp_group, self.vocab_offset, self.chunk_bytes = tp_group, vocab_offset, chunk_bytes
        self.head = model.get_output_embeddings()
        weight = self.head.weight
        self.local_vocab = (weight.to_local() if hasattr(weight, "to_local") else weight).shape[0]

    @property
    def device(self) -> torch.device:
        return self.head.weight.device if not hasattr(self.head.weight, "to_local") else \
            self.head.weight.to_local().device

    def chunk_rows(self) -> int:
        """Rows per lm_head chunk: chunk_bytes / (bytes of one row of local logits at fp32, times 2: the
        tail's masked copy (teacher.tails.tail_logsumexp) lives beside the logits). With a temperature
        other than 1 a third copy (``masked / T``) exists transiently, so the peak is 1.5x chunk_bytes."""
        return max(1, self.chunk_bytes // (8 * max(self.local_vocab, 1)))

    @torch.no_grad()
    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, targets: torch.Tensor):
        """Teacher signal at the target tokens (``targets != IGNORE_INDEX``, row-major) of a batch.

        input_ids, attention_mask, targets: int64 [B, L] (any device; moved to the teacher's).
        Returns ids int64 [n, k], logits float32 [n, k] (raw, T=1), lse float32 [n] and log_tails
        float32 [n, len(self.temperatures)] (teacher.tails) -- n target tokens -- on the teacher's
        device. ``logits - lse`` are full-vocabulary log-probabilities.
        """
        return self._score(input_ids, attention_mask, targets, topk=True, target=False)

    @torch.no_grad()
    def score_with_targets(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, targets: torch.Tensor):
        """`score`'s four tensors and a fifth, float64 [n]: log p_teacher(target token) at each row (what
        difficulty grading averages, data/grading.py). Costs one gather and one [n] all_reduce per chunk."""
        return self._score(input_ids, attention_mask, targets, topk=True, target=True)

    @torch.no_grad()
    def target_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, targets: torch.Tensor):
        """Only log p_teacher(target token), float64 [n] per target row (no top-k, no tails): `dd-cache grade`."""
        return self._score(input_ids, attention_mask, targets, topk=False, target=True)[0]

    def _score(self, input_ids, attention_mask, targets, topk: bool, target: bool):
        device = self.device
        hidden = self.model.get_decoder()(input_ids=input_ids.to(device),
                                          attention_mask=attention_mask.to(device)).last_hidden_state
        keep = targets.to(device) != IGNORE_INDEX
        hidden, target_ids = hidden[keep], targets.to(device)[keep]
        rows = self.chunk_rows()
        parts = []
        for i in range(0, max(hidden.shape[0], 1), rows):
            local = self.head(hidden[i:i + rows])
            part = vocab_parallel_topk(local, self.vocab_offset, self.vocab_size, self.k, self.tp_group,
                                       self.temperatures) if topk else ()
            if target:
                lp = vocab_parallel_target_logprob(local, self.vocab_offset, self.vocab_size, target_ids[i:i + rows],
                                                   self.tp_group, part[2] if topk else None)
                part = (*part, lp.double())
            parts.append(part)
        out = [torch.cat([p[j] for p in parts]) for j in range(len(parts[0]))]
        if topk:
            out[1], out[2], out[3] = out[1].float(), out[2].float(), out[3].float()
        return tuple(out)

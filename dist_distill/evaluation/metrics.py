"""Metrics of causal LMs on held-out data.

Every function takes Hugging Face causal LMs (``model(input_ids, attention_mask).logits``,
``model.generate``) and token ids from :mod:`dist_distill.evaluation.data`. Quality metrics are
data-parallel: under ``torch.distributed`` each rank scores the items ``rank, rank + world, ...``
and the sums (float64) are all-reduced, so every rank returns the single-process result (up to
float32 batching noise, ~1e-6 relative). Timing metrics run on the calling rank alone.

Units: log-likelihoods and KL in nats; perplexity is exp(mean NLL per scored token); accuracies
are fractions in [0, 1]; times in milliseconds; memory in MiB (2^20 bytes).
"""

from __future__ import annotations

import math
import statistics
import threading
import time

import torch
import torch.nn.functional as F

from dist_distill.evaluation.data import ChoiceItem, Sequences


# ---- data parallelism -------------------------------------------------------------------------
def rank_world() -> tuple[int, int]:
    dist = torch.distributed
    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


def my_share(n: int) -> list[int]:
    """Indices of the n items this rank scores: rank, rank + world, ..."""
    rank, world = rank_world()
    return list(range(rank, n, world))


def all_sum(values: list[float]) -> list[float]:
    """Element-wise sum of `values` over all ranks (float64; a no-op in one process)."""
    t = torch.tensor(values, dtype=torch.float64)
    if rank_world()[1] > 1:
        torch.distributed.all_reduce(t)
    return t.tolist()


def _bar(total: int, desc: str, progress: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not progress or rank_world()[0] != 0, dynamic_ncols=True, leave=False)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def right_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 [B, max len] ids padded on the right with `pad_id`, and the int64 attention mask."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, :len(s)] = 1
    return ids, mask


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 [B, max len] ids padded on the left (for generation), and the attention mask."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    return ids, mask


def _scored_mask(seqs: list[list[int]], starts: list[int], width: int) -> torch.Tensor:
    """bool [B, width]: position t predicts token t + 1, which is scored when start <= t + 1 < len."""
    mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, (s, b) in enumerate(zip(seqs, starts)):
        mask[i, b - 1:len(s) - 1] = True
    return mask


def batch_logprobs(model, seqs: list[list[int]], starts: list[int], pad_id: int, vocab_size: int):
    """One forward of a right-padded batch. Returns (log-probs float32 [n, V] at the scored positions,
    row-major over (sequence, position); the scored target ids int64 [n]; the sequence of each row [n])."""
    ids, mask = right_pad(seqs, pad_id)
    device = _device(model)
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
    scored = _scored_mask(seqs, starts, ids.shape[1])
    rows = logits[scored.to(device)][:, :vocab_size].float()
    targets = torch.roll(ids, -1, dims=1)[scored]
    owner = torch.arange(len(seqs))[:, None].expand_as(scored)[scored]
    return F.log_softmax(rows, dim=-1), targets.to(rows.device), owner


# ---- quality metrics --------------------------------------------------------------------------
@torch.no_grad()
def perplexity(model, data: Sequences, pad_id: int, vocab_size: int, batch_size: int = 8,
               progress: bool = True) -> dict:
    """exp(mean negative log-likelihood of the scored tokens), over the real vocabulary.

    Returns {"perplexity", "nll" (nats/token), "tokens" (scored tokens, all ranks)}."""
    share = my_share(len(data))
    nll, count = 0.0, 0
    bar = _bar(len(share), "perplexity", progress)
    for lo in range(0, len(share), batch_size):
        idx = share[lo:lo + batch_size]
        logp, targets, _ = batch_logprobs(model, [data.ids[i] for i in idx], [data.start[i] for i in idx],
                                          pad_id, vocab_size)
        nll -= logp.gather(1, targets[:, None]).double().sum().item()
        count += len(targets)
        bar.update(len(idx))
    bar.close()
    nll, count = all_sum([nll, count])
    return {"perplexity": math.exp(nll / count), "nll": nll / count, "tokens": int(count)}


def kl_and_agreement(teacher_logp: torch.Tensor, student_logp: torch.Tensor) -> tuple[float, int]:
    """Sums over rows of KL(p_teacher || q_student) (nats) and of argmax agreement, for log-probs [n, V]
    over the same vocabulary (T = 1): (sum_rows sum_v p (log p - log q), #rows with equal argmax)."""
    kl = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)
    agree = (teacher_logp.argmax(-1) == student_logp.argmax(-1)).sum()
    return kl.double().sum().item(), int(agree)


@torch.no_grad()
def teacher_agreement(teacher, student, data: Sequences, pad_id: int, vocab_size: int, batch_size: int = 8,
                      progress: bool = True) -> dict:
    """Token-level KL(teacher || student) at T = 1 on the full real vocabulary (`vocab_size`, shared
    tokenizer) and top-1 agreement (same argmax), averaged over the scored tokens.

    Returns {"kl_teacher" (nats/token), "top1_agreement" (fraction)}."""
    share = my_share(len(data))
    kl, agree, count = 0.0, 0, 0
    bar = _bar(len(share), "KL to teacher", progress)
    for lo in range(0, len(share), batch_size):
        seqs, starts = [data.ids[i] for i in share[lo:lo + batch_size]], [data.start[i] for i in share[lo:lo + batch_size]]
        t_logp, _, _ = batch_logprobs(teacher, seqs, starts, pad_id, vocab_size)
        s_logp, _, _ = batch_logprobs(student, seqs, starts, pad_id, vocab_size)
        k, a = kl_and_agreement(t_logp, s_logp.to(t_logp.device))
        kl, agree, count = kl + k, agree + a, count + len(t_logp)
        bar.update(len(seqs))
    bar.close()
    kl, agree, count = all_sum([kl, agree, count])
    return {"kl_teacher": kl / count, "top1_agreement": agree / count}


@torch.no_grad()
def multiple_choice(model, items: list[ChoiceItem], pad_id: int, vocab_size: int, batch_size: int = 8,
                    progress: bool = True) -> dict:
    """Multiple-choice accuracy by the log-likelihood of each choice's continuation given the context,
    as lm-evaluation-harness scores it: ``mc_acc`` picks the choice with the largest SUM of token
    log-probs (its ``acc``); ``mc_acc_norm`` the largest sum divided by the continuation's length in
    characters (its ``acc_norm``). Ties go to the first choice. Returns {"mc_acc", "mc_acc_norm", "mc_questions"}."""
    share = my_share(len(items))
    pairs = [(q, c) for q in share for c in range(len(items[q].continuations))]
    loglik: dict[tuple[int, int], float] = {}
    bar = _bar(len(pairs), "multiple choice", progress)
    for lo in range(0, len(pairs), batch_size):
        chunk = pairs[lo:lo + batch_size]
        seqs = [items[q].context + items[q].continuations[c] for q, c in chunk]
        starts = [len(items[q].context) for q, _ in chunk]
        logp, targets, owner = batch_logprobs(model, seqs, starts, pad_id, vocab_size)
        token_ll = logp.gather(1, targets[:, None]).squeeze(1).double().cpu()
        sums = torch.zeros(len(chunk), dtype=torch.float64).index_add_(0, owner, token_ll)
        for j, pair in enumerate(chunk):
            loglik[pair] = sums[j].item()
        bar.update(len(chunk))
    bar.close()
    correct = correct_norm = 0
    for q in share:
        item = items[q]
        ll = [loglik[(q, c)] for c in range(len(item.continuations))]
        norm = [x / max(len(t), 1) for x, t in zip(ll, item.texts)]
        correct += max(range(len(ll)), key=lambda c: (ll[c], -c)) == item.label
        correct_norm += max(range(len(norm)), key=lambda c: (norm[c], -c)) == item.label
    correct, correct_norm, n = all_sum([correct, correct_norm, len(share)])
    return {"mc_acc": correct / n, "mc_acc_norm": correct_norm / n, "mc_questions": int(n)}


@torch.no_grad()
def exact_match(model, prompts: list[list[int]], answers: list[list[int]], pad_id: int, eos_id: int,
                batch_size: int = 32, progress: bool = True) -> dict:
    """Fraction of prompts whose greedy continuation equals the reference answer token for token
    (answers end with EOS, so a longer continuation does not match). Batched, left-padded generation
    of at most max(len(answer)) tokens. Returns {"exact_match", "qa_samples"}."""
    share = my_share(len(prompts))
    max_new = max(len(a) for a in answers)
    device = _device(model)
    correct = 0
    bar = _bar(len(share), "exact match (generate)", progress)
    for lo in range(0, len(share), batch_size):
        idx = share[lo:lo + batch_size]
        ids, mask = left_pad([prompts[i] for i in idx], pad_id)
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new,
                             do_sample=False, pad_token_id=pad_id, eos_token_id=eos_id)[:, ids.shape[1]:]
        for row, i in zip(out.tolist(), idx):
            correct += row[:len(answers[i])] == answers[i]
        bar.update(len(idx))
    bar.close()
    correct, n = all_sum([correct, len(share)])
    return {"exact_match": correct / n, "qa_samples": int(n)}


# ---- speed and memory (this rank alone) --------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def latency(model, prompts: list[list[int]], num_prompts: int = 8, new_tokens: int = 16) -> dict:
    """Batch-1 latency, prefill and decode apart, median over `num_prompts` prompts (one more first, to
    warm up): prefill = one forward over the prompt, ms per prompt token; decode = greedy steps with the
    KV cache, one token each, ms per generated token.

    Returns {"prefill_ms_per_token", "decode_ms_per_token", "latency_prompts"}."""
    device = _device(model)
    prefill, decode = [], []
    for prompt in prompts[:num_prompts + 1]:
        ids = torch.tensor([prompt], device=device)
        _sync(device)
        t0 = time.perf_counter()
        out = model(input_ids=ids, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        _sync(device)
        t1 = time.perf_counter()
        past = out.past_key_values
        for _ in range(new_tokens):
            out = model(input_ids=nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        _sync(device)
        t2 = time.perf_counter()
        prefill.append((t1 - t0) * 1000 / len(prompt))
        decode.append((t2 - t1) * 1000 / new_tokens)
    keep = slice(1, None) if len(prefill) > 1 else slice(None)
    return {"prefill_ms_per_token": statistics.median(prefill[keep]),
            "decode_ms_per_token": statistics.median(decode[keep]), "latency_prompts": len(prefill[keep])}


@torch.no_grad()
def throughput(model, prompts: list[list[int]], pad_id: int, batch_size: int = 16, new_tokens: int = 16,
               repeats: int = 2) -> dict:
    """Generation throughput at batch `batch_size`: generated tokens per second of wall time (greedy,
    exactly `new_tokens` per sequence, KV cache, left-padded prompts; prefill time included), the best
    of `repeats` timed calls after one warm-up call. Returns {"throughput_tokens_per_s", "throughput_batch"}."""
    device = _device(model)
    batch = [prompts[i % len(prompts)] for i in range(batch_size)]
    ids, mask = left_pad(batch, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    kw = dict(do_sample=False, pad_token_id=pad_id, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    model.generate(input_ids=ids, attention_mask=mask, **dict(kw, max_new_tokens=2, min_new_tokens=2))
    best = math.inf
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=mask, **kw)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    generated = (out.shape[1] - ids.shape[1]) * batch_size
    return {"throughput_tokens_per_s": generated / best, "throughput_batch": batch_size}


def parameter_count(model) -> int:
    """Parameters (elements of the unquantised shapes: a bitsandbytes 4-bit weight, stored packed two
    per byte, counts the elements of its original shape, ``quant_state.shape``)."""
    total = 0
    for p in model.parameters():
        shape = getattr(getattr(p, "quant_state", None), "shape", None)
        total += math.prod(shape) if shape is not None else p.numel()
    return total


def weights_mib(model) -> float:
    """Bytes of parameters and buffers as stored (int8 weights count 1 byte each), in MiB."""
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())) / 2**20


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc malloc_trim), so that a peak
    measured next starts from what is really in use."""
    import ctypes
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory while the block runs, above what was in use when it began, in MiB.

    CUDA: ``torch.cuda.max_memory_allocated`` (tensors, exact). CPU: the process's resident set size
    sampled every `interval_s` by a thread (psutil) -- it includes every allocation (weights,
    activations, the allocator's slack) and can miss a peak shorter than the interval.
    """

    def __init__(self, interval_s: float = 0.005):
        self.interval_s, self.peak_mib, self._stop = interval_s, None, threading.Event()

    def _rss(self) -> int:
        import psutil

        return psutil.Process().memory_info().rss

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, self._rss())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "PeakMemory":
        release_memory()
        self.cuda = torch.cuda.is_available()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            self._base = self._peak = self._rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            peak = max(self._peak, self._rss())
        self.peak_mib = (peak - self._base) / 2**20

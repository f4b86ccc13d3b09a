"""A real-text stand-in for an LLM teacher's top-k: a bigram language model over a BPE vocabulary,
both trained on real text files, for measuring the cache codec on realistic token statistics
where no large teacher can be downloaded.

Tokenizer: byte-level BPE trained with `tokenizers` on the files (up to --vocab tokens; the
corpus decides how many merges exist). Teacher: Witten-Bell interpolated bigram model
``p(n | prev) = lam c(prev, n) / c(prev) + (1 - lam) p_uni(n)``, ``lam = c(prev) / (c(prev) +
types(prev))``, add-0.5 unigram. It is normalised over the whole vocabulary, so a row's raw
logits are ``log p`` and its logsumexp is 0. Rows: every position of `windows` random windows
of the tokenized corpus; a row's top-k is the k most probable next tokens.

What it models well: Zipfian token frequencies of real text and a real BPE vocabulary's id
order, top-k sets that mix context-specific continuations with the frequent tokens every
context allows. What it does not: an LLM's sharper, longer-context distributions.
"""

from __future__ import annotations

import numpy as np


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE `tokenizers.Tokenizer` trained on `texts` (line by line)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((line for t in texts for line in t.splitlines()), trainer)
    return tok


def bigram_topk_rows(token_ids: np.ndarray, vocab: int, k: int, windows: int, window_len: int, rng):
    """Top-k rows of the bigram teacher at every position of `windows` random windows.

    Returns ids int64 [windows * window_len, k], raw logits fp32 (log-probabilities), lse fp32 (zeros).
    """
    uni = np.bincount(token_ids, minlength=vocab).astype(np.float64) + 0.5
    p_uni = uni / uni.sum()
    keys, counts = np.unique(token_ids[:-1] * vocab + token_ids[1:], return_counts=True)
    first = np.searchsorted(keys // vocab, np.arange(vocab + 1))
    starts = rng.integers(1, len(token_ids) - window_len, windows)
    prevs = np.concatenate([token_ids[s - 1:s - 1 + window_len] for s in starts])
    unique_prev, which = np.unique(prevs, return_inverse=True)
    top_ids = np.empty((len(unique_prev), k), np.int64)
    top_z = np.empty((len(unique_prev), k), np.float32)
    for i, prev in enumerate(unique_prev):
        nxt, c = keys[first[prev]:first[prev + 1]] % vocab, counts[first[prev]:first[prev + 1]].astype(np.float64)
        total = c.sum()
        lam = total / (total + len(c)) if total else 0.0
        p = (1.0 - lam) * p_uni
        p[nxt] += lam * c / max(total, 1.0)
        pick = np.argpartition(-p, k)[:k]
        top_ids[i], top_z[i] = pick, np.log(p[pick])
    return top_ids[which], top_z[which], np.zeros(len(prevs), np.float32)


def corpus_rows(paths: list[str], vocab_size: int, k: int, windows: int, window_len: int, rng):
    """(ids, logits, lse, V, corpus tokens) for the bigram teacher of the text files `paths`."""
    texts = [open(p, "rb").read().decode("utf-8", "ignore") for p in paths]
    tok = train_tokenizer(texts, vocab_size)
    encoded = tok.encode_batch([line for t in texts for line in t.splitlines()])
    token_ids = np.concatenate([np.asarray(e.ids, dtype=np.int64) for e in encoded])
    vocab = tok.get_vocab_size()
    ids, z, lse = bigram_topk_rows(token_ids, vocab, k, windows, window_len, rng)
    return ids, z, lse, vocab, len(token_ids)

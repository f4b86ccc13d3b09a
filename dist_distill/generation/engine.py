"""The teacher's decoding backends: transformers `generate` (everywhere) and vLLM (when installed, CUDA).

Both take the rows of one chunk -- the prompt token ids of each (prompt, sample) pair, prompt-major --
and return each row's completion token ids with the EOS cut off, and whether it stopped at an EOS
("stop") or at generate.max_new_tokens ("length"). The runner decodes and writes them the same way
whichever backend made them.

Randomness (what makes a resumed or re-sharded run equal an uninterrupted one):

- hf: the chunk's rows are cut into fixed batches of generate.batch_size rows; before batch b of chunk
  c the torch generator (CPU and CUDA) is seeded with `batch_seed(seed, c, b)`. A batch's tokens are
  therefore a function of (seed, chunk, batch, its rows): the same whichever worker or attempt runs the
  chunk. They do depend on generate.batch_size and chunk_prompts (both part of the build's identity).
- vllm: each row is its own request with SamplingParams.seed = `row_seed(seed, prompt index, sample
  index)`, so its tokens do not depend on batching at all.
Greedy decoding (temperature 0) is deterministic in both; hf and vllm agree there up to the numerics of
their kernels (sampled outputs differ: the two draw from different random streams).
"""

from __future__ import annotations

import hashlib

import torch


def _seed(*parts: int) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def batch_seed(seed: int, chunk: int, batch: int) -> int:
    """The torch seed of batch `batch` of chunk `chunk` (hf backend), in [0, 2^63)."""
    return _seed(seed, chunk, batch)


def row_seed(seed: int, prompt: int, sample: int) -> int:
    """The vLLM request seed of sample `sample` of prompt record `prompt`, in [0, 2^31)."""
    return _seed(seed, prompt, sample) % (1 << 31)


def cut_at_eos(tokens: list[int], eos: set[int]) -> tuple[list[int], str]:
    """(tokens before the first EOS, "stop"), or (tokens, "length") when no EOS was generated."""
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[:i], "stop"
    return tokens, "length"


class HFEngine:
    """transformers `generate` on one model (whole on its device, or spread by device_map="auto").

    model: a causal LM in eval mode; pad_id: the tokenizer's pad token (left padding); eos: the ids that
    end a response (the tokenizer's EOS and the model's generation_config eos_token_id); g: the recipe's
    GenerateSpec; vocab_size: the tokenizer's (len(tokenizer)); model rows past it are suppressed.
    Memory: one batch of [batch_size, prompt + max_new_tokens] tokens and its KV cache.
    """

    name = "hf"

    def __init__(self, model, pad_id: int, eos: list[int], g, seed: int, vocab_size: int):
        self.model, self.pad_id, self.eos, self.g, self.seed = model, pad_id, eos, g, seed
        # ids past the tokenizer's vocabulary (a model's padded embedding rows) mean nothing: never emitted
        self.suppress = list(range(vocab_size, model.config.vocab_size)) or None

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    def _settings(self) -> dict:
        g = self.g
        sampled = g.temperature > 0
        # every knob set explicitly: values the model's generation_config.json would fill in (top_k=50,
        # repetition penalties, min_p ...) must not change what the recipe asked for
        return dict(do_sample=sampled, temperature=g.temperature if sampled else 1.0, top_p=g.top_p if sampled else 1.0,
                    top_k=g.top_k if sampled else 0, min_p=0.0, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0,
                    repetition_penalty=1.0, no_repeat_ngram_size=0, num_beams=1, num_return_sequences=1,
                    max_new_tokens=g.max_new_tokens, min_new_tokens=0, pad_token_id=self.pad_id,
                    eos_token_id=self.eos, suppress_tokens=self.suppress, return_dict_in_generate=False)

    @torch.no_grad()
    def generate(self, chunk: int, rows: list[list[int]], keys: list[tuple[int, int]]) -> list[tuple[list[int], str]]:
        """rows: prompt token ids per (prompt, sample) row; keys: (prompt index, sample index) per row (unused
        here: hf randomness is per batch, see the module docstring). Returns (completion ids, finish) per row."""
        out, eos, bs = [], set(self.eos), self.g.batch_size
        for b, a in enumerate(range(0, len(rows), bs)):
            batch = rows[a:a + bs]
            width = max(len(r) for r in batch)
            ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for i, r in enumerate(batch):  # left padding: every row's last prompt token at column width - 1
                ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
                mask[i, width - len(r):] = 1
            if self.g.temperature > 0:
                torch.manual_seed(batch_seed(self.seed, chunk, b))  # seeds the CPU and every CUDA generator
            new = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                      **self._settings())[:, width:].tolist()
            out.extend(cut_at_eos(t, eos) for t in new)
        return out


class VLLMEngine:
    """vLLM's offline `LLM` (tensor-parallel over teacher_source.tp_size GPUs of this process's node).

    Written against vLLM's documented API: ``LLM(model=..., tokenizer=..., revision=..., dtype=...,
    tensor_parallel_size=..., seed=..., trust_remote_code=...)``, ``LLM.generate(prompts, sampling_params,
    use_tqdm=...)`` with prompts as ``{"prompt_token_ids": [...]}`` (TokensPrompt) and one SamplingParams
    per request, returning RequestOutputs in input order whose ``outputs[0].token_ids`` are the completion.
    Not installed on the CI machines: tests skip it. vLLM schedules the requests itself (continuous
    batching), so generate.batch_size does not apply; one chunk is one `generate` call. Unlike hf, ids past
    the tokenizer's vocabulary are not suppressed (trained checkpoints give their padded rows ~zero mass).
    """

    name = "vllm"

    def __init__(self, spec, tp_size: int, eos: list[int], g, seed: int):
        from vllm import LLM

        self.eos, self.g, self.seed = eos, g, seed
        self.llm = LLM(model=spec.name_or_path, tokenizer=spec.name_or_path, revision=spec.revision,
                       tokenizer_revision=spec.revision, dtype=spec.dtype,
                       tensor_parallel_size=tp_size, seed=seed, trust_remote_code=spec.trust_remote_code)

    def _params(self, prompt: int, sample: int):
        from vllm import SamplingParams

        g = self.g
        sampled = g.temperature > 0
        return SamplingParams(n=1, temperature=g.temperature if sampled else 0.0, top_p=g.top_p if sampled else 1.0,
                              top_k=g.top_k if sampled and g.top_k > 0 else -1, min_p=0.0, repetition_penalty=1.0,
                              presence_penalty=0.0, frequency_penalty=0.0, max_tokens=g.max_new_tokens,
                              stop_token_ids=list(self.eos), seed=row_seed(self.seed, prompt, sample) if sampled else None)

    def generate(self, chunk: int, rows: list[list[int]], keys: list[tuple[int, int]]) -> list[tuple[list[int], str]]:
        eos = set(self.eos)
        results = self.llm.generate([{"prompt_token_ids": r} for r in rows], [self._params(p, s) for p, s in keys],
                                    use_tqdm=False)
        return [cut_at_eos(list(r.outputs[0].token_ids), eos) for r in results]


def vllm_available() -> bool:
    import importlib.util

    return torch.cuda.is_available() and importlib.util.find_spec("vllm") is not None

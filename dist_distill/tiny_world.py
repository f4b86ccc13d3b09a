"""A tiny world that needs no network: a task, a tokenizer, and teacher/student models.

The task is sorting the digits of a 6-digit string, ``"314159="`` -> ``"113459"``, as a
language model sees it. The held-out split holds digit strings never seen in training, so
its accuracy measures generalisation, not recall. The training corpora are noisy like real
data: with probability `noise` an answer carries a slip (two neighbouring digits swapped).
The teacher learns from a large corpus, where slips average out; the students see a small
one, where a hard label is wrong 30% of the time and the teacher's soft targets carry the
rule -- the situation distillation is for.

Outputs (under `out_dir`):
  data/teacher_train.jsonl   the teacher's corpus (large, noisy)
  data/student_train.jsonl   the students' corpus (a smaller noisy sample)
  data/heldout.jsonl         clean answers for unseen operand pairs
  tokenizer/                 a BPE tokenizer trained here with `tokenizers`, HF format
  teacher_init/, student_init/  randomly initialised Llama models (safetensors) + tokenizer
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from dist_distill.errors import run_cli

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]

TEACHER_SHAPE = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
                     num_key_value_heads=4)
STUDENT_SHAPE = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2)


NUM_DIGITS = 6


def sort_record(digits: str, noise: float, rng: random.Random) -> dict:
    """A prompt/answer record; with probability `noise` two neighbouring answer digits are swapped
    (or, when they are equal, one digit is replaced), so the answer is wrong."""
    answer = sorted(digits)
    if noise > 0 and rng.random() < noise:
        i = rng.randrange(len(answer) - 1)
        answer[i], answer[i + 1] = answer[i + 1], answer[i]
        if answer == sorted(digits):
            j = rng.randrange(len(answer))
            answer[j] = str((int(answer[j]) + rng.randrange(1, 10)) % 10)
    return {"prompt": digits + "=", "answer": "".join(answer)}


def random_digits(rng: random.Random) -> str:
    return "".join(str(rng.randrange(10)) for _ in range(NUM_DIGITS))


def make_splits(num_heldout: int, teacher_samples: int, student_samples: int, noise: float,
                seed: int) -> tuple[list[dict], list[dict], list[dict]]:
    """(teacher corpus, student corpus, clean held-out records); no held-out string is in training."""
    rng = random.Random(seed)
    heldout: dict[str, None] = {}
    while len(heldout) < num_heldout:
        heldout[random_digits(rng)] = None

    def corpus(n: int) -> list[dict]:
        records = []
        while len(records) < n:
            digits = random_digits(rng)
            if digits not in heldout:
                records.append(sort_record(digits, noise, rng))
        return records

    teacher, student = corpus(teacher_samples), corpus(student_samples)
    return teacher, student, [sort_record(d, 0.0, rng) for d in heldout]


def write_jsonl(path: Path, records: list[dict]) -> None:
    """Write records one JSON object per line, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.replace(path)


def train_tokenizer(texts: list[str], out_dir: Path):
    """A byte-pair-encoding tokenizer trained on `texts`, digits split one per token, saved in HF format."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)])
    tok.decoder = decoders.BPEDecoder()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=64, special_tokens=SPECIAL_TOKENS))
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")
    fast.save_pretrained(out_dir)
    return fast


def padded_vocab(n: int, multiple: int = 32) -> int:
    """Model vocabulary rounded up past the tokenizer's, as real checkpoints do (Qwen2.5: 151936)."""
    return (n + multiple - 1) // multiple * multiple


def build_model(shape: dict, tokenizer, out_dir: Path, seed: int) -> int:
    """A randomly initialised Llama with the given shape, saved with save_pretrained; returns #params."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=padded_vocab(len(tokenizer)), max_position_embeddings=64,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, **shape)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return sum(p.numel() for p in model.parameters())


def build_world(out_dir: str | Path, *, teacher_samples: int = 40000, student_samples: int = 600,
                num_heldout: int = 500, noise: float = 0.3, seed: int = 0) -> dict:
    """Create the data, tokenizer and initial models under `out_dir`; returns a summary dict."""
    out = Path(out_dir)
    teacher, student, heldout = make_splits(num_heldout, teacher_samples, student_samples, noise, seed)
    write_jsonl(out / "data/teacher_train.jsonl", teacher)
    write_jsonl(out / "data/student_train.jsonl", student)
    write_jsonl(out / "data/heldout.jsonl", heldout)
    tokenizer = train_tokenizer([r["prompt"] + r["answer"] for r in teacher], out / "tokenizer")
    return {
        "tokenizer_vocab": len(tokenizer),
        "teacher_params": build_model(TEACHER_SHAPE, tokenizer, out / "teacher_init", seed + 1),
        "student_params": build_model(STUDENT_SHAPE, tokenizer, out / "student_init", seed + 2),
        "teacher_samples": teacher_samples, "student_samples": student_samples, "heldout": num_heldout,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dd-tiny-world", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="directory to create the world in")
    parser.add_argument("--teacher-samples", type=int, default=40000, help="records in the teacher's corpus")
    parser.add_argument("--student-samples", type=int, default=600, help="records in the students' corpus")
    parser.add_argument("--heldout", type=int, default=500, help="digit strings held out for evaluation")
    parser.add_argument("--noise", type=float, default=0.3, help="probability that a training answer carries a slip")
    parser.add_argument("--seed", type=int, default=0, help="seed for data, split and model initialisation")
    args = parser.parse_args(argv)
    summary = build_world(args.out_dir, teacher_samples=args.teacher_samples, student_samples=args.student_samples,
                          num_heldout=args.heldout, noise=args.noise, seed=args.seed)
    print(json.dumps(summary, indent=2))
    return 0


def cli() -> None:
    """Console-script entry point: bad input exits 2 with a one-paragraph message."""
    raise SystemExit(run_cli(main, "dd-tiny-world"))


if __name__ == "__main__":
    cli()

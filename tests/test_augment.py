"""Augmentation at prepare time (data/augment.py): the synonyms built-in, the user hook, the store key."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from dist_distill.data import augment, store as store_mod
from dist_distill.data.rows import encode_batch
from dist_distill.errors import UserError
from dist_distill.recipe import AugmentSpec, DataSpec, RecipeError, load_recipe


def test_synonym_replacement_exact(tmp_path):
    table_file = tmp_path / "syn.tsv"
    table_file.write_text("# word -> synonyms\nquick\tfast\tspeedy\nfox\tvixen\nDog\thound\n")
    table = augment.load_synonym_table(str(table_file))
    assert table == {"quick": ["fast", "speedy"], "fox": ["vixen"], "dog": ["hound"]}
    text = "The Quick brown fox jumps over the lazy dog. QUICK!"
    # probability 1 with one synonym each is fully determined; the case of the replaced word is kept
    one = {"quick": ["fast"], "fox": ["vixen"], "dog": ["hound"]}
    assert augment.replace_synonyms(text, one, 1.0, random.Random(0)) == "The Fast brown vixen jumps over the lazy hound. FAST!"
    assert augment.replace_synonyms(text, table, 0.0, random.Random(0)) == text
    # the documented draws: one random() per table word in text order, one choice() per replacement
    ref = random.Random(7)

    def draw(word, case):
        return case(ref.choice(table[word.lower()])) if ref.random() < 0.5 else word

    cap = lambda w: w[:1].upper() + w[1:]  # noqa: E731
    a, b, c, d = draw("Quick", cap), draw("fox", str), draw("dog", str), draw("QUICK", str.upper)
    want = f"The {a} brown {b} jumps over the lazy {c}. {d}!"
    assert want != text
    assert augment.replace_synonyms(text, table, 0.5, random.Random(7)) == want


def _records(path, prompts):
    path.write_text("".join(json.dumps({"prompt": p, "answer": "1"}) + "\n" for p in prompts))
    return path


@pytest.mark.bad_inputs(7)
def test_augmented_store_streams_and_is_keyed_by_the_table(tiny_world, tmp_path, monkeypatch):
    from dist_distill.data.store import TokenStore, prepare, store_key
    from dist_distill.models.loading import load_tokenizer
    from dist_distill.recipe import ModelSpec

    tok = load_tokenizer(ModelSpec(name_or_path=str(tiny_world / "student_init")), "student")
    data = _records(tmp_path / "d.jsonl", ["12 34=", "34 5=", "7 8=", "12 12="])
    table = tmp_path / "syn.json"
    table.write_text(json.dumps({"12": ["21"], "34": ["43", "44"]}))
    spec = DataSpec(train=str(data), max_seq_len=16, store_dir=str(tmp_path / "stores"),
                    augment=[AugmentSpec(fn="synonyms", table=str(table), probability=0.6, seed=3, copies=2)])

    # the variants are a function of (seed, record index, copy): the same whether records come one by one
    raw = [json.loads(line) for line in data.read_text().splitlines()]
    items = augment.expand(augment.resolve(spec), raw, 0)
    assert items == [x for k, rec in enumerate(raw) for x in augment.expand(augment.resolve(spec), [rec], k)]
    # a copy in which nothing was replaced is not made (never a duplicate): "7 8=" has no table word
    assert [(i, v) for _, i, v in items if v == ""] == [(k, "") for k in range(4)]  # every original kept
    assert {(i, v) for _, i, v in items if v} <= {(k, v) for k in (0, 1, 3) for v in (".0:0", ".0:1")}
    assert len(items) > 6  # p = 0.6 over 1-2 table words per prompt: most copies are made
    assert all(r["prompt"] != raw[i]["prompt"] for r, i, v in items if v)
    assert {r["prompt"] for r, i, _ in items if i == 3} <= {"12 12=", "21 12=", "12 21=", "21 21="}

    # the store: 1 + 2 samples per record, streamed chunk by chunk (CHUNK = 3 here: 4 chunks), same result
    # as one chunk; its tokens are the augmented records' tokens
    monkeypatch.setattr(store_mod, "CHUNK", 3)
    small = TokenStore(prepare(str(data), tok, spec, rank=0, world=1))
    assert len(small) == len(items) and small.meta["records"] == 4
    assert np.load(small.path / "records.npy").tolist() == [i for _, i, _ in items]
    want = encode_batch([r for r, _, _ in items], tok, spec, "prompt_answer")
    assert [small.tokens[small.offsets[i]:small.offsets[i + 1]].tolist() for i in range(len(items))] == \
        [list(w[0]) for w in want]
    monkeypatch.setattr(store_mod, "CHUNK", 8192)
    whole = TokenStore(prepare(str(data), tok, DataSpec(**{**spec.__dict__, "store_dir": str(tmp_path / "s2")}),
                               rank=0, world=1))
    assert whole.meta["token_ids_sha256"] == small.meta["token_ids_sha256"]
    ident = small.meta["identity"]["augment"][0]
    assert ident["table_sha256"] == augment._file_sha256(table) and ident["probability"] == 0.6

    # a changed table is a new store (rebuilt, not reused); the same bytes written again are the same store
    key = store_key(str(data), tok, spec)[0]
    table.write_text(json.dumps({"12": ["99"], "34": ["43", "44"]}))
    key2 = store_key(str(data), tok, spec)[0]
    assert key2 != key
    rebuilt = TokenStore(prepare(str(data), tok, spec, rank=0, world=1))
    assert rebuilt.path.name == key2 and rebuilt.meta["token_ids_sha256"] != small.meta["token_ids_sha256"]
    assert (small.path / "meta.json").exists()  # the old store is still there, for its own recipe
    table.write_text(json.dumps({"12": ["99"], "34": ["43", "44"]}))
    assert store_key(str(data), tok, spec)[0] == key2
    # held-out data read with the same settings is never augmented
    assert "augment" not in store_key(str(data), tok, DataSpec(**{**spec.__dict__, "train": "other.jsonl"}))[1]

    # bad inputs: each a clear error naming the key
    for sets, text in {"data.augment=[{fn: synonyms}]": "needs a table",
                       "data.augment=[{fn: nothing_here}]": "expected \"synonyms\" or",
                       f"data.augment=[{{fn: synonyms, table: {table}, probability: 2}}]": r"probability=2.0",
                       f"data.augment=[{{fn: synonyms, table: {table}, copies: 0}}]": r"copies=0"}.items():
        with pytest.raises(RecipeError, match=text):
            load_recipe(None, ["student.name_or_path=x", f"data.train={data}", "teacher_source.kind=none",
                               "loss.ce_weight=1.0", sets])
    with pytest.raises(UserError, match="cannot import module 'no_such_module_dd'"):
        augment.resolve(DataSpec(train="x", augment=[AugmentSpec(fn="no_such_module_dd:f")]))
    bad = tmp_path / "bad.py"
    bad.write_text("def f(record, *, rng, copy, fields):\n    return 'text'\n")
    with pytest.raises(UserError, match="returned a str for record 0, expected a dict"):
        augment.expand(augment.resolve(DataSpec(train="x", augment=[AugmentSpec(fn=f"{bad}:f")])), raw[:1], 0)
    raising = tmp_path / "raising.py"
    raising.write_text("def f(record, *, rng, copy, fields):\n    return {}[fields[0]]\n")
    with pytest.raises(UserError, match=r"raising.py:f failed on record 0 \(copy 0\): KeyError: 'prompt'"):
        prepare(str(data), tok, DataSpec(train=str(data), store_dir=str(tmp_path / "s3"),
                                         augment=[AugmentSpec(fn=f"{raising}:f")]), rank=0, world=1)


def test_user_hook_identity(tmp_path):
    """A user function gets a copy of the record, a seeded rng, copy and fields and its params; its identity is
    module:qualname plus its module's source hash, or the recipe's version string when one is given."""
    fn_file = tmp_path / "my_aug.py"
    fn_file.write_text("def tag(record, *, rng, copy, fields, suffix):\n"
                       "    if copy == 1:\n        return None\n"
                       "    record[fields[0]] += suffix + str(rng.randrange(10))\n    return record\n")
    spec = DataSpec(train="x", augment=[AugmentSpec(fn=f"{fn_file}:tag", copies=2, keep_original=False,
                                                    fields=["answer"], seed=5, params={"suffix": "-"})])
    rec = {"prompt": "p", "answer": "a"}
    (out, index, variant), = augment.expand(augment.resolve(spec), [rec], 4)
    digit = random.Random(augment._seed(5, 0, 4, "", 0)).randrange(10)
    assert out == {"prompt": "p", "answer": f"a-{digit}"} and (index, variant) == (4, ".0:0")
    assert rec == {"prompt": "p", "answer": "a"}  # the input record is not modified
    ident = augment.resolve(spec)[0].identity
    assert ident["function"] == f"{fn_file}:tag" and ident["params"] == {"suffix": "-"}
    assert ident["source_sha256"] == augment._file_sha256(fn_file) and ident["version"] is None
    versioned = DataSpec(train="x", augment=[AugmentSpec(fn=f"{fn_file}:tag", version="v2", params={"suffix": "-"})])
    assert "source_sha256" not in augment.resolve(versioned)[0].identity
    assert augment.resolve(versioned)[0].identity["version"] == "v2"

"""The token store: same tensors and fingerprints as tokenizing in memory, every indexing form, a parallel
(2-rank) and a resumed build equal to a straight one, atomic publication, bad-row policies per kind, and
chat templates with response-only masking."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading

import numpy as np
import pytest
import torch

from dist_distill.data import store as store_mod
from dist_distill.data.records import IGNORE_INDEX, load_tokenized
from dist_distill.errors import UserError
from dist_distill.models.loading import load_tokenizer
from dist_distill.recipe import DataSpec, ModelSpec


def reference(path, tok, length):
    """The pre-store in-memory tokenization (records.py before the store), the reference for ids and fingerprints."""
    rows = [json.loads(line) for line in open(path) if line.strip()]
    prompts = tok([r["prompt"] for r in rows])["input_ids"]
    answers = tok([r["answer"] for r in rows], add_special_tokens=False)["input_ids"]
    ids = torch.full((len(rows), length), tok.pad_token_id, dtype=torch.long)
    att = torch.zeros_like(ids)
    tgt = torch.full_like(ids, IGNORE_INDEX)
    for i, (p, a) in enumerate(zip(prompts, answers)):
        seq = p + a + [tok.eos_token_id]
        ids[i, :len(seq)], att[i, :len(seq)] = torch.tensor(seq), 1
        tgt[i, len(p) - 1:len(seq) - 1] = torch.tensor(seq[len(p):])
    fp = hashlib.sha256(ids.numpy().tobytes()).hexdigest()
    tfp = hashlib.sha256(np.packbits((tgt != IGNORE_INDEX).numpy(), axis=1).tobytes()).hexdigest()
    return ids, att, tgt, fp, tfp


@pytest.fixture
def tok(tiny_world):
    return load_tokenizer(ModelSpec(name_or_path=str(tiny_world / "student_init")), "student")


@pytest.fixture
def spec(tmp_path):
    return DataSpec(train="x", max_seq_len=24, store_dir=str(tmp_path / "stores"))


def test_store_equals_in_memory_tokenization(tiny_world, tok, spec):
    path = tiny_world / "data/heldout.jsonl"
    ids, att, tgt, fp, tfp = reference(path, tok, spec.max_seq_len)
    data = load_tokenized(str(path), tok, spec)
    assert len(data) == len(ids) and data.input_ids.shape == ids.shape
    assert torch.equal(data.input_ids[:], ids) and torch.equal(data.attention_mask[:], att)
    assert torch.equal(data.targets[:], tgt)
    assert (data.fingerprint, data.targets_fingerprint) == (fp, tfp)  # existing caches keep matching
    idx = torch.tensor([5, 0, 63, 5])
    for index, want in [(idx, ids[idx]), (3, ids[3]), (torch.tensor(7), ids[7]), (slice(10, 20, 3), ids[10:20:3]),
                        ([1, 2], ids[[1, 2]]), (-1, ids[-1]), (slice(60, 99), ids[60:])]:
        got = data.input_ids[index]
        assert got.dtype == torch.int64 and torch.equal(got, want), index
    assert int(data.attention_mask[2:9].sum()) == int(att[2:9].sum())
    with pytest.raises(IndexError, match="out of range for a store of 64 samples"):
        data.targets[torch.tensor([64])]


def test_parallel_and_resumed_builds_equal_a_straight_one(tiny_world, tok, spec, tmp_path, monkeypatch):
    monkeypatch.setattr(store_mod, "CHUNK", 10)  # 64 records -> 7 chunks
    path = str(tiny_world / "data/heldout.jsonl")
    straight = store_mod.TokenStore(store_mod.prepare(path, tok, spec))

    # two ranks in threads: each builds its contiguous chunks, rank 0 publishes, rank 1 waits for it
    par_spec = dataclasses.replace(spec, store_dir=str(tmp_path / "par"))
    results = {}
    t = threading.Thread(target=lambda: results.setdefault(1, store_mod.prepare(path, tok, par_spec, rank=1, world=2)))
    t.start()
    results[0] = store_mod.prepare(path, tok, par_spec, rank=0, world=2)
    t.join(60)
    assert results[0] == results[1]
    par = store_mod.TokenStore(results[0])

    # a build killed after 3 chunks leaves no store, then resumes at chunk 3
    res_spec = dataclasses.replace(spec, store_dir=str(tmp_path / "res"))
    real, built = store_mod.build_chunk, []

    def dying(records, tokenizer, s, fmt, index, *rest):
        if len(built) == 3:
            raise KeyboardInterrupt("killed")
        built.append(index)
        return real(records, tokenizer, s, fmt, index, *rest)

    monkeypatch.setattr(store_mod, "build_chunk", dying)
    with pytest.raises(KeyboardInterrupt):
        store_mod.prepare(path, tok, res_spec)
    key = store_mod.store_key(path, tok, res_spec)[0]
    assert not (tmp_path / "res" / key).exists()  # a partial store never looks complete
    assert sorted(p.name for p in (tmp_path / "res" / f"{key}.partial").glob("chunk-*.npz")) == \
        [f"chunk-{c:06d}.npz" for c in range(3)]
    built.clear()
    monkeypatch.setattr(store_mod, "build_chunk", real)
    calls = []
    monkeypatch.setattr(store_mod, "build_chunk", lambda *a: (calls.append(a[4]), real(*a)))
    resumed = store_mod.TokenStore(store_mod.prepare(path, tok, res_spec))
    assert calls == [3, 4, 5, 6]
    assert not (tmp_path / "res" / f"{key}.partial").exists()
    for other in (par, resumed):
        for name in ("tokens", "labels", "offsets"):
            assert np.array_equal(getattr(other, name), getattr(straight, name)), name
        assert other.meta["token_ids_sha256"] == straight.meta["token_ids_sha256"]
    # a second call finds the store without reading the records
    monkeypatch.setattr(store_mod, "RecordSource", None)
    assert store_mod.prepare(path, tok, spec) == straight.path


def test_key_changes_with_data_tokenizer_and_settings(tiny_world, tok, spec, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text((tiny_world / "data/heldout.jsonl").read_text())
    key = store_mod.store_key(str(path), tok, spec)[0]
    assert store_mod.store_key(str(path), tok, dataclasses.replace(spec, max_seq_len=25))[0] != key
    assert store_mod.store_key(str(path), tok, dataclasses.replace(spec, too_long="skip"))[0] != key
    tok2 = load_tokenizer(ModelSpec(name_or_path=str(tiny_world / "student_init")), "student")
    assert store_mod.store_key(str(path), tok2, spec)[0] == key
    tok2.chat_template = "{{ messages }}"
    assert store_mod.store_key(str(path), tok2, spec)[0] != key
    path.write_text(path.read_text() + '{"prompt": "a", "answer": "b"}\n')
    assert store_mod.store_key(str(path), tok, spec)[0] != key


BAD = [  # (line, kind)
    ('{"prompt": "1 + 1 =", "answer": "2"}', None),
    ('{"prompt": "1 + 2 =", "answer": "' + " ".join(["3"] * 40) + '"}', "too_long"),
    ('{"prompt": "1 + 3 =", "answer": ""}', "empty"),
    ('{"prompt": "1 + 4 ="}', "missing_field"),
    ('{"prompt": "1 + 5 =", "answer": 6}', "wrong_type"),
    ('{"prompt": "1 + 6 =", "answer": "7"', "undecodable"),
    ('["not", "an", "object"]', "wrong_type"),
    ('{"prompt": "2 + 2 =", "answer": "4"}', None),
]


@pytest.mark.bad_inputs(6)
@pytest.mark.parametrize("kind", ["too_long", "empty", "missing_field", "wrong_type", "undecodable"])
def test_each_bad_row_kind_fails_by_default(tok, spec, tmp_path, kind):
    path = tmp_path / f"{kind}.jsonl"
    path.write_text("\n".join(line for line, k in BAD if k in (None, kind)) + "\n")
    setting = "data.too_long" if kind == "too_long" else "data.bad_rows"
    with pytest.raises(UserError, match=rf"record \d .*\[{kind}\]; set {setting}"):
        load_tokenized(str(path), tok, spec)


@pytest.mark.bad_inputs(1)
def test_bad_rows_skipped_truncated_and_counted(tok, spec, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(("\n".join(line for line, _ in BAD) + "\n").encode() + b'{"prompt": "\xff", "answer": "1"}\n')
    skip = load_tokenized(str(path), tok, dataclasses.replace(spec, too_long="skip", bad_rows="skip"))
    assert len(skip) == 2 and skip.store.meta["records"] == 9
    assert skip.bad_rows == {"too_long": 1, "truncated": 0, "empty": 1, "missing_field": 1, "wrong_type": 2,
                             "undecodable": 2}
    assert np.load(skip.store.path / "records.npy").tolist() == [0, 7]
    assert "bad rows: too_long 1, empty 1" in skip.store.report()
    trunc = load_tokenized(str(path), tok, dataclasses.replace(spec, too_long="truncate", bad_rows="skip"))
    assert len(trunc) == 3 and trunc.bad_rows["truncated"] == 1 and trunc.bad_rows["too_long"] == 0
    assert int(trunc.attention_mask[1].sum()) == spec.max_seq_len  # kept, cut to max_seq_len
    assert (trunc.targets[1] != IGNORE_INDEX).any()
    with pytest.raises(UserError, match="record 1 has .* tokens, more than data.max_seq_len=24"):
        load_tokenized(str(path), tok, dataclasses.replace(spec, bad_rows="skip"))


@pytest.mark.bad_inputs(1)
def test_no_usable_record_is_an_error(tok, spec, tmp_path):
    path = tmp_path / "none.jsonl"
    path.write_text('{"prompt": "x"}\n')
    with pytest.raises(UserError, match="no usable record"):
        load_tokenized(str(path), tok, dataclasses.replace(spec, bad_rows="skip"))


TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|> {{ m.content }}{{ eos_token }}{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture
def chat_tok(tiny_world):
    tok = load_tokenizer(ModelSpec(name_or_path=str(tiny_world / "student_init")), "student")
    tok.add_special_tokens({"additional_special_tokens": ["<|system|>", "<|user|>", "<|assistant|>"]})
    tok.chat_template = TEMPLATE
    return tok


CHAT = [{"role": "system", "content": "add"}, {"role": "user", "content": "1 + 2 ="},
        {"role": "assistant", "content": "3"}, {"role": "user", "content": "2 + 2 ="},
        {"role": "assistant", "content": "4"}]


@pytest.mark.parametrize("loss_on", ["assistant", "last_assistant", "all"])
def test_chat_template_masks_assistant_tokens(chat_tok, spec, tmp_path, loss_on):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": CHAT}) + "\n")
    data = load_tokenized(str(path), chat_tok, dataclasses.replace(spec, max_seq_len=40, loss_on=loss_on))
    ids, tgt = data.input_ids[0], data.targets[0]
    n = int(data.attention_mask[0].sum())
    text = chat_tok.apply_chat_template(CHAT, tokenize=False)
    assert ids[:n].tolist() == chat_tok(text, add_special_tokens=False)["input_ids"]
    learned = chat_tok.decode(tgt[tgt != IGNORE_INDEX])
    eos = chat_tok.eos_token
    want = {"assistant": f"3{eos}4{eos}", "last_assistant": f"4{eos}", "all": None}[loss_on]
    if want is None:
        assert (tgt[:n - 1] != IGNORE_INDEX).all()
    else:
        assert learned.replace(" ", "") == want
    positions = (tgt != IGNORE_INDEX).nonzero().flatten()
    assert torch.equal(tgt[positions], ids[positions + 1])


@pytest.mark.bad_inputs(4)
def test_chat_bad_rows(chat_tok, spec, tmp_path):
    path = tmp_path / "chat_bad.jsonl"
    rows = [{"messages": CHAT}, {"messages": "hello"}, {"messages": [{"role": "user", "content": "1"}]},
            {"messages": [{"role": "user"}]}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    data = load_tokenized(str(path), chat_tok, dataclasses.replace(spec, max_seq_len=40, bad_rows="skip"))
    assert len(data) == 1 and data.bad_rows["wrong_type"] == 2 and data.bad_rows["empty"] == 1
    chat_tok.chat_template = None
    with pytest.raises(UserError, match="needs a tokenizer with a chat_template"):
        load_tokenized(str(path), chat_tok, dataclasses.replace(spec, max_seq_len=41))


def test_local_parquet_and_csv(tiny_world, tok, spec, tmp_path):
    import datasets

    src = tiny_world / "data/heldout.jsonl"
    ref = load_tokenized(str(src), tok, spec)
    ds = datasets.load_dataset("json", data_files=str(src), split="train")
    ds.to_parquet(str(tmp_path / "h.parquet"))
    ds.to_csv(str(tmp_path / "h.csv"), index=False)
    for name in ("h.parquet", "h.csv"):
        data = load_tokenized(str(tmp_path / name), tok, spec)
        assert data.fingerprint == ref.fingerprint and data.targets_fingerprint == ref.targets_fingerprint, name


@pytest.mark.slow
def test_dd_data_prepare_then_training_finds_the_store(tiny_world, tmp_path):
    """dd-data prepare builds the stores of data.train and data.eval; a second run finds them (no rebuild)."""
    from conftest import module_cmd, world_overrides

    sets = [*world_overrides(tiny_world, tmp_path / "run"), "--set", f"data.store_dir={tmp_path}/stores"]
    first = module_cmd("dist_distill.data_cli", "prepare", "configs/tiny/distill.yaml", *sets, timeout=300)
    assert first.stdout.count("store ready") == 2 and "chunk 1/1" in first.stdout
    stores = sorted(p.name for p in (tmp_path / "stores").iterdir())
    assert len(stores) == 2 and not any(s.endswith(".partial") for s in stores)
    again = module_cmd("dist_distill.data_cli", "prepare", "configs/tiny/distill.yaml", *sets, timeout=300)
    assert "chunk" not in again.stdout and again.stdout.count("store ready") == 2

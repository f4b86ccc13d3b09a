"""Tokenized data alignment and the teacher top-k cache: build, read, resume, refuse mismatches."""

import json
import shutil

import pytest
import torch

from dist_distill.cache import (TeacherCache, build_cache, finalize_cache, info_text, main as cache_main,
                                shard_name, teacher_topk)
from dist_distill.data import IGNORE_INDEX, load_tokenized
from dist_distill.errors import UserError
from dist_distill.models import load_model, load_tokenizer
from dist_distill.recipe import DataSpec, ModelSpec, load_recipe

from conftest import REPO, world_overrides


def recipe_for(world, tmp_path, *extra):
    sets = world_overrides(world, tmp_path / "run")[1::2]
    return load_recipe(REPO / "configs/tiny/distill.yaml", sets + [f"teacher_source.cache_dir={tmp_path}/cache", *extra])


def test_targets_are_next_answer_tokens(tiny_world):
    tok = load_tokenizer(ModelSpec(name_or_path=str(tiny_world / "student_init")), "student")
    data = load_tokenized(str(tiny_world / "data/heldout.jsonl"), tok, DataSpec(train="x", max_seq_len=16))
    record = json.loads((tiny_world / "data/heldout.jsonl").read_text().splitlines()[0])
    answer = tok(record["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids, tgt = data.input_ids[0], data.targets[0]
    positions = (tgt != IGNORE_INDEX).nonzero().flatten()
    assert tgt[positions].tolist() == answer
    assert ids[positions + 1].tolist() == answer  # target at t is the input token at t + 1
    assert data.attention_mask[0].sum() == positions[-1] + 2


def test_too_long_record_is_refused(tiny_world):
    tok = load_tokenizer(ModelSpec(name_or_path=str(tiny_world / "student_init")), "student")
    with pytest.raises(UserError, match="more than data.max_seq_len=8"):
        load_tokenized(str(tiny_world / "data/heldout.jsonl"), tok, DataSpec(train="x", max_seq_len=8))


def test_missing_data_file():
    with pytest.raises(UserError, match="does not exist"):
        load_tokenized("/nonexistent/train.jsonl", None, DataSpec(train="x"))


def test_cache_matches_direct_teacher(tiny_world, tmp_path):
    recipe = recipe_for(tiny_world, tmp_path)
    manifest = build_cache(recipe, samples_per_shard=100, progress=False)
    assert finalize_cache(recipe.teacher_source.cache_dir, manifest)
    cache = TeacherCache(recipe.teacher_source.cache_dir)
    assert len(cache.manifest["shards"]) == 3  # 256 samples, 100 per shard
    tok = load_tokenizer(recipe.teacher, "teacher")
    data = load_tokenized(recipe.data.train, tok, recipe.data)
    model = load_model(recipe.teacher, "teacher").eval()
    idx = torch.tensor([0, 99, 100, 255, 7])
    ids, logits, lse = cache.fetch(idx)
    want_ids, want_logits, want_lse = teacher_topk(model, data.input_ids[idx], data.attention_mask[idx],
                                                   recipe.teacher_source.top_k, len(tok))
    torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-5)
    assert torch.equal(ids, want_ids.long())
    assert ids.max() < len(tok)  # top-k over the real vocabulary, never the padded rows
    assert "k=8" in info_text(recipe.teacher_source.cache_dir)


def test_interrupted_build_resumes_identically(tiny_world, tmp_path):
    recipe = recipe_for(tiny_world, tmp_path)
    manifest = build_cache(recipe, samples_per_shard=100, progress=False)
    finalize_cache(recipe.teacher_source.cache_dir, manifest)
    cache_dir = tmp_path / "cache"
    reference = {p.name: p.read_bytes() for p in cache_dir.iterdir()}
    # a build killed after shard 1's tensors but before its sidecar, and before the manifest
    (cache_dir / f"{shard_name(1)}.json").unlink()
    (cache_dir / "manifest.json").unlink()
    (cache_dir / f"{shard_name(2)}.safetensors").write_bytes(b"partial")
    (cache_dir / f"{shard_name(2)}.json").unlink()
    with pytest.raises(UserError, match="no manifest.json"):
        TeacherCache(cache_dir)
    manifest = build_cache(recipe, samples_per_shard=100, progress=False)
    assert finalize_cache(cache_dir, manifest)
    assert {p.name: p.read_bytes() for p in cache_dir.iterdir()} == reference


def test_array_tasks_split_the_work(tiny_world, tmp_path):
    recipe = recipe_for(tiny_world, tmp_path)
    manifest = build_cache(recipe, shard_index=0, num_shards=2, samples_per_shard=100, progress=False)
    assert not finalize_cache(recipe.teacher_source.cache_dir, manifest)  # shard 1 belongs to task 1
    assert sorted(p.name for p in (tmp_path / "cache").glob("*.json")) == ["shard-00000.json", "shard-00002.json"]
    manifest = build_cache(recipe, shard_index=1, num_shards=2, samples_per_shard=100, progress=False)
    assert finalize_cache(recipe.teacher_source.cache_dir, manifest)


def test_cache_mismatch_is_refused(tiny_world, tmp_path):
    recipe = recipe_for(tiny_world, tmp_path)
    finalize_cache(recipe.teacher_source.cache_dir, build_cache(recipe, progress=False))
    cache = TeacherCache(recipe.teacher_source.cache_dir)
    want = {k: cache.manifest[k] for k in ("tokenizer_sha256", "seq_len", "vocab_size", "k", "dataset")}
    cache.check_matches(want)
    with pytest.raises(UserError, match=r"another sequence length \(data.max_seq_len\): the cache has 16, this recipe needs 32"):
        cache.check_matches(dict(want, seq_len=32))
    with pytest.raises(UserError, match="another tokenizer"):
        cache.check_matches(dict(want, tokenizer_sha256="0" * 64))
    with pytest.raises(UserError, match="keeps k=8 logits per token, the recipe asks teacher_source.top_k=16"):
        cache.check_matches(dict(want, k=16))


def test_verify_finds_a_flipped_byte(tiny_world, tmp_path, capsys):
    recipe = recipe_for(tiny_world, tmp_path)
    finalize_cache(recipe.teacher_source.cache_dir, build_cache(recipe, progress=False))
    assert cache_main(["verify", str(tmp_path / "cache")]) == 0
    shard = tmp_path / "cache" / f"{shard_name(0)}.safetensors"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(UserError, match="shard-00000.safetensors fails its sha256 check"):
        cache_main(["verify", str(tmp_path / "cache")])


def test_other_tokenizer_is_refused(tiny_world, tmp_path):
    other = tmp_path / "other_student"
    shutil.copytree(tiny_world / "student_init", other)
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = "0", "1"
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(tok))
    recipe = recipe_for(tiny_world, tmp_path, f"student.name_or_path={other}")
    with pytest.raises(UserError, match="different tokenizers"):
        build_cache(recipe, progress=False)

"""Tokenized data alignment and the teacher top-k cache: build, read, resume, refuse mismatches and corruption."""

import json
import pickle
import shutil
import subprocess

import pytest
import torch

from asserts import dense_teacher_topk
from dist_distill.teacher.cache import writer as cache_mod
from dist_distill.teacher.cache.reader import TeacherCache, info_text, verify_cache
from dist_distill.teacher.cache.writer import build_cache, finalize_cache
from dist_distill.cache import main as cache_main
from dist_distill.teacher.cache.format import shard_name
from dist_distill.teacher.cache.codec import topk_kl
from dist_distill.data.records import IGNORE_INDEX, load_tokenized
from dist_distill.errors import UserError
from dist_distill.models.loading import load_model, load_tokenizer
from dist_distill.recipe import DataSpec, ModelSpec, load_recipe

from conftest import REPO, mount_tmpfs, torchrun, world_overrides


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


@pytest.mark.bad_inputs(1)
def test_too_long_record_is_refused(tiny_world):
    tok = load_tokenizer(ModelSpec(name_or_path=str(tiny_world / "student_init")), "student")
    with pytest.raises(UserError, match="more than data.max_seq_len=8"):
        load_tokenized(str(tiny_world / "data/heldout.jsonl"), tok, DataSpec(train="x", max_seq_len=8))


@pytest.mark.bad_inputs(1)
def test_missing_data_file():
    with pytest.raises(UserError, match="does not exist"):
        load_tokenized("/nonexistent/train.jsonl", None, DataSpec(train="x"))


def built(recipe, **kw):
    manifest = build_cache(recipe, samples_per_shard=kw.pop("samples_per_shard", 100), progress=False, **kw)
    assert finalize_cache(recipe.teacher_source.cache_dir, manifest)
    return TeacherCache(recipe.teacher_source.cache_dir)


def direct_teacher(recipe, idx):
    """The teacher's top-k at the target positions of samples idx, sorted by id like the cache: (mask, ids, z, lse)."""
    tok = load_tokenizer(recipe.teacher, "teacher")
    data = load_tokenized(recipe.data.train, tok, recipe.data)
    model = load_model(recipe.teacher, "teacher").eval()
    ids, z, lse, _ = dense_teacher_topk(model, data.input_ids[idx], data.attention_mask[idx], recipe.teacher_source.top_k, len(tok))
    order = ids.argsort(dim=-1)
    return data.targets[idx] != IGNORE_INDEX, ids.gather(-1, order).long(), z.gather(-1, order), lse


def by_id(ids, *values):
    """Rows reordered to ascending id (the cache returns them in its storage order)."""
    order = ids.argsort(dim=-1)
    return (ids.gather(-1, order), *(v.gather(-1, order) for v in values))


def files(cache_dir):
    return {p.name: p.read_bytes() for p in sorted(cache_dir.iterdir())}


def test_lossless_cache_round_trips_the_teacher_exactly(tiny_world, tmp_path):
    recipe = recipe_for(tiny_world, tmp_path)
    cache = built(recipe, mode="lossless")
    assert len(cache.manifest["shards"]) == 3  # 256 samples, 100 per shard
    idx = torch.tensor([0, 99, 100, 255, 7])
    ids, logits, lse, _ = cache.fetch(idx)
    ids, logits = by_id(ids, logits)
    mask, want_ids, want_z, want_lse = direct_teacher(recipe, idx)
    assert ids.shape == (5, 16, 8) and logits.dtype == torch.float32 and lse.shape == (5, 16)
    assert torch.equal(ids[mask], want_ids[mask]) and torch.equal(logits[mask], want_z[mask])  # bit-exact
    assert torch.equal(lse[mask], want_lse[mask])
    assert (logits[~mask] == 0).all() and (ids[~mask] == 0).all()  # positions without a loss hold no row
    assert torch.equal(cache.row_mask(idx), mask)
    assert ids.max() < cache.manifest["vocab_size"]  # top-k over the real vocabulary, never the padded rows
    text = info_text(recipe.teacher_source.cache_dir)
    assert "k=8" in text and "codec lossless" in text and "bytes/token=" in text


def test_kl_cache_error_within_its_bound_on_the_teacher(tiny_world, tmp_path):
    """Default lossy mode on the tiny teacher's real outputs: per-token top-k KL <= 1e-3, ids exact."""
    recipe = recipe_for(tiny_world, tmp_path)
    cache = built(recipe)
    assert cache.manifest["codec"]["mode"] == "kl" and cache.manifest["codec"]["max_kl"] == 1e-3
    idx = torch.arange(256)
    ids, logits, lse, _ = cache.fetch(idx)
    ids, logits = by_id(ids, logits)
    mask, want_ids, want_z, want_lse = direct_teacher(recipe, idx)
    assert torch.equal(ids[mask], want_ids[mask])
    logp, want_logp = (logits - lse[..., None])[mask], (want_z - want_lse[..., None])[mask]
    kl = topk_kl(want_logp.numpy(), logp.numpy())
    assert kl.max() <= 1e-3 * (1 + 1e-6), kl.max()
    err = (logp - want_logp).abs().max().item()
    recorded = cache.manifest["error"]
    assert recorded["max_topk_kl"] == pytest.approx(kl.max(), rel=1e-3, abs=1e-9)
    assert recorded["max_abs_logp_err"] == pytest.approx(err, rel=1e-3, abs=1e-6)
    # the most probable token of every row is reconstructed to the float32 rounding of m + lse - lse
    top = want_logp.argmax(dim=-1)
    assert (logp.gather(1, top[:, None]) - want_logp.gather(1, top[:, None])).abs().max() < 1e-5


def test_fetch_with_smaller_k_keeps_the_most_probable(tiny_world, tmp_path):
    recipe = recipe_for(tiny_world, tmp_path)
    cache = built(recipe, mode="lossless")
    idx = torch.tensor([5, 200])
    ids, logits, _, _ = cache.fetch(idx, 3)
    mask, want_ids, want_z, _ = direct_teacher(recipe, idx)
    top_z, pick = want_z.topk(3, dim=-1)
    got = logits[mask].sort(dim=-1, descending=True).values
    assert ids.shape == (2, 16, 3) and torch.equal(got, top_z[mask])
    assert torch.equal(ids[mask].sort(dim=-1).values, want_ids.gather(-1, pick)[mask].sort(dim=-1).values)


@pytest.mark.faults(2)
def test_interrupted_build_resumes_identically(tiny_world, tmp_path, monkeypatch):
    recipe = recipe_for(tiny_world, tmp_path)
    cache_dir = tmp_path / "cache"
    built(recipe)
    reference = files(cache_dir)
    shutil.rmtree(cache_dir)
    # fault 1: killed mid-shard -- shard 1's file is half written (temporary name), its sidecar never came
    real_write = cache_mod.write_atomic
    def killed(path, data):
        if path.name == f"{shard_name(1)}.ddc":
            blob = b"".join(bytes(p) for p in data)
            path.with_name(f".{path.name}.tmp999").write_bytes(blob[:len(blob) // 2])
            raise KeyboardInterrupt
        real_write(path, data)
    monkeypatch.setattr(cache_mod, "write_atomic", killed)
    with pytest.raises(KeyboardInterrupt):
        build_cache(recipe, samples_per_shard=100, progress=False)
    monkeypatch.setattr(cache_mod, "write_atomic", real_write)
    assert (cache_dir / f"{shard_name(0)}.json").is_file() and not (cache_dir / f"{shard_name(1)}.json").exists()
    with pytest.raises(UserError, match="no manifest.json"):
        TeacherCache(cache_dir)
    # fault 2: a complete-looking shard file whose sidecar was lost, and a sidecar whose file was truncated
    (cache_dir / f"{shard_name(1)}.ddc").write_bytes(b"partial")
    assert finalize_cache(cache_dir, build_cache(recipe, samples_per_shard=100, progress=False))
    assert files(cache_dir) == reference
    (cache_dir / "manifest.json").unlink()
    shard2 = cache_dir / f"{shard_name(2)}.ddc"
    shard2.write_bytes(shard2.read_bytes()[:100])
    assert finalize_cache(cache_dir, build_cache(recipe, samples_per_shard=100, progress=False))
    assert files(cache_dir) == reference


def test_8bit_teacher_cache(tiny_world, tmp_path):
    """dd-cache build --quantize 8bit runs the teacher with LLM.int8 weights (on the CPU here) and
    records it in the manifest; its logsumexp and top-k stay near the full-precision teacher's."""
    full = built(recipe_for(tiny_world, tmp_path / "full", "teacher_source.top_k=15"), mode="lossless")
    quant = built(recipe_for(tiny_world, tmp_path / "q8", "teacher_source.top_k=15"), mode="lossless", quantize="8bit")
    assert quant.manifest["teacher"]["quantization"] == "8bit" and full.manifest["teacher"]["quantization"] == "none"
    idx = torch.arange(16)
    (ids_f, z_f, lse_f, _), (ids_q, z_q, lse_q, _) = full.fetch(idx), quant.fetch(idx)
    (ids_f, z_f), (ids_q, z_q) = by_id(ids_f, z_f), by_id(ids_q, z_q)
    assert torch.equal(ids_f, ids_q)  # k = V: every id
    err = (z_q - z_f).abs().max()
    assert 0 < err < 0.05 * z_f.abs().max(), (err, z_f.abs().max())
    torch.testing.assert_close(lse_q, lse_f, atol=0.05, rtol=0)


PAGE = 4096


def _pages(n):
    return -(-n // PAGE) * PAGE


@pytest.mark.faults(2)
def test_disk_full_while_writing_the_cache(tiny_world, tmp_path):
    """A disk that holds two of the three shards: the third is refused before anything is written
    (fault 1); a write that fails anyway (the disk filled behind the check) leaves no file (fault 2).
    The complete shards stay, no manifest appears, and after space is freed the same build resumes
    and gives the bytes of an uninterrupted build."""
    built(recipe_for(tiny_world, tmp_path / "ref"))
    reference = files(tmp_path / "ref/cache")
    shards = [len(reference[f"{shard_name(i)}.ddc"]) for i in range(3)]
    assert min(shards) > PAGE  # the third shard cannot fit the one spare page below
    disk = tmp_path / "disk"
    mount_tmpfs(disk, _pages(shards[0]) + _pages(shards[1]) + 2 * PAGE + cache_mod.SIDECAR_RESERVE + PAGE)
    try:
        recipe = load_recipe(REPO / "configs/tiny/distill.yaml",
                             world_overrides(tiny_world, tmp_path / "run")[1::2] + [f"teacher_source.cache_dir={disk}/cache"])
        cache_dir = disk / "cache"
        complete = {n: b for n, b in reference.items() if n.startswith((shard_name(0), shard_name(1)))}
        with pytest.raises(UserError, match=r"cannot write teacher cache shard .*shard-00002.ddc .*only [0-9,]+ bytes are free .*\. "
                           r"Nothing of this shard was kept; the 2 complete shard\(s\) .* are intact.*re-run the same "
                           r"dd-cache build command"):
            build_cache(recipe, samples_per_shard=100, progress=False)
        assert files(cache_dir) == complete
        filler = disk / "filler"
        filler.write_bytes(b"\0" * (shutil.disk_usage(disk).free - PAGE))
        filler.rename(disk / "cache-free-space-ok")  # free space now below the shard: force the write path
        real_usage = shutil.disk_usage
        cache_mod.shutil.disk_usage = lambda p: real_usage(p)._replace(free=1 << 40)
        try:
            with pytest.raises(UserError, match=r"shard-00002.ddc .*writing failed: .*No space left on device"):
                build_cache(recipe, samples_per_shard=100, progress=False)
        finally:
            cache_mod.shutil.disk_usage = real_usage
        assert files(cache_dir) == complete  # no partial or temporary file
        (disk / "cache-free-space-ok").unlink()
        subprocess.run(["mount", "-o", "remount,size=16m", str(disk)], check=True)
        assert finalize_cache(cache_dir, build_cache(recipe, samples_per_shard=100, progress=False))
        assert files(cache_dir) == reference
        assert verify_cache(cache_dir) == 3
    finally:
        subprocess.run(["umount", str(disk)], check=False)


@pytest.mark.faults(1)
def test_a_shard_locked_by_another_writer_is_skipped(tiny_world, tmp_path, capsys):
    """Two writers never write the same shard: while another process holds shard 1's lock (a requeued
    task whose first run still lives), a build skips it and says so; once released, a re-run
    completes the cache with the bytes of an uninterrupted build."""
    import fcntl
    import os

    built(recipe_for(tiny_world, tmp_path / "ref"))
    reference = files(tmp_path / "ref/cache")
    recipe = recipe_for(tiny_world, tmp_path)
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    fd = os.open(cache_mod.lock_path(cache_dir, 1), os.O_CREAT | os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # the "other writer"
    try:
        assert not finalize_cache(cache_dir, build_cache(recipe, samples_per_shard=100, progress=False))
        assert "shard 1 is being written by another process (it holds .shard-00001.lock): skipped" in capsys.readouterr().out
        assert [cache_mod.shard_done(cache_dir, s) for s in range(3)] == [True, False, True]
    finally:
        os.close(fd)
    assert finalize_cache(cache_dir, build_cache(recipe, samples_per_shard=100, progress=False))
    assert files(cache_dir) == reference  # no lock file left behind


def test_array_tasks_split_the_work(tiny_world, tmp_path):
    recipe = recipe_for(tiny_world, tmp_path)
    manifest = build_cache(recipe, shard_index=0, num_shards=2, samples_per_shard=100, progress=False)
    assert not finalize_cache(recipe.teacher_source.cache_dir, manifest)  # shard 1 belongs to task 1
    assert sorted(p.name for p in (tmp_path / "cache").glob("*.json")) == ["shard-00000.json", "shard-00002.json"]
    manifest = build_cache(recipe, shard_index=1, num_shards=2, samples_per_shard=100, progress=False)
    assert finalize_cache(recipe.teacher_source.cache_dir, manifest)


@pytest.mark.slow
def test_two_rank_build_equals_one_rank_build(tiny_world, tmp_path):
    one = recipe_for(tiny_world, tmp_path / "one")
    built(one)
    sets = world_overrides(tiny_world, tmp_path / "run") + ["--set", f"teacher_source.cache_dir={tmp_path}/two/cache"]
    proc = torchrun(2, "dist_distill.cache", "build", "configs/tiny/distill.yaml", *sets, "--samples-per-shard", "100",
                    timeout=900)
    assert "teacher cache complete" in proc.stdout and "bytes/token=" in proc.stdout
    assert files(tmp_path / "two/cache") == files(tmp_path / "one/cache")


def test_cache_mismatch_is_refused(tiny_world, tmp_path):
    recipe = recipe_for(tiny_world, tmp_path)
    cache = built(recipe, samples_per_shard=4096)
    want = {k: cache.manifest[k] for k in ("tokenizer_sha256", "seq_len", "vocab_size", "k", "dataset")}
    cache.check_matches(want)
    with pytest.raises(UserError, match=r"another sequence length \(data.max_seq_len\): the cache has 16, this recipe needs 32"):
        cache.check_matches(dict(want, seq_len=32))
    with pytest.raises(UserError, match="keeps k=8 logits per token, the recipe asks teacher_source.top_k=16"):
        cache.check_matches(dict(want, k=16))
    with pytest.raises(UserError, match="another dataset token ids"):
        cache.check_matches(dict(want, dataset=dict(want["dataset"], token_ids_sha256="1" * 64)))
    with pytest.raises(UserError, match="another target positions"):
        cache.check_matches(dict(want, dataset=dict(want["dataset"], targets_sha256="2" * 64)))


@pytest.mark.bad_inputs(4)
def test_corrupt_caches_name_the_file_and_the_check(tiny_world, tmp_path):
    recipe = recipe_for(tiny_world, tmp_path)
    cache_dir = tmp_path / "cache"
    cache = built(recipe)
    assert verify_cache(cache_dir) == 3
    want = {k: cache.manifest[k] for k in ("tokenizer_sha256", "seq_len", "vocab_size", "k", "dataset")}
    pristine = files(cache_dir)
    shard = cache_dir / f"{shard_name(1)}.ddc"
    # a flipped byte: only the checksum can see it
    data = bytearray(pristine[shard.name])
    data[-40] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"shard-00001.ddc fails its sha256 check"):
        cache_main(["verify", str(cache_dir)])
    # a truncated shard: refused on open (reading) and by verify
    shard.write_bytes(pristine[shard.name][:-64])
    with pytest.raises(UserError, match=r"shard-00001.ddc fails its size check: \d+ bytes, the manifest records"):
        TeacherCache(cache_dir).fetch(torch.tensor([150]))
    with pytest.raises(UserError, match=r"shard-00001.ddc fails its size check"):
        verify_cache(cache_dir)
    # a missing shard
    shard.unlink()
    with pytest.raises(UserError, match=r"shard-00001.ddc is missing"):
        TeacherCache(cache_dir).fetch(torch.tensor([150]))
    with pytest.raises(UserError, match=r"shard-00001.ddc is missing"):
        verify_cache(cache_dir)
    shard.write_bytes(pristine[shard.name])
    # a manifest from another tokenizer: training refuses it, naming the manifest and both values
    manifest = json.loads(pristine["manifest.json"])
    manifest["tokenizer_sha256"] = "f" * 64
    (cache_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=r"another tokenizer: the cache has 'f{64}', this recipe needs '[0-9a-f]{64}' "
                                        r"\(.*manifest.json fails the tokenizer check\)"):
        TeacherCache(cache_dir).check_matches(want)


def test_cache_works_in_dataloader_workers(tiny_world, tmp_path):
    recipe = recipe_for(tiny_world, tmp_path)
    cache = built(recipe)
    want = cache.fetch(torch.tensor([3, 150]))
    clone = pickle.loads(pickle.dumps(cache))  # what a DataLoader worker receives: no open maps
    assert clone._shards == {}
    loader = torch.utils.data.DataLoader(torch.arange(256), batch_size=2, num_workers=1,
                                         collate_fn=lambda b: clone.fetch(torch.stack(b)))
    for i, got in enumerate(loader):
        if i == 0:
            assert all(torch.equal(a, b) for a, b in zip(got, cache.fetch(torch.tensor([0, 1]))))
    assert all(torch.equal(a, b) for a, b in zip(want, clone.fetch(torch.tensor([3, 150]))))


@pytest.mark.bad_inputs(1)
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

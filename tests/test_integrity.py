"""Integrity: a cache is bound to its teacher (by content), data and settings; reads are verified;
ranks agree on a resume."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import REPO, torchrun, world_overrides
from dist_distill.errors import UserError
from dist_distill.models.loading import model_fingerprint
from dist_distill.recipe import ModelSpec
from dist_distill.teacher.cache.format import shard_name
from dist_distill.teacher.cache.reader import TeacherCache, verify_cache
from dist_distill.teacher.cache.writer import build_cache, finalize_cache
from test_data_cache import built, files, recipe_for


def _other_teacher(world, tmp_path, scale=1.01):
    """A copy of the teacher whose weights were changed ("retrained"), in another directory."""
    other = tmp_path / "other_teacher"
    shutil.copytree(world / "teacher_init", other)
    weights = load_file(other / "model.safetensors")
    save_file({k: v * scale for k, v in weights.items()}, other / "model.safetensors", metadata={"format": "pt"})
    return other


def _rotated_data(world, tmp_path):
    lines = (world / "data/student_train.jsonl").read_text().splitlines()
    path = tmp_path / "rotated.jsonl"
    path.write_text("\n".join(lines[1:] + lines[:1]) + "\n")
    return path


def test_teacher_fingerprint_follows_the_weights_not_the_path(tiny_world, tmp_path):
    here = model_fingerprint(ModelSpec(name_or_path=str(tiny_world / "teacher_init")))
    moved = tmp_path / "moved"
    shutil.copytree(tiny_world / "teacher_init", moved)
    there = model_fingerprint(ModelSpec(name_or_path=str(moved)))
    keys = ("config_sha256", "weights_sha256", "tokenizer_sha256")
    assert {k: here[k] for k in keys} == {k: there[k] for k in keys}  # the same teacher elsewhere
    retrained = model_fingerprint(ModelSpec(name_or_path=str(_other_teacher(tiny_world, tmp_path))))
    assert retrained["weights_sha256"] != here["weights_sha256"]
    assert retrained["config_sha256"] == here["config_sha256"]


@pytest.mark.bad_inputs(3)
def test_a_build_into_a_cache_of_another_teacher_or_data_is_refused(tiny_world, tmp_path, capsys):
    """Case 1: building into an existing cache directory with another teacher (same path, new weights) or
    other data (the records rotated by one) refuses, naming what differs, and changes nothing; with
    --start-over the old cache is moved aside and the new build is whole."""
    cache_dir = tmp_path / "cache"
    built(recipe_for(tiny_world, tmp_path))
    before = files(cache_dir)
    other = _other_teacher(tiny_world, tmp_path)
    with pytest.raises(UserError, match=r"was made by another build: teacher weights .*Nothing was changed"):
        build_cache(recipe_for(tiny_world, tmp_path, f"teacher.name_or_path={other}"), samples_per_shard=100,
                    progress=False)
    assert files(cache_dir) == before
    rotated = _rotated_data(tiny_world, tmp_path)
    with pytest.raises(UserError, match=r"was made by another build: dataset token ids"):
        build_cache(recipe_for(tiny_world, tmp_path, f"data.train={rotated}"), samples_per_shard=100, progress=False)
    with pytest.raises(UserError, match=r"another build: .*samples per shard"):
        build_cache(recipe_for(tiny_world, tmp_path), samples_per_shard=50, progress=False)
    assert files(cache_dir) == before
    recipe = recipe_for(tiny_world, tmp_path, f"teacher.name_or_path={other}")
    assert finalize_cache(cache_dir, build_cache(recipe, samples_per_shard=100, progress=False, start_over=True))
    assert "were moved to" in capsys.readouterr().out
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("cache.old-")]
    assert len(aside) == 1 and files(aside[0]) == before  # kept, not mixed, not deleted
    cache = TeacherCache(cache_dir)
    assert cache.manifest["teacher"]["weights_sha256"] == model_fingerprint(recipe.teacher)["weights_sha256"]
    verify_cache(cache_dir)


@pytest.mark.faults(2)
def test_resume_checks_each_shard_before_counting_it_done(tiny_world, tmp_path):
    """A shard whose file no longer matches its sidecar's checksum, or whose sidecar records another build,
    is rebuilt on resume; the result equals an uninterrupted build."""
    recipe = recipe_for(tiny_world, tmp_path)
    cache_dir = tmp_path / "cache"
    manifest = build_cache(recipe, samples_per_shard=100, progress=False)
    assert finalize_cache(cache_dir, manifest)  # a complete cache: manifest and grades.npz, as dd-cache build leaves it
    reference = files(cache_dir)
    shard = cache_dir / f"{shard_name(1)}.ddc"
    data = bytearray(shard.read_bytes())
    data[-40] ^= 0x01  # a flipped bit, size unchanged
    shard.write_bytes(bytes(data))
    side = cache_dir / f"{shard_name(2)}.json"
    record = json.loads(side.read_text())
    side.write_text(json.dumps(dict(record, build_sha256="0" * 64)))  # claims another build of the same identity
    assert finalize_cache(cache_dir, build_cache(recipe, samples_per_shard=100, progress=False))
    assert {n: b for n, b in files(cache_dir).items() if n != "manifest.json"} == \
        {n: b for n, b in reference.items() if n != "manifest.json"}
    assert manifest["build_sha256"] == TeacherCache(cache_dir).manifest["build_sha256"]


@pytest.mark.bad_inputs(2)
def test_verify_and_training_compare_the_teacher_fingerprint(tiny_world, tmp_path):
    """Case 2: an edited teacher fingerprint in the manifest is refused by dd-cache verify --recipe and by
    training (the recipe's teacher is fingerprinted by content)."""
    from dist_distill.cache import main as cache_main

    recipe = recipe_for(tiny_world, tmp_path)
    built(recipe)
    cache_dir = tmp_path / "cache"
    args = ["verify", str(cache_dir), "--recipe", str(REPO / "configs/tiny/distill.yaml")]
    sets = [x for s in world_overrides(tiny_world, tmp_path / "run")[1::2] + [f"teacher_source.cache_dir={cache_dir}"]
            for x in ("--set", s)]
    assert cache_main(args + sets) == 0
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    manifest["teacher"]["weights_sha256"] = "e" * 64
    (cache_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=r"built from another teacher: its weights_sha256 is 'e{64}'"):
        cache_main(args + sets)
    proc = torchrun(1, "dist_distill.train", "configs/tiny/distill.yaml", *sets, "--set", "optim.max_steps=2",
                    "--set", "optim.warmup_steps=0", "--set", f"output.dir={tmp_path}/run", check=False, timeout=600)
    assert proc.returncode != 0 and "built from another teacher" in " ".join(proc.stderr.split()), proc.stderr[-2000:]


@pytest.mark.bad_inputs(1)
def test_a_damaged_block_is_refused_when_read(tiny_world, tmp_path):
    """Case 3: training's reads are verified (a CRC32 per sample): one flipped byte in a shard is a clear
    error naming the shard and the sample, not different teacher rows."""
    from dist_distill.teacher.cache.format import data_start

    cache = built(recipe_for(tiny_world, tmp_path))
    sh = cache.shard(1)
    head_len = int.from_bytes((tmp_path / "cache" / f"{shard_name(1)}.ddc").read_bytes()[8:16], "little")
    offset = data_start(head_len) + sh.header["sections"]["stream_a"][0] + int(sh.s["a_start"][50])
    shard = tmp_path / "cache" / f"{shard_name(1)}.ddc"
    data = bytearray(shard.read_bytes())
    data[offset] ^= 0x10  # the first byte of sample 150's ids
    shard.write_bytes(bytes(data))
    fresh = TeacherCache(tmp_path / "cache")
    fresh.fetch(torch.tensor([149, 151]))  # its neighbours read fine
    with pytest.raises(UserError, match=r"shard-00001.ddc fails its checksum check at sample 150 \(block 50"):
        fresh.fetch(torch.tensor([151, 150]))


@pytest.mark.bad_inputs(1)
def test_a_cache_of_the_old_format_is_refused(tiny_world, tmp_path):
    built(recipe_for(tiny_world, tmp_path))
    path = tmp_path / "cache/manifest.json"
    manifest = json.loads(path.read_text())
    for old in ("dd-topk-v1", "dd-topk-v2"):  # v2: no tail masses
        path.write_text(json.dumps(dict(manifest, format=old)))
        with pytest.raises(UserError, match=rf"format '{old}', this reader needs 'dd-topk-v3'; rebuild the cache"):
            TeacherCache(tmp_path / "cache")

"""Command-line entry points: --help everywhere, and bad input answered by one readable paragraph."""

import json

import pytest

from conftest import module_cmd, world_overrides

COMMANDS = ["dist_distill.train", "dist_distill.evaluate", "dist_distill.export", "dist_distill.tiny_world",
            "dist_distill.quickstart"]


@pytest.mark.parametrize("module", COMMANDS)
def test_help(module):
    proc = module_cmd(module, "--help", timeout=120)
    assert "usage:" in proc.stdout and "--" in proc.stdout


@pytest.mark.parametrize("sub", ["build", "info", "verify", "grade"])
def test_cache_help(sub):
    assert "usage:" in module_cmd("dist_distill.cache", sub, "--help", timeout=120).stdout


def test_help_recipe_lists_every_key():
    out = module_cmd("dist_distill.train", "--help-recipe", timeout=120).stdout
    assert "optim.lr (float): Peak learning rate." in out and "teacher_source.cache_dir" in out


def assert_clean_error(proc, *fragments):
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.count("error:") == 1, proc.stderr
    for fragment in fragments:
        assert fragment in proc.stderr.replace("\n  ", " "), proc.stderr


@pytest.mark.bad_inputs(1)
def test_recipe_typo(tiny_world, tmp_path):
    proc = module_cmd("dist_distill.train", "configs/tiny/distill.yaml", *world_overrides(tiny_world, tmp_path),
                      "--set", "optim.lrr=1", check=False, timeout=900)
    assert_clean_error(proc, "unknown key optim.lrr: allowed keys in optim are lr,")


@pytest.mark.bad_inputs(1)
def test_missing_model_directory(tiny_world, tmp_path):
    proc = module_cmd("dist_distill.train", "configs/tiny/distill.yaml", *world_overrides(tiny_world, tmp_path),
                      "--set", f"student.name_or_path={tmp_path}/no_such_model", check=False, timeout=900)
    assert_clean_error(proc, f"student.name_or_path={tmp_path}/no_such_model: no such model directory")


@pytest.mark.bad_inputs(1)
def test_cache_for_another_sequence_length(tiny_world, tmp_path):
    sets = world_overrides(tiny_world, tmp_path / "run") + ["--set", f"teacher_source.cache_dir={tmp_path}/cache"]
    module_cmd("dist_distill.cache", "build", "configs/tiny/distill.yaml", *sets, timeout=900)
    proc = module_cmd("dist_distill.train", "configs/tiny/distill.yaml", *sets, "--set", "data.max_seq_len=20",
                      check=False, timeout=900)
    assert_clean_error(proc, "was built for another sequence length (data.max_seq_len): the cache has 16, "
                             "this recipe needs 20")


@pytest.mark.bad_inputs(1)
def test_cache_missing(tiny_world, tmp_path):
    proc = module_cmd("dist_distill.train", "configs/tiny/distill.yaml", *world_overrides(tiny_world, tmp_path),
                      "--set", f"teacher_source.cache_dir={tmp_path}/nothing", check=False, timeout=900)
    assert_clean_error(proc, "no manifest.json", "run dd-cache")


def test_evaluate_writes_table_and_json(tiny_world, tmp_path):
    proc = module_cmd("dist_distill.evaluate", "--model", f"teacher={tiny_world}/teacher_init",
                      "--model", f"student={tiny_world}/student_init", "--data", f"{tiny_world}/data/heldout.jsonl",
                      "--metrics", "exact_match,perplexity,latency,memory,params", "--latency-prompts", "2",
                      "--reference", "teacher", "--out", str(tmp_path), timeout=900)
    assert ("| model | exact match | retention % | ppl | params | weights MiB | peak MiB | prefill ms/tok | "
            "decode ms/tok |") in proc.stdout
    records = json.loads((tmp_path / "results.json").read_text())["results"]
    assert [r["model"] for r in records] == ["teacher", "student"]
    for r in records:
        assert set(r) >= {"exact_match", "perplexity", "params", "prefill_ms_per_token", "decode_ms_per_token",
                          "weights_mib", "peak_memory_mib"}
        assert 0 <= r["exact_match"] <= 1 and r["perplexity"] > 1 and r["decode_ms_per_token"] > 0
    assert records[0]["params"] > records[1]["params"]
    assert records[1]["weights_mib"] == pytest.approx(records[1]["params"] * 4 / 2**20, rel=0.01)  # + buffers
    assert (tmp_path / "report.md").read_text().startswith("# Held-out evaluation")


@pytest.mark.bad_inputs(1)
def test_evaluate_bad_model_argument(tmp_path):
    proc = module_cmd("dist_distill.evaluate", "--model", "nodir", "--data", "x.jsonl", "--out", str(tmp_path),
                      check=False, timeout=120)
    assert_clean_error(proc, "--model 'nodir': expected NAME=DIR")

"""Recipes: every YAML in configs/ loads; bad recipes are refused naming the key at fault."""

from pathlib import Path

import pytest
import yaml

from dist_distill.recipe import Recipe, RecipeError, describe_recipe, field_docs, load_recipe

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))
MINIMAL = ["student.name_or_path=m", "data.train=d.jsonl", "teacher_source.kind=none", "loss.ce_weight=1.0"]


def test_there_are_recipes():
    assert len(CONFIGS) >= 3


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_config_loads(path):
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    assert recipe.to_dict()["student"]["name_or_path"]


def test_overrides_are_typed():
    r = load_recipe(None, MINIMAL + ["optim.lr=3e-5", "optim.betas=[0.8, 0.9]", "deepspeed.zero_stage=2"])
    assert r.optim.lr == pytest.approx(3e-5) and isinstance(r.optim.lr, float)
    assert r.optim.betas == [0.8, 0.9]
    assert r.deepspeed.zero_stage == 2


@pytest.mark.bad_inputs(1)
@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", "unknown key optim.lrr: allowed keys in optim are lr,"),
    ("optimizer.lr=1", "unknown key optimizer: allowed keys in the recipe are student,"),
    ("optim.max_steps=ten", "optim.max_steps='ten': expected an integer"),
    ("optim.max_steps=1.5", "optim.max_steps=1.5: expected an integer"),
    ("loss.kind=kl", "loss.kind='kl': expected one of 'fkl', 'rkl', 'jsd', 'skew_fkl', 'skew_rkl', 'tvd'"),
    ("student.trust_remote_code=yes please", "student.trust_remote_code='yes please': expected true or false"),
    ("optim.warmup_steps=500", "optim.warmup_steps=500 must be >= 0 and below optim.max_steps=100"),
    ("loss.ce_weight=0.5", "loss.ce_weight=0.5 needs a teacher, but teacher_source.kind=none"),
    ("loss.temperature=0", "loss.temperature=0.0: must be > 0"),
    (["output.export=false", "output.export_8bit=true"], "output.export_8bit=true needs output.export=true"),
    ("optim", "override 'optim': expected the form section.key=value"),
    (["data.packing=true", "data.group_by_length=true"], "data.packing and data.group_by_length are both true"),
    (["data.packing=true", "teacher_source.kind=group", "teacher.name_or_path=t"],
     "data.packing=true is not supported with teacher_source.kind=group"),
    (["data.group_by_length=true", "teacher_source.kind=group", "teacher.name_or_path=t"],
     "data.group_by_length=true is not supported with teacher_source.kind=group"),
    (["data.packing=true", "teacher_source.kind=colocated", "teacher.name_or_path=t", "weights.attention.start=0.1",
      "student.attn_implementation=eager", "teacher.attn_implementation=eager"],
     "data.packing=true with the attention term"),
    (["data.packing=true", "teacher_source.kind=colocated", "teacher.name_or_path=t", "weights.hidden.start=0.1",
      "intermediate.projection=conv_gate"], "data.packing=true with intermediate.projection=conv_gate"),
    (["data.packing=true", "data.pack_open_rows=0"], "data.pack_open_rows=0: must be >= 1"),
    (["data.packing=true", "data.replay={path: r.jsonl, samples: 1, every_steps: 10}"],
     "data.packing=true with data.replay"),
    (["data.packing=true", "loss.cross_tokenizer=uld"], "data.packing=true with loss.cross_tokenizer=uld"),
    (["data.group_by_length=true", "grading.weights={easy: 1.0, hard: 1.0}"],
     "data.group_by_length=true is not supported with training by difficulty bucket"),
    (["teacher_source.kind=group", "teacher.name_or_path=t", "grading.weights={easy: 1.0, hard: 1.0}"],
     "difficulty buckets (grading.weights or stages[i].buckets) with teacher_source.kind=group"),
    (["teacher.name_or_path=t", "teacher_source.kind=cache", "teacher_source.cache_dir=c", "loss.cross_tokenizer=uld",
      "data.augment=[{fn: synonyms, table: t.tsv}]"],
     "loss.cross_tokenizer=uld with data.augment"),
    (["teacher.name_or_path=t", "teacher_source.kind=cache", "teacher_source.cache_dir=c", "loss.cross_tokenizer=uld",
      "grading.weights={easy: 1.0}"],
     "loss.cross_tokenizer=uld with difficulty buckets"),
])
def test_bad_recipes_name_the_key(override, message):
    with pytest.raises(RecipeError) as err:
        load_recipe(None, MINIMAL + (override if isinstance(override, list) else [override]))
    assert message in str(err.value)


@pytest.mark.bad_inputs(1)
def test_packing_with_stages_is_refused():
    stages = "stages=[{name: a, data_fraction: 1.0, steps: 100, terms: {output: 1.0}}]"
    with pytest.raises(RecipeError, match="data.packing=true is not supported with progressive stages"):
        load_recipe(None, MINIMAL + ["data.packing=true", stages])


@pytest.mark.bad_inputs(1)
def test_cache_without_dir_is_refused():
    with pytest.raises(RecipeError, match="teacher_source.kind=cache needs teacher_source.cache_dir"):
        load_recipe(None, ["student.name_or_path=m", "data.train=d.jsonl"])


@pytest.mark.bad_inputs(2)
def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [1, 2\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)


def test_save_roundtrip(tmp_path):
    recipe = load_recipe(None, MINIMAL + ["optim.lr=0.01"])
    recipe.save(tmp_path / "r.yaml")
    assert load_recipe(tmp_path / "r.yaml") == recipe
    assert yaml.safe_load((tmp_path / "r.yaml").read_text())["optim"]["lr"] == 0.01


def test_every_field_is_documented():
    import dataclasses
    import typing

    for name, tp in typing.get_type_hints(Recipe).items():
        classes = [Recipe] + ([tp] if dataclasses.is_dataclass(tp) else [])
        for cls in classes:
            docs = field_docs(cls)
            missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
            assert not missing, f"{cls.__name__} fields without a docstring: {missing}"
    assert "optim.lr" in describe_recipe()

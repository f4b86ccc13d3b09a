"""The recipe's teacher source for a training run: cache reader, group client, colocated teacher or none."""

from __future__ import annotations

import torch

from dist_distill.errors import UserError


WAYS_FORWARD = (
    "Two ways forward: (1) sequence-level KD: train on text the teacher generated (dd-generate) with the hard-label "
    "loss only (teacher_source.kind=none, loss.ce_weight=1.0); (2) a cross-tokenizer logit loss: "
    "loss.cross_tokenizer=uld (Universal Logit Distillation) with teacher_source.kind=cache, the cache built by "
    "dd-cache build with the teacher's own tokenizer")
"""What every tokenizer-mismatch refusal (training start-up, dd-cache build, the teacher group, the dry run) offers."""


def tokenizer_difference(teacher_tokenizer, student_tokenizer) -> str | None:
    """None when both tokenizers map the same tokens to the same ids (tokenizer_fingerprint equal), else what
    differs, in words: the vocabulary sizes, or at equal size how many ids mean another token, or the special tokens."""
    from dist_distill.models.loading import tokenizer_fingerprint

    if tokenizer_fingerprint(teacher_tokenizer) == tokenizer_fingerprint(student_tokenizer):
        return None
    tv, sv = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if len(tv) != len(sv):
        return f"vocabulary of {len(tv)} tokens (teacher) vs {len(sv)} (student)"
    by_id = {i: t for t, i in sv.items()}
    differ = sum(by_id.get(i) != t for t, i in tv.items())
    if differ:
        return f"same vocabulary size {len(tv)}, but {differ} token ids mean different tokens"
    return "same vocabulary, different special tokens"


def tokenizer_mismatch_error(teacher_name: str, student_name: str, detail: str) -> UserError:
    """The refusal of token-level logit KD between two tokenizers, naming the two ways forward."""
    return UserError(f"teacher {teacher_name} and student {student_name} use different tokenizers ({detail}): "
                     "token-level logit distillation compares the two models' logits of the same token ids, which is "
                     f"invalid across vocabularies. {WAYS_FORWARD}")


def same_tokenizer_or_refuse(recipe, student_tokenizer, teacher_tokenizer=None) -> None:
    """Token-level logit distillation compares logits of the same token ids: refuse other tokenizers (compared by
    the vocabulary hash of models.loading.tokenizer_fingerprint, so equal sizes with other tokens are refused too)
    unless the recipe uses a cross-tokenizer loss (loss.cross_tokenizer)."""
    from dist_distill.models.loading import load_tokenizer

    if recipe.loss.cross_tokenizer != "none":
        return
    teacher_tokenizer = teacher_tokenizer if teacher_tokenizer is not None else load_tokenizer(recipe.teacher, "teacher")
    detail = tokenizer_difference(teacher_tokenizer, student_tokenizer)
    if detail is not None:
        raise tokenizer_mismatch_error(recipe.teacher.name_or_path, recipe.student.name_or_path, detail)


def cache_tokenizer_or_refuse(recipe, cache, student_tokenizer) -> None:
    """A cache holds the logits of the tokenizer it was built with (dd-cache build tokenizes with the teacher's):
    for token-level KD it must be the student's, else the refusal names the two ways forward. The teacher's own
    files are not needed (a 671B hub teacher need not be on the training cluster)."""
    from dist_distill.models.loading import tokenizer_fingerprint

    m = cache.manifest
    if recipe.loss.cross_tokenizer != "none" or m["tokenizer_sha256"] == tokenizer_fingerprint(student_tokenizer):
        return
    raise tokenizer_mismatch_error(
        recipe.teacher.name_or_path, recipe.student.name_or_path,
        f"teacher cache {cache.dir} was built with a tokenizer of {m['vocab_size']} tokens, sha256 "
        f"{m['tokenizer_sha256'][:12]}, the student's has {len(student_tokenizer)}, sha256 "
        f"{tokenizer_fingerprint(student_tokenizer)[:12]}; if both models do share a tokenizer, the cache was built "
        "for another teacher: rebuild it")


def expected_cache_fields(recipe, tokenizer=None, data=None) -> dict:
    """What a cache for `recipe` must record (TeacherCache.check_matches): tokenizer, sequence length,
    vocabulary, data and target fingerprints, k, and the teacher's content fingerprint. The teacher
    is fingerprinted where its files can be read; a hub teacher not downloaded here (a 671B teacher
    need not sit on the training cluster) is said and not compared."""
    from dist_distill.data.records import load_tokenized
    from dist_distill.models.loading import load_tokenizer, model_fingerprint, tokenizer_fingerprint

    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(recipe.student, "student")
    data = data if data is not None else load_tokenized(recipe.data.train, tokenizer, recipe.data, recipe.data.max_samples)
    expected = {"tokenizer_sha256": tokenizer_fingerprint(tokenizer), "seq_len": recipe.data.max_seq_len,
                "vocab_size": len(tokenizer), "k": recipe.teacher_source.top_k,
                "dataset": {"token_ids_sha256": data.fingerprint, "targets_sha256": data.targets_fingerprint}}
    try:
        expected["teacher"] = model_fingerprint(recipe.teacher)
    except OSError as err:
        print(f"note: teacher {recipe.teacher.name_or_path} cannot be read here ({str(err).splitlines()[0][:120]}): "
              "the cache's teacher fingerprint was not compared", flush=True)
    return expected


def build_teacher_source(recipe, tokenizer, data, device: torch.device, step_fn):
    """The object whose ``signal(indices, batch)`` gives each micro-batch's TeacherSignal (None: hard labels).

    Built before ZeRO-3's model init, so that a colocated teacher is an ordinary replicated
    module on `device` (this rank's, from LOCAL_RANK). `data` is the run's TokenizedData (its
    fingerprints bind a cache to it); `step_fn()` gives the trainer's current step (group source).
    """
    ts = recipe.teacher_source
    if ts.kind == "cache":
        from dist_distill.teacher.cache.reader import CacheTeacher, TeacherCache

        cache = TeacherCache(ts.cache_dir)
        if recipe.loss.cross_tokenizer != "none":
            return _cross_tokenizer_cache(recipe, cache, data, device)
        cache_tokenizer_or_refuse(recipe, cache, tokenizer)
        cache.check_matches(expected_cache_fields(recipe, tokenizer, data))
        if recipe.loss.tail == "bucket":  # refused at start-up, not at the first step
            from dist_distill.teacher.tails import column_of

            column_of(cache.tail_temperatures, recipe.loss.temperature, f"teacher cache {cache.dir}")
        return CacheTeacher(cache, ts.top_k, device)
    if ts.kind == "group":
        from dist_distill.teacher.group.client import group_teacher

        return group_teacher(recipe, device, step_fn)
    if ts.kind == "colocated":
        from dist_distill.teacher.colocated import ColocatedTeacher, load_colocated_teacher

        same_tokenizer_or_refuse(recipe, tokenizer)
        return ColocatedTeacher(load_colocated_teacher(recipe.teacher, device, ts.load_in_8bit),
                                need_layers=recipe.uses_term("hidden"), need_attentions=recipe.uses_term("attention"))
    return None


def _cross_tokenizer_cache(recipe, cache, student_data, device):
    """The cache source of loss.cross_tokenizer: the cache is bound to the TEACHER's tokenization of the data (its
    tokenizer, token ids and targets), which is loaded (or built) here from the teacher's tokenizer; student and
    teacher samples pair by source record (teacher.cross_tokenizer). Refused at start-up: a cache of another
    tokenization, or one without the tail mass at loss.temperature."""
    from dist_distill.data.records import load_tokenized
    from dist_distill.models.loading import load_tokenizer
    from dist_distill.teacher.cache.reader import CacheTeacher
    from dist_distill.teacher.cross_tokenizer import RecordAlignment
    from dist_distill.teacher.tails import column_of

    teacher_tokenizer = load_tokenizer(recipe.teacher, "teacher")
    teacher_data = load_tokenized(recipe.data.train, teacher_tokenizer, recipe.data, recipe.data.max_samples)
    cache.check_matches(expected_cache_fields(recipe, teacher_tokenizer, teacher_data))
    column_of(cache.tail_temperatures, recipe.loss.temperature, f"teacher cache {cache.dir}")
    return CacheTeacher(cache, recipe.teacher_source.top_k, device, RecordAlignment(student_data, teacher_data))


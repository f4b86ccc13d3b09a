"""The recipe's teacher source for a training run: cache reader, group client, colocated teacher or none."""

from __future__ import annotations

import torch

from dist_distill.errors import UserError


def same_tokenizer_or_refuse(recipe, student_tokenizer) -> None:
    """Token-level logit distillation compares logits of the same token ids: refuse other vocabularies."""
    from dist_distill.models.loading import load_tokenizer, tokenizer_fingerprint

    if tokenizer_fingerprint(load_tokenizer(recipe.teacher, "teacher")) != tokenizer_fingerprint(student_tokenizer):
        raise UserError(f"teacher {recipe.teacher.name_or_path} and student {recipe.student.name_or_path} use "
                        "different tokenizers: token-level logit distillation is invalid across vocabularies")


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

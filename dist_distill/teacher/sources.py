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


def build_teacher_source(recipe, tokenizer, data, device: torch.device, step_fn):
    """The object whose ``signal(indices, batch)`` gives each micro-batch's TeacherSignal (None: hard labels).

    Built before ZeRO-3's model init, so that a colocated teacher is an ordinary replicated
    module on `device` (this rank's, from LOCAL_RANK). `data` is the run's TokenizedData (its
    fingerprints bind a cache to it); `step_fn()` gives the trainer's current step (group source).
    """
    ts = recipe.teacher_source
    if ts.kind == "cache":
        from dist_distill.models.loading import tokenizer_fingerprint
        from dist_distill.teacher.cache.reader import CacheTeacher, TeacherCache

        cache = TeacherCache(ts.cache_dir)
        cache.check_matches({"tokenizer_sha256": tokenizer_fingerprint(tokenizer), "seq_len": recipe.data.max_seq_len,
                             "vocab_size": len(tokenizer), "dataset": {"token_ids_sha256": data.fingerprint,
                                                                      "targets_sha256": data.targets_fingerprint},
                             "k": ts.top_k})
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

"""`dd-cache grade`: the teacher's confidence on every training sample without building a cache.

The same scorer as a cache build (`TeacherScorer.target_logprobs`: the decoder once, the lm_head chunk
by chunk and vocab-parallel, only log p(target) and the logsumexp kept), over the same layout
(cache.writer.BuildLayout: TP groups of teacher_source.tp_size ranks, DP groups splitting the data by
teacher batches). Each DP group grades a contiguous run of batches; the leaders' float64 [n] confidences
are gathered on rank 0 (all_gather_object on the CPU group: 8 bytes a sample, 8 MB at 1M samples), which
writes the grades file (data/grading.py). Not resumable: a killed grading starts over (a cache build's
grades are resumable with its shards).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dist_distill.errors import UserError


def grade_data(recipe, rank: int = 0, world: int = 1, quantize: str = "none", progress: bool = False) -> Path | None:
    """Grade recipe.data.train with recipe.teacher; rank 0 writes grading.grades (or <cache_dir>/grades.npz)
    and returns its path (None on the other ranks). Every rank of the launch calls it."""
    from tqdm import tqdm

    from dist_distill.data.grading import grades_path, sample_confidence, store_meta, store_records, write_grades
    from dist_distill.data.records import IGNORE_INDEX, load_tokenized
    from dist_distill.models.loading import load_tokenizer, model_fingerprint
    from dist_distill.teacher.cache.writer import BuildLayout, _cpu_group, load_cache_teacher
    from dist_distill.teacher.sources import same_tokenizer_or_refuse
    from dist_distill.training.distributed import local_device

    ts = recipe.teacher_source
    if world % ts.tp_size:
        raise UserError(f"teacher_source.tp_size={ts.tp_size} must divide the number of ranks ({world})")
    out = grades_path(recipe)
    layout = BuildLayout(rank, world, ts.tp_size, 0, 1)
    tokenizer = load_tokenizer(recipe.teacher, "teacher")
    same_tokenizer_or_refuse(recipe, load_tokenizer(recipe.student, "student"), tokenizer)
    data = load_tokenized(recipe.data.train, tokenizer, recipe.data, recipe.data.max_samples)
    scorer = load_cache_teacher(recipe, layout, quantize, local_device(), len(tokenizer))
    mine = []
    for i, j in tqdm(layout.my_batches(0, len(data), ts.batch_size), desc="grade", unit="batch", disable=not progress):
        targets = data.targets[i:j]
        lp = scorer.target_logprobs(data.input_ids[i:j], data.attention_mask[i:j], targets).cpu().numpy()
        mine.append(sample_confidence(lp, (targets != IGNORE_INDEX).sum(1).numpy()))
    mine = np.concatenate(mine) if mine else np.zeros(0)
    parts = [mine]
    if world > 1:
        parts = [None] * world
        torch.distributed.all_gather_object(parts, mine if layout.leader else None, group=_cpu_group())
        parts = [p for p in parts if p is not None]  # leaders in rank order = DP groups in data order
    if rank != 0:
        return None
    confidence = np.concatenate(parts)
    meta = dict(store_meta(data), teacher=model_fingerprint(recipe.teacher, tokenizer), made_by="dd-cache grade",
                quantization=quantize)
    counts = write_grades(out, confidence, store_records(data), recipe.grading.edges, meta)
    print(f"grades: {out}: {len(confidence)} samples, mean confidence {confidence.mean():.4f}; buckets under "
          f"grading.edges={list(recipe.grading.edges)}: " + ", ".join(f"{k} {v}" for k, v in counts.items()), flush=True)
    return out

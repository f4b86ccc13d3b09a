"""A recipe's dry run on the meta device: everything that can fail before the first GPU hour, on one screen.

Checks, each reported as PASS, FAIL or NOTE (a NOTE is something that cannot be checked here, said
so rather than assumed): the student's and teacher's architectures (built from their configs on
the meta device), their vocabularies and tokenizers, sequence length against both models' position
limits, the fused loss's chunk size, the intermediate terms' layer map and projection shapes, the
teacher group's tensor-parallel split and its layout over the nodes, the cache's alignment with the
recipe (k, sequence length, vocabulary) when the cache exists here, the data source, and the
memory plan (dist_distill.planning.memory).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dist_distill.errors import UserError
from dist_distill.planning.memory import Cluster, plan_recipe, resolve_precision
from dist_distill.planning.models import Architecture


@dataclass
class DryRun:
    recipe_name: str
    checks: list[tuple[str, str, str]] = field(default_factory=list)
    """(status, what, detail): status is PASS, FAIL or NOTE."""

    def add(self, status: str, what: str, detail: str) -> None:
        self.checks.append((status, what, detail))

    def passed(self) -> bool:
        return not any(status == "FAIL" for status, _, _ in self.checks)

    def format(self) -> str:
        lines = [f"dry run: {self.recipe_name}"]
        lines += [f"  {status:<4}  {what:<22} {detail}" for status, what, detail in self.checks]
        lines.append(f"dry run: {'PASS' if self.passed() else 'FAIL'} "
                     f"({sum(s == 'FAIL' for s, _, _ in self.checks)} failed, "
                     f"{sum(s == 'NOTE' for s, _, _ in self.checks)} notes)")
        return "\n".join(lines)


def _arch_line(a: Architecture) -> str:
    c = a.config
    return (f"{getattr(c, 'model_type', '?')} {a.total_params / 1e9:.2f}B params, {a.num_layers} layers, hidden "
            f"{a.hidden}, heads {a.heads}/{a.kv_heads} kv, vocab {a.vocab}, tied={a.tied} (config: {a.source})")


def _local_tokenizer(spec):
    """The tokenizer when it is on disk here (local directory or hub cache), else None; never downloads."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(spec.name_or_path, revision=spec.revision, local_files_only=True,
                                             trust_remote_code=spec.trust_remote_code)
    except (OSError, ValueError, TypeError):
        return None


def _check_vocab(run: DryRun, recipe, student: Architecture, teacher: Architecture | None) -> None:
    st_tok = _local_tokenizer(recipe.student)
    if st_tok is not None:
        ok = student.vocab >= len(st_tok)
        run.add("PASS" if ok else "FAIL", "student vocabulary",
                f"tokenizer {len(st_tok)} tokens, model vocab_size {student.vocab}"
                + ("" if ok else ": the model's embedding is smaller than its tokenizer"))
    else:
        run.add("NOTE", "student tokenizer", f"not on disk here ({recipe.student.name_or_path}); "
                f"model vocab_size {student.vocab} from its config")
    if teacher is None or recipe.teacher_source.kind == "none":
        return
    from dist_distill.teacher.sources import WAYS_FORWARD, tokenizer_difference

    te_tok = _local_tokenizer(recipe.teacher)
    if st_tok is not None and te_tok is not None:  # the vocabulary hash: equal sizes with other tokens differ too
        detail = tokenizer_difference(te_tok, st_tok)
    elif teacher.vocab != student.vocab:
        detail = f"vocab_size {teacher.vocab} (teacher) != {student.vocab} (student)"
    else:
        run.add("NOTE", "teacher vs student", f"vocab_size {teacher.vocab} on both; the tokenizers themselves are "
                "not on disk here and are compared by dd-train / dd-cache at start-up (vocabulary hash)")
        return
    uld = recipe.loss.cross_tokenizer != "none"
    if detail is None:
        run.add("PASS", "teacher vs student", "same tokenizer (vocabulary and special tokens hash equal)"
                + (f"; loss.cross_tokenizer={recipe.loss.cross_tokenizer} is not needed, token-level KD is valid"
                   if uld else ""))
    elif uld:
        run.add("PASS", "teacher vs student", f"tokenizers differ ({detail}); the recipe uses sequence-level KD data "
                f"({recipe.data.train}, CE weight {recipe.loss.ce_weight:g}) and loss.cross_tokenizer="
                f"{recipe.loss.cross_tokenizer} (ULD weight {recipe.loss.uld_weight:g}: sorted probabilities, no shared "
                "token ids needed), valid across tokenizers; the cache is built with the teacher's tokenizer")
    else:
        run.add("FAIL", "teacher vs student", f"{detail}: different tokenizers, so token-level logit distillation "
                f"is invalid and training refuses this pair. {WAYS_FORWARD}")


def _check_lengths(run: DryRun, recipe, student: Architecture, teacher: Architecture | None) -> None:
    seq = recipe.data.max_seq_len
    for role, arch in (("student", student), ("teacher", teacher)):
        if arch is None:
            continue
        limit = getattr(arch.config, "max_position_embeddings", None)
        if limit is not None:
            run.add("PASS" if seq <= limit else "FAIL", f"{role} positions",
                    f"data.max_seq_len={seq} {'<=' if seq <= limit else '>'} max_position_embeddings={limit}")


def _check_loss(run: DryRun, recipe, student: Architecture, teacher: Architecture | None = None) -> None:
    from dist_distill.kernels.fused_linear_distill import chunk_rows

    lo = recipe.loss
    tokens = recipe.data.max_seq_len * recipe.optim.micro_batch_size
    backend = lo.backend if lo.backend != "auto" else "triton"
    if not lo.fused:
        run.add("NOTE", "loss", f"loss.fused=false: [{tokens}, {student.vocab}] float32 logits are materialised")
        return
    if lo.cross_tokenizer == "uld":
        from dist_distill.losses.fused_uld import uld_chunk_rows

        rows, backend = uld_chunk_rows(int(lo.chunk_mib * 2**20), student.vocab), "ULD + CE, torch"
    else:
        rows = chunk_rows(int(lo.chunk_mib * 2**20), student.vocab, backend, dense_teacher=False)
    run.add("PASS" if rows >= 1 else "FAIL", "fused loss chunks",
            f"{rows} rows per chunk at loss.chunk_mib={lo.chunk_mib:g} over vocab {student.vocab} ({backend} on "
            f"CUDA); {math.ceil(tokens / rows)} chunks per micro-batch of {tokens} tokens")
    k = recipe.teacher_source.top_k
    if recipe.teacher_source.kind in ("cache", "group"):
        theirs = lo.cross_tokenizer != "none" and teacher is not None  # the cache holds the teacher's vocabulary
        vocab = teacher.vocab if theirs else student.vocab
        run.add("PASS" if k <= vocab else "FAIL", "top-k", f"teacher_source.top_k={k} of vocab {vocab}"
                + (" (the teacher's)" if theirs else ""))


def _check_intermediate(run: DryRun, recipe, student: Architecture, teacher: Architecture | None) -> None:
    from dist_distill.objective.intermediate import check_layer_map, make_projection, uniform_layer_map

    if not recipe.uses_term("hidden") and not recipe.uses_term("attention"):
        return
    if teacher is None:
        run.add("FAIL", "intermediate terms", "the hidden/attention terms need a teacher architecture")
        return
    im = recipe.intermediate
    try:
        pairs = check_layer_map(im.layer_map, teacher.num_layers, student.num_layers, "intermediate.layer_map") \
            if im.layer_map else uniform_layer_map(teacher.num_layers, student.num_layers)
    except UserError as err:
        run.add("FAIL", "layer map", str(err))
        return
    shown = ", ".join(f"{s}->{t}" for s, t in pairs[:4]) + (", ..." if len(pairs) > 4 else "")
    run.add("PASS", "layer map", f"{len(pairs)} pairs (student->teacher blocks): {shown}")
    try:
        with torch.device("meta"):
            proj = make_projection(im.projection, student.hidden, teacher.hidden, key="intermediate.projection")
    except UserError as err:
        run.add("FAIL", "projection", str(err))
        return
    shapes = ", ".join(f"{n} {tuple(p.shape)}" for n, p in proj.named_parameters()) or "no parameters"
    n = sum(p.numel() for p in proj.parameters())
    run.add("PASS", "projection", f"{im.projection} {student.hidden} -> {teacher.hidden}: {shapes} ({n:,} params "
            f"per mapped layer), L2 {im.projection_l2:g}")


def _check_group(run: DryRun, recipe, teacher: Architecture | None, cluster: Cluster) -> None:
    from dist_distill.planning.cluster import describe_layout, group_layout

    ts = recipe.teacher_source
    if ts.kind != "group" or teacher is None:
        return
    for what, n in (("attention heads", teacher.heads), ("kv heads", teacher.kv_heads)):
        ok = n % ts.tp_size == 0
        run.add("PASS" if ok else "FAIL", "teacher TP split", f"tp_size={ts.tp_size} {'divides' if ok else 'does not divide'} "
                f"the teacher's {n} {what}")
    try:
        roles = group_layout(cluster.nodes, cluster.gpus_per_node, ts.tp_size, ts.num_groups)
    except UserError as err:
        run.add("FAIL", "rank layout", str(err))
        return
    run.add("PASS", "rank layout", " | ".join(describe_layout(roles, cluster.gpus_per_node)))


def _check_cache(run: DryRun, recipe, student: Architecture) -> None:
    ts = recipe.teacher_source
    if ts.kind != "cache":
        return
    manifest = Path(ts.cache_dir) / "manifest.json"
    if not manifest.is_file():
        run.add("NOTE", "cache", f"{ts.cache_dir} has no manifest.json here: build it first (slurm/cache_array.sbatch "
                "or dd-cache build); dd-train checks its binding to teacher, tokenizer and data at start-up")
        return
    try:
        m = json.loads(manifest.read_text())
    except (OSError, json.JSONDecodeError) as err:
        run.add("FAIL", "cache", f"{manifest} is unreadable: {err}")
        return
    problems = []
    if m.get("k", 0) < ts.top_k:
        problems.append(f"k={m.get('k')} < teacher_source.top_k={ts.top_k}")
    if m.get("seq_len") != recipe.data.max_seq_len:
        problems.append(f"seq_len={m.get('seq_len')} != data.max_seq_len={recipe.data.max_seq_len}")
    if m.get("vocab_size") is not None and m["vocab_size"] > student.vocab and recipe.loss.cross_tokenizer == "none":
        problems.append(f"vocab_size={m['vocab_size']} > student vocab_size {student.vocab}")
    run.add("FAIL" if problems else "PASS", "cache alignment",
            "; ".join(problems) if problems else f"k={m.get('k')}, seq_len={m.get('seq_len')}, vocab {m.get('vocab_size')}, "
            f"{m.get('num_samples')} samples")


def _check_data(run: DryRun, recipe) -> None:
    from dist_distill.models.loading import _looks_local

    train = recipe.data.train
    if _looks_local(train) or Path(train).suffix in (".jsonl", ".json", ".parquet", ".arrow"):
        ok = Path(train).exists()
        run.add("PASS" if ok else "FAIL", "data", f"{train} {'exists' if ok else 'does not exist'}")
    else:
        run.add("NOTE", "data", f"hub dataset {train} (split {recipe.data.split}, fields "
                f"{recipe.data.prompt_field}/{recipe.data.answer_field}): read on the cluster, not checked here")


def dry_run(recipe, student: Architecture, teacher: Architecture | None, cluster: Cluster,
            recipe_name: str = "recipe", target_fraction: float = 1.0):
    """Run every check of the module docstring; returns (DryRun, Plan or None)."""
    run = DryRun(recipe_name)
    run.add("PASS", "recipe", "loads and validates (types, ranges, contradictions)")
    run.add("PASS", "student", _arch_line(student))
    if teacher is not None:
        run.add("PASS", "teacher", _arch_line(teacher))
    elif recipe.teacher_source.kind not in ("none",):
        run.add("FAIL", "teacher", f"teacher_source.kind={recipe.teacher_source.kind} but no teacher architecture")
    _check_vocab(run, recipe, student, teacher)
    _check_lengths(run, recipe, student, teacher)
    _check_loss(run, recipe, student, teacher)
    _check_intermediate(run, recipe, student, teacher)
    _check_group(run, recipe, teacher, cluster)
    _check_cache(run, recipe, student)
    _check_data(run, recipe)
    op = recipe.optim
    world = cluster.gpus - (recipe.teacher_source.tp_size * recipe.teacher_source.num_groups
                            if recipe.teacher_source.kind == "group" else 0)
    run.add("PASS", "batch", f"{world} student ranks x micro {op.micro_batch_size} x accumulation {op.grad_accum} = "
            f"{world * op.micro_batch_size * op.grad_accum} sequences of {recipe.data.max_seq_len} per step, "
            f"{op.max_steps} steps, {resolve_precision(recipe)}")
    try:
        plan = plan_recipe(recipe, student, teacher, cluster, recipe_name, target_fraction)
    except UserError as err:
        run.add("FAIL", "memory plan", str(err))
        return run, None
    for role in plan.roles:
        total, margin = role.total(), cluster.gpu_mem - role.total()
        run.add("PASS" if margin >= 0 else "FAIL", f"memory ({role.role})",
                f"{total / 1e9:.2f} GB of {cluster.gpu_mem / 1e9:g} GB per GPU, margin {margin / 1e9:+.2f} GB; "
                f"largest term: {role.largest().name}")
    return run, plan

"""Where the teacher's per-token signal comes from: one abstraction, several sources.

Every source answers `signal(indices, batch)` with a :class:`TeacherSignal` whose rows are
the target tokens of the batch (row-major order of ``targets != IGNORE_INDEX``), so the
loss path is the same whichever source a recipe names:

- ``cache``: a top-k logit cache built offline by ``dd-cache build`` (ids, raw logits, lse);
- ``colocated``: a frozen teacher replicated on every student rank, run forward on the same
  batch; it gives its final hidden states and lm_head (a dense teacher for the fused loss)
  and, when intermediate terms need them, its per-layer hidden states and attention maps;
- ``group``: a tensor-parallel teacher group in the same job sends top-k signals.

Subpackages and modules: ``signal`` (the TeacherSignal type), ``scorer`` (running a teacher,
whole or tensor-parallel, to per-target top-k + logsumexp), ``cache`` (the offline top-k
cache: format, codec, writer, reader), ``group`` (the online tensor-parallel teacher group),
``colocated`` (a replicated frozen teacher), ``tensor_parallel`` (TP loading and sharding).
"""

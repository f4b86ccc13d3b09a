"""Online teacher group: tensor-parallel teacher ranks feeding the ZeRO-3 student ranks of the same job.

With ``teacher_source.kind=group`` a job of W processes splits in two roles:

- ranks [0, T), T = tp_size * num_groups, are teachers: group g = rank // tp_size shards the
  Hugging Face teacher over its tp_size ranks (PyTorch tensor parallelism on a DeviceMesh),
  runs it forward only, computes top-k and logsumexp vocab-parallel (see
  :func:`vocab_parallel_topk`) and sends them to the students it serves;
- ranks [T, W) are students (student rank s = rank - T); DeepSpeed ZeRO-3 runs on them alone.
  Student s is served by teacher group s % num_groups, whose tp-rank 0 (the "leader") sends.

Why two worlds (DESIGN fact 8, checked): ZeRO-3 calls world-level barriers during set-up, so it
cannot share its default process group with ranks that do not run the engine. Each role
therefore initialises its OWN default group (RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT
rewritten per role, TORCHELASTIC_USE_AGENT_STORE=False), and a "bridge" over all W processes
is a bare ``ProcessGroupGloo`` on a separate TCPStore (MASTER_PORT + 1, hosted by global
rank 0), used with point-to-point send/recv.

Which samples: :class:`~dist_distill.data.sampler.StepSampler` is a pure function of
(seed, step, world, rank), so a teacher builds the same sampler as each student it serves
(sampler world = number of students) and knows every student's micro-batches in advance.

Messages, leader -> student, per (step, micro-batch), in order on one tag:
  header  int64 [6 + micro_batch] = MAGIC, step, micro, rows, k, micro_batch, *sample indices
  payload fp32  [rows, 2k + 1]    = top-k raw logits | top-k ids (int32 bits) | logsumexp
rows are the batch's target tokens (``targets != IGNORE_INDEX``, row-major), the same rows a
cache read gives. The student checks step, micro-batch and indices against its own sampler
and refuses a mismatch. Before the first step each student sends MAGIC, start step (its
resumed step) to its leader, so a resumed run is served from the right step.

Pipelining per micro-batch: gloo's send completes only once the receiver has posted the
matching recv (checked), so the leader sends each micro-batch's signal as soon as it is scored
(isend) and waits only for the message ``teacher_source.prefetch_micro_batches`` micro-batches
back: the teacher runs up to that many micro-batches ahead of each student, whatever grad_accum
(see :class:`~dist_distill.teacher.group.server.TeacherServer`).

Failures: a dead peer closes its sockets and every pending send/recv fails at once; a hung
one is caught by timeouts: students wait ``teacher_source.timeout_s`` per message and then
exit with :class:`TeacherGroupError` (a UserError: one paragraph, exit code 2); teachers wait
for students up to max(timeout_s, deepspeed.startup_timeout_s) (a student may be saving a checkpoint).
Test-only fault injection: DD_FAULT_TEACHER_EXIT_AT_STEP=N or DD_FAULT_TEACHER_HANG_AT_STEP=N
makes teacher rank DD_FAULT_TEACHER_RANK (global, default: the last teacher rank) exit or hang
when it is about to compute optimizer step N (1-based, as in metrics.jsonl). Steps in messages
are 1-based too; headers carry the 0-based step index.
"""

"""Per-GPU memory of a recipe on a cluster, term by term, and the tokens/s its FLOPs allow.

Every term is in bytes and names where it lives ("gpu" or "host"). The accounting follows the
buffers DeepSpeed 0.19's ZeRO-3 optimizer allocates (deepspeed/runtime/zero/stage3.py), for Ψ
student parameters over P student ranks, parameter dtype of b bytes (bf16: 2, fp32: 4):

- ``lp_param_buffer``: the rank's 16-bit parameter partition, b·Ψ/P;
- ``grad_partitions_flat_buffer``: the rank's gradient partition in the gradient-accumulation dtype
  (the parameter dtype unless ``data_types.grad_accum_dtype`` says otherwise), b·Ψ/P;
- ``fp32_partitioned_groups_flat`` + Adam's exp_avg / exp_avg_sq: 12·Ψ/P;
- the float32 gradient buffer of the largest optimizer sub-group (``initialize_optimizer_states``),
  4·min(sub_group_size, Ψ/P) -- a whole 4·Ψ/P on the host with optimizer offload;
- the contiguous-gradients reduce bucket, ``reduce_bucket_size`` elements of b bytes;
- while a module runs: its whole parameters and, in backward, its whole gradient (2·b per element
  of the largest module: DeepSpeed's estimator's ``4 * largest_layer_params`` in bf16), plus the
  ``stage3_prefetch_bucket_size`` parameters fetched ahead.

DeepSpeed's own estimator (``estimate_zero3_model_states_mem_needs``) charges 18·Ψ/P + 4·L without
offload and 2·Ψ/P + 4·L with optimizer offload; tests/test_plan.py checks these terms against it.
At 64 GPUs (8 nodes x 8) a 70B student's Ψ/P is 1.1e9 elements: the sub-group buffer is then capped
by sub_group_size (1e9), and the partitioned states (~17.6 GB bf16 + 4 GB buffer) no longer dominate
as they do at 8 GPUs (~141 GB: no fit without offload).

Activations are counted per decoder layer from what autograd saves in transformers' Llama/Qwen2
layers (RMSNorm keeps a float32 copy of its input and its normalised output; q and k after RoPE, v;
the attention output; the SwiGLU MLP's gate, up, SiLU(gate) and product), with flash attention
(no [S, S] scores) unless the recipe asks for eager/sdpa, where the probabilities are kept too.
With gradient checkpointing each layer keeps only its input, and one layer is recomputed at a time.

Not every term is alive at once. The plan adds the terms alive at each of the two moments a step
peaks -- at the loss (every activation saved, the fused loss's float32 accumulator and chunk buffers)
and at the start of the backward pass (activations, a recomputed layer, whole gradients in flight) --
and reports the larger sum. On 2-rank CPU runs this total came within 25 % of the measured peak
(tests/test_plan.py); adding every term instead overestimated it by up to 2.4x.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dist_distill.planning.models import Architecture

GIB = 1 << 30
GB = 10**9
DS_ZERO_DEFAULTS = {"reduce_bucket_size": int(5e8), "sub_group_size": int(1e9), "stage3_prefetch_bucket_size": int(5e7),
                    "stage3_max_live_parameters": int(1e9), "stage3_param_persistence_threshold": int(1e5)}
"""DeepSpeed 0.19's defaults for the zero_optimization keys the plan reads (runtime/zero/config.py)."""
TORCH_CHUNK_FACTOR = 357 / 256
"""PyTorch fused-loss path: peak over its chunk budget, measured on CPU at the 256 MiB default for a KL
against a teacher (357 MiB; kernels/fused_linear_distill.py, docs/benchmarks.md). Hard-label CE alone holds
fewer buffers (measured: ~4 [rows, V] float32 of the 7 the budget assumes), so there the term is an
overestimate. Triton works in place: factor 1 (not measured here: no GPU)."""
TEACHER_LOGITS_CHUNK = 256 << 20
"""A group teacher rank's vocab-parallel logits chunk budget (teacher/group/roles.py LOGITS_CHUNK_BYTES)."""


@dataclass
class Cluster:
    """The machines a recipe is planned for."""

    nodes: int
    gpus_per_node: int
    gpu_mem: int
    """Bytes of memory per GPU (80 GB card: 80e9)."""
    peak_tflops: float = 989.0
    """Dense bf16 tensor-core peak per GPU in TFLOP/s (H100 SXM: 989; A100: 312)."""
    mfu: float = 0.40
    """Assumed model-FLOPs utilisation for the tokens/s estimate (an assumption, not a measurement)."""
    runtime_overhead: int = 2 * GIB
    """Bytes per GPU allowed for the CUDA context, NCCL buffers and allocator fragmentation (assumed)."""
    host_mem: int | None = None
    """Bytes of host memory per node (only used to check offloaded states; None: not checked)."""

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    def check(self) -> None:
        from dist_distill.errors import UserError

        if self.nodes < 1 or self.gpus_per_node < 1:
            raise UserError(f"--nodes={self.nodes} and --gpus-per-node={self.gpus_per_node}: both must be >= 1")
        if self.gpu_mem <= 0:
            raise UserError(f"--gpu-mem={self.gpu_mem}: must be > 0 (e.g. 80GB)")
        if not 0 < self.mfu <= 1:
            raise UserError(f"--mfu={self.mfu}: expected a fraction in (0, 1], e.g. 0.4")
        if self.peak_tflops <= 0:
            raise UserError(f"--peak-tflops={self.peak_tflops}: must be > 0")


ALWAYS = ("forward", "backward")
"""Alive through the whole step (partitions, preallocated buffers, the runtime)."""
FORWARD, BACKWARD = ("forward",), ("backward",)
"""The two moments a step's GPU memory peaks: at the loss (end of the forward pass, every activation
saved, the fused loss's buffers alive) and at the start of the backward pass (activations still saved,
a recomputed layer, gradients in flight). The plan's total is the larger of the two."""


@dataclass
class Term:
    name: str
    bytes: int
    where: str = "gpu"
    note: str = ""
    phases: tuple[str, ...] = ALWAYS
    """When the term is alive: FORWARD (at the loss), BACKWARD, or both."""


@dataclass
class RolePlan:
    """The memory of one kind of rank (a student rank or a teacher rank)."""

    role: str
    ranks: int
    terms: list[Term] = field(default_factory=list)

    def add(self, name: str, nbytes: float, where: str = "gpu", note: str = "", phases=ALWAYS) -> None:
        self.terms.append(Term(name, int(nbytes), where, note, tuple(phases)))

    def phase_total(self, phase: str) -> int:
        """GPU bytes alive at `phase` ("forward": at the loss; "backward": at the start of the backward pass)."""
        return sum(t.bytes for t in self.terms if t.where == "gpu" and phase in t.phases)

    def peak_phase(self) -> str:
        return max(ALWAYS, key=self.phase_total)

    def total(self, where: str = "gpu") -> int:
        """The GPU peak (the larger phase); for where="host", every host-resident term."""
        if where == "gpu":
            return self.phase_total(self.peak_phase())
        return sum(t.bytes for t in self.terms if t.where == where)

    def largest(self) -> Term:
        return max((t for t in self.terms if t.where == "gpu"), key=lambda t: t.bytes)


@dataclass
class Plan:
    recipe_name: str
    cluster: Cluster
    student: Architecture
    teacher: Architecture | None
    precision: str
    roles: list[RolePlan]
    model_state_bytes: int
    """Student rank, GPU: partitions of parameters, gradients and optimizer states, the float32 sub-group
    gradient buffer and the largest module gathered with its gradient (what DeepSpeed's estimator covers)."""
    ds_estimate_bytes: int
    """deepspeed's estimate_zero3_model_states_mem_needs for the same setting (GPU bytes)."""
    tokens_per_step: int
    flops_per_token: float
    tokens_per_s: float
    step_s: float
    notes: list[str] = field(default_factory=list)

    def fits(self) -> bool:
        return all(r.total() <= self.cluster.gpu_mem for r in self.roles)


def zero_settings(recipe, world: int) -> dict:
    """The zero_optimization keys of the DeepSpeed config dd-train would use, with DeepSpeed's defaults."""
    from dist_distill.training.deepspeed_config import deepspeed_config

    zero = deepspeed_config(recipe, world)["zero_optimization"]
    return {**DS_ZERO_DEFAULTS, **{k: v for k, v in zero.items() if k in DS_ZERO_DEFAULTS}}


def resolve_precision(recipe) -> str:
    """The plan's training precision: the recipe's, with "auto" read as bf16 (what GPUs run)."""
    p = recipe.deepspeed.precision
    return "bf16" if p == "auto" else p


def layer_activation_bytes(arch: Architecture, tokens: int, seq: int, elem: int, attention: str) -> int:
    """Bytes autograd keeps for one decoder layer of `arch` over `tokens` = batch x `seq` tokens.

    Two RMSNorms: float32 input copy + normalised output, (4 + elem) * h each; q, k after RoPE and v:
    elem * (2 q_dim + 2 kv_dim)... (q and the attention output are q_dim wide, k and v kv_dim); SwiGLU:
    gate, up, SiLU(gate), gate*up = 4 * elem * intermediate. eager/sdpa attention adds the softmax
    probabilities (float32 and the cast copy) of [batch, heads, seq, seq].
    """
    h, i = arch.hidden, arch.intermediate
    q_dim, kv_dim = arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
    per_token = 2 * (4 + elem) * h + 2 * elem * (q_dim + kv_dim) + 4 * elem * i
    scores = 0
    if attention in ("eager", "sdpa"):
        scores = (4 + elem) * (tokens // seq) * arch.heads * seq * seq
    return per_token * tokens + scores


def plan_recipe(recipe, student: Architecture, teacher: Architecture | None, cluster: Cluster,
                recipe_name: str = "recipe", target_fraction: float = 1.0) -> Plan:
    """The per-GPU memory plan and throughput estimate of `recipe` on `cluster` (see module docstring).

    `target_fraction`: the share of a micro-batch's tokens that are loss targets (answer tokens), which
    sizes the fused loss's rows; 1.0 (every token) is the upper bound, and close for reasoning traces,
    whose answers are most of each sample.
    """
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    cluster.check()
    ts, op, ds = recipe.teacher_source, recipe.optim, recipe.deepspeed
    num_teachers = ts.tp_size * ts.num_groups if ts.kind == "group" else 0
    p = cluster.gpus - num_teachers
    notes = []
    if p < 1:
        from dist_distill.errors import UserError

        raise UserError(f"{cluster.gpus} GPUs leave no student rank after {num_teachers} teacher ranks "
                        f"(teacher_source.tp_size x num_groups)")
    precision = resolve_precision(recipe)
    elem = {"bf16": 2, "fp16": 2, "fp32": 4}[precision]
    zero = zero_settings(recipe, p)
    psi = student.total_params
    part = -(-psi // p)
    off_opt, off_par = ds.offload_optimizer != "none", ds.offload_params != "none"
    s = RolePlan("student", p)
    s.add("ZeRO-3 parameters (16-bit partition)" if elem == 2 else "ZeRO-3 parameters (partition)", elem * part,
          "host" if off_par else "gpu", f"{elem} B x {part:,} of {psi:,} params")
    s.add("gradient partition", elem * part, "host" if off_opt else "gpu", f"{elem} B x {part:,}")
    s.add("optimizer states (fp32 master, Adam m, v)", 12 * part, "host" if off_opt else "gpu", f"12 B x {part:,}")
    sub = part if off_opt else min(zero["sub_group_size"], part)
    s.add("fp32 sub-group gradient buffer", 4 * sub, "host" if off_opt else "gpu",
          f"4 B x min(sub_group_size={zero['sub_group_size']:.3g}, partition)" if not off_opt else "4 B x partition")
    largest = student.largest_module_params
    s.add(f"largest module gathered ({student.largest_module})", elem * largest, "gpu", f"{elem} B x {largest:,}")
    s.add("its whole gradient before reduce-scatter", elem * largest, "gpu", f"{elem} B x {largest:,}", BACKWARD)
    model_states = sum(t.bytes for t in s.terms if t.where == "gpu")
    prefetch = min(zero["stage3_prefetch_bucket_size"], zero["stage3_max_live_parameters"], psi)  # never more than the model
    s.add("prefetch bucket", elem * prefetch, "gpu", f"stage3_prefetch_bucket_size={prefetch:.3g} params")
    s.add("reduce bucket (contiguous gradients)", elem * zero["reduce_bucket_size"], "gpu",
          f"reduce_bucket_size={zero['reduce_bucket_size']:.3g}")

    seq, micro = recipe.data.max_seq_len, op.micro_batch_size
    tokens = seq * micro
    if not 0 < target_fraction <= 1:
        from dist_distill.errors import UserError

        raise UserError(f"--target-fraction={target_fraction}: expected a fraction in (0, 1] of a micro-batch's "
                        "tokens that are loss targets (answer tokens)")
    targets = max(1, int(tokens * target_fraction))  # rows of the fused loss
    attention = recipe.student.attn_implementation
    attention = "flash_attention_2" if attention == "auto" else attention
    per_layer = layer_activation_bytes(student, tokens, seq, elem, attention)
    if op.gradient_checkpointing:
        s.add("activations: layer inputs kept (checkpointing)", student.num_layers * elem * tokens * student.hidden,
              "gpu", f"{student.num_layers} layers x {elem} B x {tokens:,} tokens x {student.hidden}")
        s.add("activations: one layer recomputed", per_layer, "gpu", f"{tokens:,} tokens, {attention}", BACKWARD)
    else:
        s.add("activations (no checkpointing)", student.num_layers * per_layer, "gpu",
              f"{student.num_layers} layers x {per_layer / GIB:.2f} GiB at {tokens:,} tokens, {attention}")
    s.add("backward working gradients", 2 * elem * tokens * max(student.intermediate, student.hidden), "gpu",
          "two [tokens, intermediate] gradients in flight", BACKWARD)
    vocab, hid = student.vocab, student.hidden
    if recipe.loss.fused:
        from dist_distill.kernels.fused_linear_distill import chunk_rows

        budget = int(recipe.loss.chunk_mib * 2**20)
        backend = recipe.loss.backend if recipe.loss.backend != "auto" else "triton"
        rows = chunk_rows(budget, vocab, backend, dense_teacher=False)
        chunk = budget * min(rows, targets) / rows  # a micro-batch smaller than one chunk uses less
        chunk *= TORCH_CHUNK_FACTOR if backend == "torch" else 1.0
        s.add("fused loss: float32 lm_head gradient accumulator", 4 * vocab * hid, "gpu", f"4 B x [{vocab}, {hid}]",
              FORWARD)
        if elem != 4:  # in float32 the accumulator is the saved gradient
            s.add("fused loss: lm_head gradient saved for backward", elem * vocab * hid, "gpu",
                  f"{elem} B x [{vocab}, {hid}] (the backward's whole gradient above)", FORWARD)
        if recipe.loss.cross_tokenizer == "uld":  # losses/fused_uld.py: PyTorch chunks of ULD_BUFFERS rows of V
            from dist_distill.losses.fused_uld import ULD_BUFFERS, uld_chunk_rows

            rows = uld_chunk_rows(budget, vocab)
            s.add("fused loss: ULD + CE chunk buffers (torch)", min(rows, targets) * 4 * vocab * ULD_BUFFERS, "gpu",
                  f"loss.chunk_mib={recipe.loss.chunk_mib:g}, {min(rows, targets):,} rows x {ULD_BUFFERS} x [V] fp32",
                  FORWARD)
            s.add("ULD: aligned teacher rows, sorted probabilities", targets * (ts.top_k + 1) * 4, "gpu",
                  f"[{targets:,}, k+1] fp32 (top-k sorted + tail)", FORWARD)
        else:
            s.add(f"fused loss: chunk buffers ({backend})", chunk, "gpu",
                  f"loss.chunk_mib={recipe.loss.chunk_mib:g}, {min(rows, targets):,} rows", FORWARD)
        s.add("fused loss: target hidden states and their gradient", 2 * elem * targets * hid, "gpu",
              f"2 x [{targets:,}, {hid}]")
    else:
        s.add("materialised logits (loss.fused=false)", 3 * 4 * targets * vocab, "gpu",
              f"float32 logits, softmax and gradient [{targets:,}, {vocab}]", FORWARD)
    k = ts.top_k
    if ts.kind == "cache":
        s.add("cache reader: top-k rows of a micro-batch", targets * (2 * k + 1) * 4, "gpu",
              f"[{targets:,}, 2k+1] fp32", FORWARD)
    elif ts.kind == "group":
        s.add("teacher signals in flight", ts.prefetch_micro_batches * targets * (2 * k + 1) * 4, "gpu",
              f"prefetch_micro_batches={ts.prefetch_micro_batches} x [{targets:,}, 2k+1] fp32")
    elif ts.kind == "colocated" and teacher is not None:
        t_elem = 1 if ts.load_in_8bit else elem
        s.add("colocated teacher (replicated)", t_elem * teacher.total_params, "gpu", f"{teacher.total_params:,} params")
        s.add("colocated teacher: one layer's forward", layer_activation_bytes(teacher, tokens, seq, elem, attention),
              "gpu", "no grad", FORWARD)
        if recipe.uses_term("hidden"):
            pairs = len(recipe.intermediate.layer_map or []) or student.num_layers  # uniform map: one per student layer
            s.add("intermediate: teacher hidden states of mapped layers", (pairs + 1) * elem * tokens * teacher.hidden,
                  "gpu", f"{pairs} pairs x [{tokens:,}, {teacher.hidden}] (output_hidden_states)")
            s.add("intermediate: projections' saved activations", 3 * pairs * elem * tokens * teacher.hidden, "gpu",
                  f"~3 x [{tokens:,}, {teacher.hidden}] per pair ({recipe.intermediate.projection}; estimated, not measured)")
    s.add("runtime (CUDA context, NCCL, allocator; assumed)", cluster.runtime_overhead, "gpu", "--runtime-overhead")
    roles = [s]

    if ts.kind == "group" and teacher is not None:
        t = RolePlan("teacher", num_teachers)
        t_elem = 1 if ts.load_in_8bit else elem
        body = teacher.total_params - teacher.embedding_params - teacher.lm_head_params
        shard_params = body // ts.tp_size + (teacher.lm_head_params or teacher.embedding_params) // ts.tp_size
        t.add("teacher TP shard (weights)", t_elem * shard_params + elem * teacher.embedding_params, "gpu",
              f"body / tp_size={ts.tp_size} in {'int8' if ts.load_in_8bit else precision}, embedding whole")
        # the group scores one student micro-batch at a time
        t.add("teacher forward: one layer (no grad)", layer_activation_bytes(teacher, tokens, seq, elem, attention)
              // ts.tp_size, "gpu", f"{tokens:,} tokens / tp_size", FORWARD)
        t.add("teacher vocab-parallel logits chunk", TEACHER_LOGITS_CHUNK, "gpu", "LOGITS_CHUNK_BYTES", FORWARD)
        t.add("runtime (CUDA context, NCCL, allocator; assumed)", cluster.runtime_overhead, "gpu", "--runtime-overhead")
        roles.append(t)

    # the estimator divides by nodes x gpus_per_node; pass the student ranks as one "node" of P GPUs
    _, ds_gpu, _ = estimate_zero3_model_states_mem_needs(psi, largest, p, 1, cpu_offload=off_opt,
                                                         cpu_offload_params=off_par, zero_init=True)
    if elem == 4:
        notes.append("fp32 training: DeepSpeed's estimator assumes 16-bit parameters; compare with care")

    # FLOPs per trained token: 6 per active weight (forward 2 + backward 4), 8 with recomputation,
    # plus causal attention 6 * layers * q_dim * seq (QK^T and PV, forward and backward, halved by the mask)
    weights = student.active_params - student.embedding_params + (0 if student.lm_head_params else student.embedding_params)
    per_param = 8 if op.gradient_checkpointing else 6
    attn = (per_param / 2) * 2 * student.num_layers * student.heads * student.head_dim * seq
    flops = per_param * weights + attn
    tokens_per_step = tokens * op.grad_accum * p
    rate = p * cluster.peak_tflops * 1e12 * cluster.mfu / flops
    if ts.kind == "group" and teacher is not None:
        teacher_rate = num_teachers * cluster.peak_tflops * 1e12 * cluster.mfu / (2 * teacher.active_params)
        if teacher_rate < rate:
            notes.append(f"the teacher group bounds throughput: {teacher_rate:,.0f} tokens/s < students' {rate:,.0f}")
        rate = min(rate, teacher_rate)
    if ts.kind == "cache" and teacher is not None:
        per_gpu = cluster.peak_tflops * 1e12 * cluster.mfu / (2 * teacher.active_params)
        notes.append(f"cache build (offline): 2 x {teacher.active_params / 1e9:.1f}B active teacher FLOPs per token, "
                     f"{per_gpu:,.0f} tokens/s per GPU at the same MFU")
    return Plan(recipe_name, cluster, student, teacher, precision, roles, model_states, int(ds_gpu),
                tokens_per_step, flops, rate, tokens_per_step / rate, notes)


def parse_size(text: str, flag: str) -> int:
    """'80GB' -> 80e9 bytes, '80GiB' -> 80 * 2**30, '80' -> 80e9 (GB assumed). Raises UserError otherwise."""
    import re

    from dist_distill.errors import UserError

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(gb|gib|g|mb|mib|tb|tib)?\s*", text.lower())
    if not m:
        raise UserError(f"{flag}={text!r}: expected a size such as 80GB, 80GiB or 141GB")
    unit = {"gb": GB, "g": GB, None: GB, "gib": GIB, "mb": 10**6, "mib": 1 << 20, "tb": 10**12, "tib": 1 << 40}[m.group(2)]
    return int(float(m.group(1)) * unit)


def _fmt(nbytes: int) -> str:
    return f"{nbytes / GB:8.2f} GB"


def format_plan(plan: Plan) -> str:
    """The plan as one screen of text (what dd-plan prints)."""
    c = plan.cluster
    lines = [f"plan: {plan.recipe_name} on {c.nodes} node(s) x {c.gpus_per_node} GPU(s) x {c.gpu_mem / GB:g} GB, "
             f"{plan.precision}",
             f"student {plan.student.name}: {plan.student.total_params / 1e9:.2f}B params, largest module "
             f"{plan.student.largest_module} {plan.student.largest_module_params / 1e6:.0f}M"]
    if plan.teacher is not None:
        lines.append(f"teacher {plan.teacher.name}: {plan.teacher.total_params / 1e9:.2f}B params "
                     f"({plan.teacher.active_params / 1e9:.1f}B active per token)")
    for role in plan.roles:
        lines.append("")
        lines.append(f"per GPU, {role.role} rank ({role.ranks} of them); fwd: alive at the loss, bwd: at the start "
                     "of the backward pass")
        for t in role.terms:
            when = "host" if t.where == "host" else "+".join({"forward": "fwd", "backward": "bwd"}[p] for p in t.phases)
            lines.append(f"  {t.name:<56}{_fmt(t.bytes)}  {when:<7}  {t.note}")
        total, largest = role.total(), role.largest()
        margin = c.gpu_mem - total
        verdict = "FITS" if margin >= 0 else "DOES NOT FIT"
        lines.append(f"  {'alive at the loss (end of forward)':<56}{_fmt(role.phase_total('forward'))}")
        lines.append(f"  {'alive at the start of backward':<56}{_fmt(role.phase_total('backward'))}")
        lines.append(f"  {'peak on the GPU (' + role.peak_phase() + ')':<56}{_fmt(total)}  {verdict}: margin "
                     f"{margin / GB:+.2f} GB of {c.gpu_mem / GB:g} GB ({margin / c.gpu_mem:+.0%})")
        lines.append(f"  largest term: {largest.name} ({largest.bytes / GB:.2f} GB)")
        host = role.total("host")
        if host:
            per_node = host * min(role.ranks, c.gpus_per_node)
            check = "" if c.host_mem is None else (" (fits host memory)" if per_node <= c.host_mem
                                                   else f" (EXCEEDS --host-mem {c.host_mem / GB:g} GB)")
            lines.append(f"  host memory per node for offloaded states: {per_node / GB:.1f} GB{check}")
    lines.append("")
    lines.append(f"model states (student, GPU): {plan.model_state_bytes / GB:.2f} GB; DeepSpeed's "
                 f"estimate_zero3_model_states_mem_needs: {plan.ds_estimate_bytes / GB:.2f} GB "
                 f"({plan.model_state_bytes / plan.ds_estimate_bytes - 1:+.1%})")
    lines.append(f"throughput at MFU {c.mfu:.0%} of {c.peak_tflops:g} TFLOP/s: {plan.flops_per_token / 1e9:.1f} GFLOP "
                 f"per token, {plan.tokens_per_s:,.0f} tokens/s, {plan.tokens_per_step:,} tokens per step, "
                 f"{plan.step_s:.1f} s per step")
    lines += [f"note: {n}" for n in plan.notes]
    lines.append(f"verdict: {'FITS' if plan.fits() else 'DOES NOT FIT'}")
    return "\n".join(lines)

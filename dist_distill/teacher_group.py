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

Which samples: :class:`~dist_distill.train.StepSampler` is a pure function of
(seed, step, world, rank), so a teacher builds the same sampler as each student it serves
(sampler world = number of students) and knows every student's micro-batches in advance.

Messages, leader -> student, per (step, micro-batch), in order on one tag:
  header  int64 [6 + micro_batch] = MAGIC, step, micro, rows, k, micro_batch, *sample indices
  payload fp32  [rows, 2k + 1]    = top-k raw logits | top-k ids (int32 bits) | logsumexp
rows are the batch's target tokens (``targets != IGNORE_INDEX``, row-major), the same rows a
cache read gives. The student checks step, micro-batch and indices against its own sampler
and refuses a mismatch. Before the first step each student sends MAGIC, start step (its
resumed step) to its leader, so a resumed run is served from the right step.

Prefetch (double buffering): gloo's send completes only once the receiver has posted the
matching recv (checked), so before computing step t the leader waits for its sends of step
t - prefetch_steps; the teacher computes step t while the students work on step t - 1.

Failures: a dead peer closes its sockets and every pending send/recv fails at once; a hung
one is caught by timeouts: students wait ``teacher_source.timeout_s`` per message and then
exit with :class:`TeacherGroupError` (a UserError: one paragraph, exit code 2); teachers wait
for students up to max(timeout_s, deepspeed.startup_timeout_s) (a student may be saving a checkpoint).
Test-only fault injection: DD_FAULT_TEACHER_EXIT_AT_STEP=N or DD_FAULT_TEACHER_HANG_AT_STEP=N
makes teacher rank DD_FAULT_TEACHER_RANK (global, default: the last teacher rank) exit or hang
when it is about to compute optimizer step N (1-based, as in metrics.jsonl). Steps in messages
are 1-based too; headers carry the 0-based step index.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections import deque
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from .data import IGNORE_INDEX
from .errors import UserError
from .teacher import TeacherSignal

MAGIC = 0x7EAC4E5
HEADER = 6
STARTUP_TIMEOUT_S = 1800.0
"""Fallback for deepspeed.startup_timeout_s: seconds allowed for start-up (model loading on the other
role) and for a student's slow step (checkpoint save) as seen from a teacher; dead peers are noticed
at once whatever this is."""
LOGITS_CHUNK_BYTES = 256 << 20
"""Budget of one vocab-parallel logits chunk on a teacher rank ([rows, V / tp] float32)."""


def startup_timeout_s(recipe) -> float:
    return max(recipe.teacher_source.timeout_s, getattr(recipe.deepspeed, "startup_timeout_s", STARTUP_TIMEOUT_S))


class TeacherGroupError(UserError):
    """The teacher group stopped answering (dead or hung rank) or sent something unexpected."""


@dataclass(frozen=True)
class Roles:
    """Who is who in a kind=group job of `world` processes (global ranks)."""

    rank: int
    world: int
    tp_size: int
    num_groups: int

    @property
    def num_teachers(self) -> int:
        return self.tp_size * self.num_groups

    @property
    def num_students(self) -> int:
        return self.world - self.num_teachers

    @property
    def is_teacher(self) -> bool:
        return self.rank < self.num_teachers

    @property
    def group(self) -> int:
        return self.rank // self.tp_size

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    def leader_of(self, student: int) -> int:
        """Global rank of the teacher rank that sends to student `student`."""
        return (student % self.num_groups) * self.tp_size

    def students_of(self, group: int) -> list[int]:
        return [s for s in range(self.num_students) if s % self.num_groups == group]

    def check(self) -> None:
        if self.num_students < self.num_groups:
            raise UserError(f"teacher_source.kind=group with teacher_source.tp_size={self.tp_size} x "
                            f"teacher_source.num_groups={self.num_groups} = {self.num_teachers} teacher ranks leaves "
                            f"{self.num_students} student ranks of {self.world}: launch at least "
                            f"{self.num_teachers + self.num_groups} processes, or lower tp_size / num_groups")


# ---- role split and bridge -------------------------------------------------------------------------
_BRIDGE: tuple[Roles, object] | None = None
"""(roles, bridge process group) of this process once :func:`split_world` ran (student side)."""


def _host_address() -> str:
    """Where this process's role peers reach it: MASTER_ADDR on one node, else this host's address."""
    master = os.environ.get("MASTER_ADDR", "127.0.0.1")
    one_node = os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE")) == os.environ.get("WORLD_SIZE")
    if master in ("127.0.0.1", "localhost", "::1") or one_node:
        return master
    return socket.gethostbyname(socket.gethostname())


def _role_env(roles: Roles, store) -> None:
    """Rewrite RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT so that `init_process_group(env://)` builds
    this role's own world; the role's rank 0 picks a free port and publishes it in the bridge store."""
    from .distributed import free_port

    role = "teacher" if roles.is_teacher else "student"
    role_rank = roles.rank if roles.is_teacher else roles.rank - roles.num_teachers
    role_world = roles.num_teachers if roles.is_teacher else roles.num_students
    if role_rank == 0:
        store.set(f"{role}/addr", _host_address())
        store.set(f"{role}/port", str(free_port()))
    os.environ.update(RANK=str(role_rank), WORLD_SIZE=str(role_world), TORCHELASTIC_USE_AGENT_STORE="False",
                      MASTER_ADDR=store.get(f"{role}/addr").decode(), MASTER_PORT=store.get(f"{role}/port").decode(),
                      DD_ROLE=role, DD_GLOBAL_RANK=str(roles.rank))


def split_world(recipe) -> bool:
    """For teacher_source.kind=group: split the launcher's world into teacher and student roles.

    Teacher ranks serve the students here and return True once done (the caller then exits);
    student ranks return False with their own world in the environment (so DeepSpeed builds
    its default group over the students only) and the bridge kept for :class:`GroupTeacher`.
    Any other kind: returns False and changes nothing.
    """
    global _BRIDGE
    ts = recipe.teacher_source
    if ts.kind != "group":
        return False
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    roles = Roles(rank, world, ts.tp_size, ts.num_groups)
    roles.check()
    addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = int(os.environ.get("DD_BRIDGE_PORT", int(os.environ.get("MASTER_PORT", "29500")) + 1))
    startup = timedelta(seconds=startup_timeout_s(recipe))
    store = dist.TCPStore(addr, port, world, rank == 0, timeout=startup)
    bridge = dist.ProcessGroupGloo(dist.PrefixStore("dd-bridge", store), rank, world, startup)
    _role_env(roles, store)
    if not roles.is_teacher:
        _BRIDGE = (roles, bridge)
        return False
    serve(recipe, roles, bridge)
    return True


def bridge() -> tuple[Roles, object]:
    if _BRIDGE is None:
        raise UserError("teacher_source.kind=group: this process joined no teacher group; launch through "
                        "dd-train (torchrun/deepspeed) so that split_world runs before the trainer")
    return _BRIDGE


# ---- tensor parallelism and vocab-parallel top-k ---------------------------------------------------
COLWISE = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROWWISE = ("o_proj", "down_proj")


def tp_plan(model) -> dict:
    """Megatron-style plan for Llama/Qwen2-like decoders (DESIGN fact 8, checked): q/k/v/gate/up
    column-parallel, o/down row-parallel, lm_head column-parallel keeping each rank's vocab slice."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    plan = {}
    for name, _ in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in COLWISE:
            plan[name] = ColwiseParallel()
        elif leaf in ROWWISE:
            plan[name] = RowwiseParallel()
    plan["lm_head"] = ColwiseParallel(use_local_output=True)
    return plan


def check_tp_shape(config, tp_size: int) -> None:
    for key in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        value = getattr(config, key, None)
        if value is not None and value % tp_size:
            raise UserError(f"teacher_source.tp_size={tp_size} must divide the teacher's {key}={value}")
    if getattr(config, "tie_word_embeddings", False):
        raise UserError("the group teacher shards lm_head by vocabulary; a teacher with tied embeddings is not "
                        "supported yet (use teacher_source.kind=cache or colocated)")


def load_teacher_shards(spec, tp_mesh, device, load_in_8bit: bool = False):
    """The teacher of `spec` read from disk as this rank's TP shards only (no rank loads it whole),
    optionally with its sharded projections in bitsandbytes LLM.int8 (`quantize_tp_projections`);
    returns (model, vocab offset of this rank's slice)."""
    from transformers import AutoConfig

    from .models import check_model_source
    from .tp_loading import load_tp_sharded

    check_model_source(spec, "teacher")
    config = AutoConfig.from_pretrained(spec.name_or_path, revision=spec.revision,
                                        trust_remote_code=spec.trust_remote_code)
    check_tp_shape(config, tp_mesh.size())
    model = load_tp_sharded(spec, tp_mesh, tp_plan, device, config)
    if load_in_8bit:
        quantize_tp_projections(model, tp_mesh.get_group(), device)
    return model, vocab_offset(model, tp_mesh)


class RowParallelOutput(torch.nn.Module):
    """A row-parallel projection on local tensors: this rank's partial product, summed over the TP
    group, plus the (replicated) bias -- what ``RowwiseParallel`` does with DTensors."""

    def __init__(self, local: torch.nn.Module, bias: torch.Tensor | None, group):
        super().__init__()
        self.local, self.group = local, group
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.local(x)
        dist.all_reduce(y, group=self.group)
        return y if self.bias is None else y + self.bias


def quantize_tp_projections(model, group, device) -> None:
    """Replace the sharded q/k/v/gate/up (column-parallel) and o/down (row-parallel) projections by
    bitsandbytes LLM.int8 linears of this rank's weight slice (per-row int8 scales of the slice),
    working on local tensors: column-parallel ones take the replicated input and give this rank's
    output columns, row-parallel ones are wrapped in `RowParallelOutput`. The lm_head stays in
    the teacher's dtype (as transformers' 8-bit loading keeps it), vocab-parallel."""
    import bitsandbytes as bnb
    from torch.distributed.tensor import DTensor

    from .teacher import bnb_kwargs

    bnb_kwargs("8bit", device, "teacher_source.load_in_8bit")  # refuses an unusable bitsandbytes clearly
    for name, module in list(model.named_modules()):
        leaf = name.rsplit(".", 1)[-1]
        if leaf not in COLWISE + ROWWISE or not isinstance(module.weight, DTensor):
            continue
        weight = module.weight.to_local()
        bias = module.bias.to_local() if isinstance(module.bias, DTensor) else module.bias
        rowwise = leaf in ROWWISE
        int8 = bnb.nn.Linear8bitLt(weight.shape[1], weight.shape[0], bias=bias is not None and not rowwise,
                                   has_fp16_weights=False, threshold=6.0)
        state = {"weight": weight.detach().float().cpu()}
        if bias is not None and not rowwise:
            state["bias"] = bias.detach().float().cpu()
        int8.load_state_dict(state)
        int8 = int8.to(device)  # quantises the weight to int8 here
        replacement = RowParallelOutput(int8, None if bias is None else bias.detach(), group) if rowwise else int8
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner), attr, replacement.requires_grad_(False))


def vocab_offset(model, tp_mesh) -> int:
    """First vocabulary id of this rank's lm_head slice."""
    local = model.get_output_embeddings().weight.to_local().shape[0]
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(tp_mesh.size())]
    dist.all_gather(sizes, torch.tensor([local]), group=tp_mesh.get_group())
    offset = int(sum(s.item() for s in sizes[:tp_mesh.get_local_rank()]))
    return offset


def vocab_parallel_topk(local_logits: torch.Tensor, offset: int, vocab_size: int, k: int, group):
    """Top-k and logsumexp over the real vocabulary [0, vocab_size) from vocabulary slices.

    local_logits [n, V_local] hold columns [offset, offset + V_local) of the full logits. Each
    rank takes its local top-k (ids shifted by its offset) and local logsumexp; an all_gather of
    those [n, k] / [n] pieces and one more top-k / logsumexp give the exact result without ever
    gathering [n, V] logits (group None: one rank holds the whole vocabulary). Padded columns
    (id >= vocab_size) are -inf. Every rank of `group`
    must pass the same n (gloo's all_gather needs equal shapes: a short slice is padded with -inf).
    Returns ids int64 [n, k], logits fp32 [n, k], lse fp32 [n] (the same on every rank).
    """
    logits = local_logits.float()
    ids = torch.arange(offset, offset + logits.shape[1])
    logits = logits.masked_fill(ids >= vocab_size, float("-inf"))
    if logits.shape[1] < k:
        logits = torch.cat([logits, logits.new_full((logits.shape[0], k - logits.shape[1]), float("-inf"))], 1)
        ids = torch.cat([ids, ids.new_full((k - ids.shape[0],), vocab_size)])
    values, local_ids = logits.topk(k, dim=-1)
    local_ids = ids[local_ids]
    lse = torch.logsumexp(logits, dim=-1)
    world = dist.get_world_size(group) if group is not None else 1
    if world == 1:
        return local_ids, values, lse
    all_values = [torch.empty_like(values) for _ in range(world)]
    all_ids = [torch.empty_like(local_ids) for _ in range(world)]
    all_lse = [torch.empty_like(lse) for _ in range(world)]
    dist.all_gather(all_values, values.contiguous(), group=group)
    dist.all_gather(all_ids, local_ids.contiguous(), group=group)
    dist.all_gather(all_lse, lse, group=group)
    merged, pick = torch.cat(all_values, 1).topk(k, dim=-1)
    return torch.cat(all_ids, 1).gather(1, pick), merged, torch.logsumexp(torch.stack(all_lse), dim=0)


@torch.no_grad()
def tp_teacher_topk(model, offset: int, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    targets: torch.Tensor, k: int, vocab_size: int, group):
    """Teacher top-k at the target tokens (targets != IGNORE_INDEX, row-major) of a batch on a
    tensor-parallel teacher; the lm_head runs only on those rows, in chunks of bounded memory."""
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    hidden = hidden[targets != IGNORE_INDEX]
    head = model.get_output_embeddings()
    v_local = head.weight.to_local().shape[0] if hasattr(head.weight, "to_local") else head.weight.shape[0]
    rows = max(1, LOGITS_CHUNK_BYTES // (4 * max(v_local, 1)))
    parts = [vocab_parallel_topk(head(hidden[i:i + rows]), offset, vocab_size, k, group)
             for i in range(0, max(hidden.shape[0], 1), rows)]
    return tuple(torch.cat([p[j] for p in parts]) for j in range(3))


# ---- teacher role ----------------------------------------------------------------------------------
def pack(step: int, micro: int, indices: torch.Tensor, ids, logits, lse) -> tuple[torch.Tensor, torch.Tensor]:
    """(header int64, payload fp32 [rows, 2k+1]) of one message; ids travel as int32 bit patterns."""
    header = torch.tensor([MAGIC, step, micro, ids.shape[0], ids.shape[1], len(indices)] + indices.tolist(),
                          dtype=torch.int64)
    # the bridge is gloo over CPU tensors on every machine: move the (small) top-k signal off the device
    payload = torch.cat([logits.float(), ids.to(torch.int32).view(torch.float32), lse.float()[:, None]], 1)
    return header, payload.cpu().contiguous()


def unpack(payload: torch.Tensor, k: int):
    return payload[:, k:2 * k].contiguous().view(torch.int32).long(), payload[:, :k].contiguous(), \
        payload[:, 2 * k].contiguous()


def _fault(roles: Roles, step: int) -> None:
    """Test-only fault injection (see the module docstring)."""
    victim = int(os.environ.get("DD_FAULT_TEACHER_RANK", roles.num_teachers - 1))
    if roles.rank != victim:
        return
    if os.environ.get("DD_FAULT_TEACHER_EXIT_AT_STEP") == str(step):
        print(f"teacher rank {roles.rank}: DD_FAULT_TEACHER_EXIT_AT_STEP={step}: exiting", file=sys.stderr, flush=True)
        os._exit(17)
    if os.environ.get("DD_FAULT_TEACHER_HANG_AT_STEP") == str(step):
        print(f"teacher rank {roles.rank}: DD_FAULT_TEACHER_HANG_AT_STEP={step}: hanging", file=sys.stderr, flush=True)
        while True:
            time.sleep(3600)


def _wait(work, timeout_s: float, what: str) -> None:
    try:
        work.wait(timedelta(seconds=timeout_s))
    except RuntimeError as err:
        raise TeacherGroupError(f"{what}: {str(err).splitlines()[0][:300]}") from None


class TeacherServer:
    """The loop of one teacher rank: compute each step's signals for the group's students, send ahead."""

    def __init__(self, recipe, roles: Roles, bridge, model, offset: int, tp_group, data):
        from .train import StepSampler

        self.r, self.roles, self.bridge, self.model = recipe, roles, bridge, model
        self.offset, self.tp_group = offset, tp_group
        self.data, self.k, self.vocab = data, recipe.teacher_source.top_k, data.vocab_size
        op = recipe.optim
        self.students = roles.students_of(roles.group)
        self.samplers = {s: StepSampler(len(data.tokens), op.micro_batch_size, op.grad_accum, roles.num_students, s,
                                        recipe.seed, recipe.stages) for s in self.students}
        self.leader = roles.tp_rank == 0
        self.student_wait = startup_timeout_s(recipe)
        self.pending: deque = deque()  # (step, [works], [tensors kept alive until sent])

    def start_step(self) -> int:
        """The step every student of the group starts at (their resumed step), shared over the TP group."""
        start = torch.zeros(1, dtype=torch.int64)
        if self.leader:
            steps = []
            for s in self.students:
                msg = torch.zeros(2, dtype=torch.int64)
                _wait(self.bridge.recv([msg], self.roles.num_teachers + s, 0), self.student_wait,
                      f"teacher rank {self.roles.rank}: student rank {s} never asked for signals")
                steps.append(int(msg[1]))
            if len(set(steps)) != 1 or int(msg[0]) != MAGIC:
                raise TeacherGroupError(f"teacher group {self.roles.group}: its students start at different "
                                        f"steps {steps}")
            start[0] = steps[0]
        if self.roles.tp_size > 1:
            dist.broadcast(start, group_src=0, group=self.tp_group)
        return int(start[0])

    def compute(self, step: int) -> list[tuple[int, int, torch.Tensor, tuple]]:
        """[(student, micro, indices, (ids, logits, lse))] of step `step` for every student served."""
        items = [(s, m, idx) for s in self.students for m, idx in enumerate(self.samplers[s].step_indices(step))]
        out = []
        for s, m, idx in items:
            d = self.data
            signal = tp_teacher_topk(self.model, self.offset, d.tokens[idx], d.mask[idx], d.targets[idx], self.k,
                                     self.vocab, self.tp_group)
            out.append((s, m, idx, signal))
        return out

    def send(self, step: int, results) -> None:
        works, keep = [], []
        for s, m, idx, (ids, logits, lse) in results:
            header, payload = pack(step, m, idx, ids, logits, lse)
            dst = self.roles.num_teachers + s
            works += [self.bridge.send([header], dst, 0), self.bridge.send([payload], dst, 0)]
            keep += [header, payload]
        self.pending.append((step, works, keep))

    def drain(self, upto: int) -> None:
        """Wait until the students received every message of steps <= upto."""
        while self.pending and self.pending[0][0] <= upto:
            step, works, _ = self.pending.popleft()
            for w in works:
                _wait(w, self.student_wait, f"teacher rank {self.roles.rank}: a student stopped receiving at step "
                      f"{step + 1} (dead, or hung for {self.student_wait:.0f}s)")

    def run(self) -> None:
        r = self.r
        log = None
        if self.leader:
            Path(r.output.dir).mkdir(parents=True, exist_ok=True)
            log = open(Path(r.output.dir) / f"teacher-group{self.roles.group}.jsonl", "a")
        t0 = time.perf_counter()
        step = self.start_step()
        idle = time.perf_counter() - t0
        for step in range(step, r.optim.max_steps):
            _fault(self.roles, step + 1)  # 1-based, as in metrics.jsonl
            t0 = time.perf_counter()
            if self.leader:
                self.drain(step - r.teacher_source.prefetch_steps)
            t1 = time.perf_counter()
            results = self.compute(step)
            if self.leader:
                self.send(step, results)
            t2 = time.perf_counter()
            idle += t1 - t0
            if log:
                log.write(json.dumps({"step": step + 1, "busy_s": t2 - t1, "idle_s": idle,
                                      "rows": sum(x[3][0].shape[0] for x in results)}) + "\n")
                log.flush()
            idle = 0.0
        if self.leader:
            self.drain(r.optim.max_steps)
            log.close()


@dataclass
class TeacherData:
    tokens: torch.Tensor
    mask: torch.Tensor
    targets: torch.Tensor
    vocab_size: int


def serve(recipe, roles: Roles, bridge) -> None:
    """Teacher rank: join the teacher world, shard the teacher over its TP group, serve until max_steps."""
    from torch.distributed.device_mesh import init_device_mesh

    from .data import load_tokenized
    from .distributed import default_backend
    from .models import load_tokenizer, tokenizer_fingerprint
    from .train import get_accelerator_device

    ts = recipe.teacher_source
    backend = default_backend()
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # TP peers of a leader that waits (up to the start-up timeout) for a slow student block in a collective
    dist.init_process_group(backend, timeout=timedelta(seconds=2 * startup_timeout_s(recipe)))
    try:
        tokenizer = load_tokenizer(recipe.teacher, "teacher")
        if tokenizer_fingerprint(tokenizer) != tokenizer_fingerprint(load_tokenizer(recipe.student, "student")):
            raise UserError(f"teacher {recipe.teacher.name_or_path} and student {recipe.student.name_or_path} use "
                            "different tokenizers: token-level logit distillation is invalid across vocabularies")
        data = load_tokenized(recipe.data.train, tokenizer, recipe.data, recipe.data.max_samples)
        vocab = len(tokenizer)
        if ts.top_k > vocab:
            raise UserError(f"teacher_source.top_k={ts.top_k} exceeds the vocabulary ({vocab} tokens)")
        mesh = init_device_mesh(get_accelerator_device().split(":")[0], (ts.num_groups, ts.tp_size),
                                mesh_dim_names=("group", "tp"))
        device = torch.device(get_accelerator_device())
        model, offset = load_teacher_shards(recipe.teacher, mesh["tp"], device, ts.load_in_8bit)
        if model.config.vocab_size < vocab:
            raise UserError(f"teacher vocab_size={model.config.vocab_size} is smaller than its tokenizer's {vocab}")
        _write_shard_report(recipe, roles, model)
        teacher_data = TeacherData(data.input_ids.to(device), data.attention_mask.to(device), data.targets.to(device),
                                   vocab)
        TeacherServer(recipe, roles, bridge, model, offset, mesh["tp"].get_group(), teacher_data).run()
    except RuntimeError as err:
        if isinstance(err, TeacherGroupError) or not _is_comm_error(err):
            raise
        raise TeacherGroupError(f"teacher rank {roles.rank} (group {roles.group}): a collective with the other "
                                "teacher ranks failed: another teacher rank died or hangs. "
                                f"({str(err).splitlines()[0][:200]})") from None
    finally:
        dist.destroy_process_group()


def _write_shard_report(recipe, roles: Roles, model) -> None:
    """output.dir/teacher-shard-rank{rank}.json: parameter elements this teacher rank holds vs the model's."""
    from torch.distributed.tensor import DTensor

    local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in model.parameters())
    total = sum(p.numel() for p in model.parameters())
    out = Path(recipe.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"teacher-shard-rank{roles.rank}.json").write_text(json.dumps(
        {"rank": roles.rank, "group": roles.group, "local_elements": local, "total_elements": total}) + "\n")


def _is_comm_error(err: BaseException) -> bool:
    """A failed or timed-out collective (gloo/NCCL report these as RuntimeError or DistBackendError)."""
    text = str(err)
    return isinstance(err, dist.DistBackendError) or any(
        s in text for s in ("gloo", "NCCL", "Connection closed", "Connection reset", "Timed out"))


# ---- student side ----------------------------------------------------------------------------------
class GroupTeacher:
    """Student-side source: receives the teacher group's top-k signal for each micro-batch.

    Same contract as CacheTeacher: ``signal(indices, batch)`` gives TeacherSignal(topk=(ids int64
    [n, k], raw logits fp32 [n, k], lse fp32 [n])) for the n target tokens of the batch.
    """

    def __init__(self, roles: Roles, bridge, top_k: int, device, step_fn, timeout_s: float,
                 log_path: str | Path | None = None, startup_s: float = STARTUP_TIMEOUT_S):
        self.roles, self.bridge, self.k, self.device, self.step_fn = roles, bridge, top_k, device, step_fn
        self.timeout_s, self.startup_s = timeout_s, max(startup_s, timeout_s)
        self.student = roles.rank - roles.num_teachers
        self.leader = roles.leader_of(self.student)
        self.started, self.at = False, (-1, -1)
        self.log = open(log_path, "a") if log_path else None

    def _recv(self, tensor: torch.Tensor, step: int, micro: int) -> None:
        try:
            self.bridge.recv([tensor], self.leader, 0).wait(timedelta(seconds=self.timeout_s))
        except RuntimeError as err:
            raise TeacherGroupError(
                f"teacher group: student rank {self.student} got no signal from teacher rank {self.leader} "
                f"(group {self.leader // self.roles.tp_size}) for step {step + 1}, micro-batch {micro} within "
                f"teacher_source.timeout_s={self.timeout_s:g}s: a teacher rank died or hangs; see the teacher "
                f"ranks' log. ({str(err).splitlines()[0][:200]})") from None

    def signal(self, indices: torch.Tensor, batch: dict) -> TeacherSignal:
        step = self.step_fn()
        if not self.started:
            hello = torch.tensor([MAGIC, step], dtype=torch.int64)
            _wait(self.bridge.send([hello], self.leader, 0), self.startup_s,
                  f"teacher group: student rank {self.student} could not reach teacher rank {self.leader}")
            self.started = True
        micro = self.at[1] + 1 if self.at[0] == step else 0
        self.at = (step, micro)
        t0 = time.perf_counter()
        header = torch.zeros(HEADER + len(indices), dtype=torch.int64)
        self._recv(header, step, micro)
        magic, h_step, h_micro, rows, k, mb = header[:HEADER].tolist()
        got = header[HEADER:HEADER + mb]
        same = magic == MAGIC and (h_step, h_micro) == (step, micro) and mb == len(indices)
        if not (same and torch.equal(got, indices.cpu())):
            raise TeacherGroupError(
                f"teacher group: student rank {self.student} expected step {step + 1}, micro-batch {micro}, samples "
                f"{indices.tolist()} but teacher rank {self.leader} sent step {h_step + 1}, micro-batch {h_micro}, "
                f"samples "
                f"{got.tolist()}: teacher and student disagree on the data order (same recipe, seed, data and "
                "launch shape on both roles?)")
        mask = batch["targets"].cpu() != IGNORE_INDEX
        if rows != int(mask.sum()) or k < self.k:
            raise TeacherGroupError(f"teacher group: got {rows} rows x top-{k} for a batch with {int(mask.sum())} "
                                    f"target tokens and teacher_source.top_k={self.k}")
        payload = torch.empty(rows, 2 * k + 1, dtype=torch.float32)
        self._recv(payload, step, micro)
        wait = time.perf_counter() - t0
        if self.log:
            self.log.write(json.dumps({"step": step + 1, "micro": micro, "wait_s": wait}) + "\n")
            self.log.flush()
        ids, logits, lse = unpack(payload, k)
        return TeacherSignal(topk=(ids[:, :self.k].to(self.device), logits[:, :self.k].to(self.device),
                                   lse.to(self.device)))


def group_teacher(recipe, device, step_fn) -> GroupTeacher:
    """The student's GroupTeacher over the bridge that :func:`split_world` built."""
    roles, pg = bridge()
    out = Path(recipe.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    student = roles.rank - roles.num_teachers
    return GroupTeacher(roles, pg, recipe.teacher_source.top_k, device, step_fn, recipe.teacher_source.timeout_s,
                        out / f"teacher-wait-rank{student}.jsonl", startup_timeout_s(recipe))

"""The life cycle of one training run, top to bottom:

    setup -> [load_checkpoint] -> train (train_step ... , save_checkpoint every save_every) ->
    save_checkpoint -> export -> cleanup

The trainer orchestrates; the pieces live elsewhere: the loss in dist_distill.objective, the
teacher signal in dist_distill.teacher, the sample order in dist_distill.data.sampler, the
checkpoint protocol in training.checkpoint, metrics files in training.metrics_log and the
fault-injection seam in training.faults (one object, ``self.faults``, asked at fixed points).

Outputs under ``output.dir``: recipe.yaml (the resolved recipe), metrics.jsonl, tensorboard/,
checkpoints/step-N/ (DeepSpeed + ours), model/ (HF safetensors), partition-rank<r>.json.
"""

from __future__ import annotations

import json
import random
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch

from dist_distill.errors import UserError
from dist_distill.recipe import Recipe
from dist_distill.training import checkpoint
from dist_distill.training.faults import FaultPlan
from dist_distill.training.input_trace import InputTrace
from dist_distill.training.preemption import Preempted, PreemptionGuard, write_requeue_file


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Trainer:
    """Owns the engine, data, teacher signal and outputs of one training run."""

    def __init__(self, recipe: Recipe, exit_duration_s: float | None = None):
        self.recipe = recipe
        self.exit_duration_s = exit_duration_s  # wall-clock budget of this process (training.preemption)
        self.saved_step = None  # step of this process's newest checkpoint
        self.out = Path(recipe.output.dir)
        self.step = 0
        self.skips = None
        self.log = None
        self.packing = False  # data.packing, set in setup (_log_batching)
        self.trace = InputTrace(0)  # replaced in setup with this rank's

    # ---- setup -------------------------------------------------------------------------------
    def setup(self) -> None:
        """Process group, this rank's device, data, teacher source, the DeepSpeed engine, logs."""
        import deepspeed

        from dist_distill.data.batching import build_sampler
        from dist_distill.data.records import load_tokenized
        from dist_distill.models.loading import load_tokenizer
        from dist_distill.teacher.sources import build_teacher_source
        from dist_distill.training.distributed import default_backend, local_device
        from dist_distill.training.nonfinite import SkipGuard

        r = self.recipe
        self.device = local_device()  # before anything is placed (DeepSpeed's init does not set it)
        backend = default_backend() if r.deepspeed.dist_backend == "auto" else r.deepspeed.dist_backend
        deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=r.deepspeed.startup_timeout_s))
        self.rank, self.world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        self.faults = FaultPlan.from_env(self.rank)
        self.trace = InputTrace(self.rank)  # DD_INPUT_TRACE: what the loss was given (tests)
        self.preemption = PreemptionGuard(self.exit_duration_s)  # SIGUSR1/SIGTERM only set a flag
        seed_everything(r.seed + self.rank)
        self.tokenizer = load_tokenizer(r.student, "student")
        self.data = load_tokenized(r.data.train, self.tokenizer, r.data, r.data.max_samples)
        # by difficulty bucket (grading.weights, stages[i].buckets: grades checked here, before the engine is
        # built), packed rows, length-grouped or uniformly (data/batching.py)
        self.sampler = build_sampler(r, self.data, self.world, self.rank)
        self.teacher = build_teacher_source(r, self.tokenizer, self.data, self.device, lambda: self.step)
        self.engine = self._build_engine()
        self._log_batching()
        self.replay = self._replay_schedule() if r.data.replay is not None else None
        from dist_distill.data.pipeline import InputPipeline
        from dist_distill.teacher.cache.reader import CacheTeacher
        from dist_distill.teacher.group.client import GroupTeacher

        # store reads, cache decoding and (unpacked batches) a teacher group's receives one step ahead in a
        # thread, never past max_steps (the group serves no further); a colocated teacher stays here
        group = isinstance(self.teacher, GroupTeacher) and not r.data.packing
        self.inputs = InputPipeline(self._step_inputs, r.data.prefetch and (
            self.teacher is None or group or isinstance(self.teacher, CacheTeacher)), stop=r.optim.max_steps)
        # the worker's own cache reader (its shard handles are not shared with evaluation in this thread); a
        # group teacher is the worker's alone (periodic evaluation never asks a group)
        self._input_teacher = None
        if self.inputs.background and self.teacher is not None:
            self._input_teacher = self.teacher if group else self.teacher.for_thread()
        self.skips = SkipGuard(self.engine, r.optim.max_consecutive_skips, self.rank)
        self.out.mkdir(parents=True, exist_ok=True)
        self._write_partition_report()
        if self.rank == 0:
            from dist_distill.training.metrics_log import MetricsLog

            r.save(self.out / "recipe.yaml")
            self.log = MetricsLog(self.out, r.output.log_every, r.optim.max_steps)
        from dist_distill.training.periodic_eval import build_periodic_eval

        self.evaluator = build_periodic_eval(self)  # None unless output.eval_every > 0

    def _log_batching(self) -> None:
        """Say how micro-batches are formed and, under packing, how each model keeps the documents apart;
        refuse a colocated teacher whose packed layout cannot be compared with the student's."""
        from dist_distill.data.packing import attention_path
        from dist_distill.teacher.colocated import ColocatedTeacher

        d = self.recipe.data
        self.packing = d.packing
        self.student_attn = self.engine.module.student.config._attn_implementation
        lines = []
        if d.packing:
            from dist_distill.data.packing import PACKED_ATTENTION

            attns = {"student": self.student_attn}
            if isinstance(self.teacher, ColocatedTeacher):
                attns["colocated teacher"] = self.teacher.attn_implementation
            for who, attn in attns.items():
                if attn not in PACKED_ATTENTION:
                    raise UserError(f"data.packing=true: the {who} runs attn_implementation={attn!r}; packed batches "
                                    f"support {', '.join(PACKED_ATTENTION)}")
            lines.append(f"batching: packed rows of {d.max_seq_len} tokens, {self.recipe.optim.micro_batch_size} "
                         f"rows per micro-batch; student {attention_path(self.student_attn)}")
            if isinstance(self.teacher, ColocatedTeacher):
                t_attn = self.teacher.attn_implementation
                lines.append(f"batching: colocated teacher {attention_path(t_attn)}")
                flat = (self.student_attn == "flash_attention_2", t_attn == "flash_attention_2")
                if self.recipe.uses_term("hidden") and flat[0] != flat[1]:
                    raise UserError(f"data.packing=true with the hidden term: the student runs {self.student_attn} "
                                    f"and the teacher {t_attn}, so their packed hidden states have different layouts "
                                    "([1, B*L] under flash_attention_2, [B, L] otherwise); give student and teacher "
                                    "the same attn_implementation")
        elif d.group_by_length:
            lines.append(f"batching: length-grouped (mega-batches of data.length_group_steps={d.length_group_steps} "
                         "steps sorted by length), each micro-batch padded to its longest record")
        if self.rank == 0:
            for line in lines:
                print(line, flush=True)

    def _replay_schedule(self):
        """The replay store (data.replay, built through the token store like data.train) and its schedule."""
        from dist_distill.data.records import load_tokenized
        from dist_distill.data.replay import ReplaySchedule, replay_data_spec, replay_rate

        r = self.recipe
        spec = replay_data_spec(r.data)
        self.replay_data = load_tokenized(r.data.replay.path, self.tokenizer, spec, spec.max_samples)
        rate = replay_rate(r.data.replay, self.world, r.optim.grad_accum, r.optim.micro_batch_size)
        return ReplaySchedule(len(self.replay_data), rate, self.world, self.rank, r.optim.micro_batch_size, r.seed)

    def _build_engine(self):
        """The student inside a DistillationModule under DeepSpeed; with ZeRO-3 it is built inside
        zero.Init (transformers does so while an HfDeepSpeedConfig is alive), never whole on a rank."""
        import deepspeed
        from transformers.integrations import HfDeepSpeedConfig

        from dist_distill.models.loading import enable_activation_checkpointing, load_model
        from dist_distill.objective.module import DistillationModule
        from dist_distill.teacher.colocated import ColocatedTeacher
        from dist_distill.training.deepspeed_config import deepspeed_config

        r = self.recipe
        self.ds_config = deepspeed_config(r, self.world)
        self._hf_ds = HfDeepSpeedConfig(self.ds_config)  # must stay alive: from_pretrained then uses zero.Init
        model = load_model(r.student, "student")
        if r.optim.gradient_checkpointing:
            enable_activation_checkpointing(model)
        vocab = len(self.tokenizer)
        if model.config.vocab_size < vocab:
            raise UserError(f"student vocab_size={model.config.vocab_size} is smaller than its tokenizer's {vocab}")
        teacher_config = self.teacher.model.config if isinstance(self.teacher, ColocatedTeacher) else None
        module = DistillationModule(model, r.loss, vocab, r.intermediate, teacher_config,
                                    uses_hidden=r.uses_term("hidden"), uses_attention=r.uses_term("attention"))
        engine, *_ = deepspeed.initialize(model=module, model_parameters=module.parameters(), config=self.ds_config,
                                          lr_scheduler=self._scheduler)
        if r.deepspeed.zero_stage == 3:
            engine.module.register_external_parameters()
        return engine

    def _scheduler(self, optimizer):
        from transformers import get_cosine_with_min_lr_schedule_with_warmup

        op = self.recipe.optim
        return get_cosine_with_min_lr_schedule_with_warmup(optimizer, op.warmup_steps, op.max_steps,
                                                           min_lr_rate=op.min_lr_ratio)

    def _write_partition_report(self) -> None:
        """output.dir/partition-rank<r>.json: parameter elements this rank holds vs the model's total.

        Under ZeRO-3 a parameter's `ds_tensor` is the rank's partition and `ds_numel` its full size.
        """
        params = list(self.engine.module.parameters())
        local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
        total = sum(getattr(p, "ds_numel", p.numel()) for p in params)
        report = {"rank": self.rank, "world_size": self.world, "zero_stage": self.recipe.deepspeed.zero_stage,
                  "local_elements": local, "total_elements": total, "num_parameters": len(params)}
        (self.out / f"partition-rank{self.rank}.json").write_text(json.dumps(report) + "\n")

    # ---- checkpoints -------------------------------------------------------------------------
    def trainer_state(self) -> dict:
        """What the trainer needs besides the engine to continue exactly: the step (the data, cache
        and stage positions are pure functions of it) and the skip counters."""
        return {"step": self.step, **self.skips.state(), "samples_seen": self._records_before(self.step),
                "replay_samples_seen": self.replay.due(self.step) if self.replay is not None else 0}

    def _records_before(self, step: int) -> int:
        if hasattr(self.sampler, "records_before"):
            return self.sampler.records_before(step)
        op = self.recipe.optim
        return step * self.world * op.grad_accum * op.micro_batch_size

    def save_checkpoint(self) -> None:
        """Write and commit checkpoints/step-<step> on every rank (training.checkpoint.save_checkpoint)."""
        self.saved_step = self.step
        checkpoint.save_checkpoint(self.engine, self.out / "checkpoints", self.step, self.rank, self.world,
                                   self.trainer_state(), self.recipe, self.recipe.output.keep_last, self.device,
                                   on_written=self.faults.in_save)

    def load_checkpoint(self) -> bool:
        """Resume from the newest committed checkpoint (one decision of all ranks); True when resumed."""
        state = checkpoint.load_checkpoint(self.engine, self.out / "checkpoints", self.rank, self.device,
                                           self.recipe.deepspeed.load_pickled_checkpoints)
        if state is None:
            return False
        self.step = state["step"]
        self.skips.restore(state)
        if self.log is not None:
            self.log.truncate(self.step)
        return True

    # ---- training ----------------------------------------------------------------------------
    def step_settings(self, step_tokens: float):
        """Term weights and temperature at the current step (pure functions of the step: resumable)."""
        from dist_distill.objective.module import StepSettings
        from dist_distill.objective.schedules import Ramp, stage_at

        r, step = self.recipe, self.step
        weights = stage_at(step, r.stages)[1].weights() if r.stages else r.weights.weights_at(step, r.optim.max_steps)
        temperature = Ramp(r.loss.temperature, r.loss.temperature_end, r.loss.temperature_shape).at(step, r.optim.max_steps)
        return StepSettings(weights=weights, temperature=temperature,
                            l2_scale=step_tokens / (self.world * r.optim.grad_accum))

    def _step_inputs(self, step: int) -> tuple:
        """(micro-batch plans, CPU batches (pinned on CUDA), float64 [6] local counts, cache signals or None,
        replay micro-batches) of optimizer step `step`: no engine, no collective (data.pipeline may run it in a
        thread). counts: main target tokens, main tokens, replay target tokens, replay tokens, replay samples,
        main token slots (padding included). Signals: a cache's, or a teacher group's received here (its
        own bridge group, not the engine's). A plan is the micro-batch's sample ids (int64 [micro_batch]) or,
        packed (data.packing), its PackedBatch, whose CPU batch holds input_ids, position_ids, targets and doc,
        int64 [B, L]. Replay micro-batches: [(batch, real)]; real=False is a filler row (weight 0)."""
        from dist_distill.data.batching import micro_batch_rows
        from dist_distill.data.packing import pack_rows

        d, pin = self.data, self.device.type == "cuda"
        if self.packing:
            micro = [pack_rows(d, *micro_batch_rows(rows), self.recipe.data.max_seq_len)
                     for rows in self.sampler.step_rows(step)]
            batches = [{k: (t.pin_memory() if pin else t) for k, t in (("input_ids", p.input_ids),
                        ("position_ids", p.position_ids), ("targets", p.targets), ("doc", p.doc))} for p in micro]
            real_tokens = sum(int((b["doc"] >= 0).sum()) for b in batches)
        else:
            micro = self.sampler.step_indices(step)
            # data.group_by_length: each micro-batch padded to its longest record only
            batches = [self._batch(d, i, trim=self.recipe.data.group_by_length) for i in micro]
            real_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
        replay = []
        if self.replay is not None:  # data/replay.py: the same number of replay micro-batches on every rank
            for i in self.replay.step_indices(step):
                real = len(i) > 0
                replay.append((self._batch(self.replay_data, i if real else
                                           torch.tensor([self.replay.sample(self.replay.due(step))])), real))
        real_replay = [b for b, real in replay if real]
        counts = torch.tensor([sum(int((b["targets"] != -100).sum()) for b in batches), real_tokens,
                               sum(int((b["targets"] != -100).sum()) for b in real_replay),
                               sum(int(b["attention_mask"].sum()) for b in real_replay),
                               sum(len(b["targets"]) for b in real_replay),
                               sum(b["targets"].numel() for b in batches)], dtype=torch.float64)
        from dist_distill.teacher.group.client import GroupTeacher

        signals, teacher = None, self._input_teacher
        if isinstance(teacher, GroupTeacher):  # the step being prepared, not the trainer's current one
            signals = [teacher.signal(p, b, step) for p, b in zip(micro, batches)]
        elif teacher is not None:
            signals = [teacher.packed_signal(p) if self.packing else teacher.signal(p, b)
                       for p, b in zip(micro, batches)]
        return micro, batches, counts, signals, replay

    def _batch(self, data, indices: torch.Tensor, trim: bool = False) -> dict:
        """input_ids, attention_mask, targets int64 [B, L] of samples `indices` (pinned on CUDA); `trim`: L is
        the batch's longest sample instead of data.max_seq_len."""
        pin = self.device.type == "cuda"
        batch = {"input_ids": data.input_ids[indices], "attention_mask": data.attention_mask[indices],
                 "targets": data.targets[indices]}
        if trim:
            width = max(int(batch["attention_mask"].sum(1).max()), 1)
            batch = {k: t[:, :width] for k, t in batch.items()}
        return {k: (t.pin_memory() if pin else t) for k, t in batch.items()}

    def _teacher_signal(self, plan, batch: dict):
        """The teacher signal of one micro-batch (in the training thread: group and colocated sources, or a cache
        with the pipeline off). `batch` is on the device; packed batches still hold `doc`."""
        from dist_distill.data.packing import packed_model_inputs
        from dist_distill.teacher.cache.reader import CacheTeacher

        if self.teacher is None:
            return None
        if not self.packing:
            return self.teacher.signal(plan, batch)
        if isinstance(self.teacher, CacheTeacher):
            return self.teacher.packed_signal(plan)
        return self.teacher.signal(plan.samples, packed_model_inputs(
            batch["input_ids"], batch["position_ids"], batch["doc"], batch["targets"], self.teacher.attn_implementation,
            self.teacher.model.dtype))

    def train_step(self) -> dict:
        """One optimizer step over grad_accum micro-batches; returns step metrics (global, normalised)."""
        micro, cpu_batches, counts, signals, replay = self.inputs.get(self.step)
        counts = counts.to(self.device)
        torch.distributed.all_reduce(counts)
        n_targets = max(counts[0].item(), 1.0)
        settings = self.step_settings(n_targets)
        sums = torch.zeros(6, dtype=torch.float64, device=self.device)
        self.faults.at_step_start(self.step + 1)
        bad = torch.zeros(1, device=self.device)
        last = len(micro) + len(replay) - 1  # the same on every rank (replay: data/replay.py)
        for m, plan in enumerate(micro):
            batch = {k: t.to(self.device, non_blocking=True) for k, t in cpu_batches[m].items()}
            teacher = signals[m] if signals is not None else self._teacher_signal(plan, batch)
            self.trace.record(self.step + 1, m, plan, cpu_batches[m], teacher)
            if self.packing:  # the student's layout for its attention implementation, the block mask on the device
                from dist_distill.data.packing import packed_model_inputs

                batch = packed_model_inputs(batch["input_ids"], batch["position_ids"], batch["doc"], batch["targets"],
                                            self.student_attn, self.engine.module.student.dtype)
            loss_sum, parts = self._micro_step(batch, teacher, settings, 1.0, m == last, bad, n_targets)
            sums[:5] += torch.stack([loss_sum] + [parts[k] for k in ("div", "ce", "hidden", "attention")]).double()
        if replay:
            from dist_distill.objective.module import replay_settings

            # replay rows: CE only (no teacher is asked), weighted against the step's MAIN target tokens
            for m, (cpu_batch, real) in enumerate(replay, len(micro)):
                batch = {k: t.to(self.device, non_blocking=True) for k, t in cpu_batch.items()}
                weight = self.recipe.data.replay.weight if real else 0.0  # a filler row only keeps ranks in step
                loss_sum, _ = self._micro_step(batch, None, replay_settings(settings), weight, m == last, bad, n_targets)
                sums[5] += loss_sum.double() if real else 0.0
        torch.distributed.all_reduce(sums)
        skipped = self.skips.account(bad.item() > 0, self.step + 1)
        self.step += 1
        grad_norm = self.engine.get_global_grad_norm()
        mean = (sums[:5] / n_targets).tolist()
        replay_metrics = {"replay_samples": int(counts[4].item()), "replay_tokens": int(counts[2].item()),
                          "replay_samples_total": self.replay.due(self.step)} if self.replay is not None else {}
        if counts[2].item() > 0:  # mean CE per replay target token, on steps that carry replay rows
            replay_metrics["replay_ce"] = sums[5].item() / counts[2].item()
        return {"step": self.step, "loss": mean[0], "divergence": mean[1], "ce": mean[2], "hidden": mean[3],
                "attention": mean[4], "lr": self.engine.get_lr()[0], "temperature": settings.temperature,
                **{f"weight_{k}": v for k, v in settings.weights.items()},
                "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                "target_tokens": int(counts[0].item()), "tokens": int(counts[1].item()),
                "padding_fraction": 1.0 - counts[1].item() / max(counts[5].item(), 1.0),  # of the main token slots run
                "skipped": skipped, "skipped_total": self.skips.total,
                "input_wait_s": self.inputs.wait_s,  # cumulative time this rank waited for its inputs
                "bad_rows_dropped": sum(v for k, v in self.data.bad_rows.items() if k != "truncated"),
                "rows_truncated": self.data.bad_rows.get("truncated", 0), **replay_metrics}

    def _micro_step(self, batch: dict, teacher, settings, weight: float, last: bool, bad: torch.Tensor,
                    n_targets: float) -> tuple[torch.Tensor, dict]:
        """Forward and backward of one micro-batch; the optimizer steps after the `last` one of the step
        (explicit boundaries: a step may carry replay micro-batches beyond grad_accum). Returns the detached
        loss sum and parts."""
        self.engine.set_gradient_accumulation_boundary(last)
        loss_sum, parts = self.engine(**batch, teacher=teacher, step=settings)
        loss_sum = self.faults.poison_loss(self.step + 1, loss_sum)
        bad += (~torch.isfinite(loss_sum.detach())).float()
        if last:
            # one rank's non-finite loss must skip the step on all: poison every rank's last
            # micro-batch so the engine's global gradient norm is non-finite and its step is skipped
            torch.distributed.all_reduce(bad)
            if bad.item() > 0:
                loss_sum = loss_sum * float("nan")
        # ZeRO averages gradients over ranks; scaling by world / N makes the step's gradient
        # d(sum over all target tokens of all ranks and micro-batches)/d(theta) / N (N: main target tokens).
        self.engine.backward(loss_sum * (weight * self.world / n_targets), scale_wrt_gas=False)
        self.engine.step()
        return loss_sum.detach(), parts

    def train(self) -> None:
        """Steps until optim.max_steps, a checkpoint every output.save_every steps and one at the end."""
        from tqdm import tqdm

        r = self.recipe
        bar = tqdm(total=r.optim.max_steps, initial=self.step, desc="train", disable=self.rank != 0,
                   dynamic_ncols=True)
        started, tokens, steps_here = time.time(), 0, 0
        while self.step < r.optim.max_steps:
            record = self.train_step()
            steps_here += 1
            tokens += record["tokens"]
            record["tokens_per_s"] = tokens / max(time.time() - started, 1e-9)
            if steps_here == 1:  # the first step of this process, resumed or not
                self._tighten_timeout()
            if self.log is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
                self.log.write(record)
            if r.output.save_every and self.step % r.output.save_every == 0 and self.step < r.optim.max_steps:
                self.save_checkpoint()
            if self.evaluator is not None:  # held-out metrics and the best checkpoint (training.periodic_eval)
                self.evaluator.after_step(self)
            reason = self.preemption.should_stop(self.device)  # every rank, every step: one agreement
            if reason is not None and self.step < r.optim.max_steps:
                bar.close()
                if self.saved_step != self.step:  # not already saved at this step (save_every, best-checkpoint eval)
                    self.save_checkpoint()
                write_requeue_file(self.step, reason)
                raise Preempted(self.step, reason)
        bar.close()
        self.save_checkpoint()

    def _tighten_timeout(self) -> None:
        """After this process's first step (a resumed run's too), collectives get deepspeed.timeout_s
        instead of the start-up timeout."""
        from torch.distributed.distributed_c10d import _set_pg_timeout

        _set_pg_timeout(timedelta(seconds=self.recipe.deepspeed.timeout_s))
        if self.rank == 0:
            print(f"collective timeout: deepspeed.timeout_s={self.recipe.deepspeed.timeout_s:g}s from step {self.step} "
                  f"on (start-up: {self.recipe.deepspeed.startup_timeout_s:g}s)", flush=True)

    # ---- export and cleanup ------------------------------------------------------------------
    def export(self) -> Path:
        """Gather the ZeRO-3 partitions and write the student as an HF directory (safetensors) at output.dir/model."""
        from dist_distill.models.export import quantize_8bit, student_state, write_hf_model

        state = self.engine._zero3_consolidated_16bit_state_dict() if self.recipe.deepspeed.zero_stage == 3 \
            else self.engine.module.state_dict()
        target = self.out / "model"
        if self.rank == 0:
            write_hf_model(self.engine.module.student, student_state(state), self.tokenizer, target, self.recipe)
            if self.recipe.output.export_8bit:
                report = quantize_8bit(target, self.out / "model-8bit")
                print(f"8-bit student exported to {self.out / 'model-8bit'}: "
                      f"{report['footprint_ratio']:.1%} of the full-precision memory")
        torch.distributed.barrier()
        return target

    def cleanup(self) -> None:
        """Close the logs; then every rank leaves the process group together (a group torn down by
        interpreter exit while a peer is already gone can abort the process from gloo's threads)."""
        if self.log is not None:
            self.log.close()
        if getattr(self, "inputs", None) is not None:
            self.inputs.close()
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


def is_communication_failure(err: RuntimeError) -> bool:
    """A collective failed because a peer died, hung or closed its connection (gloo raises plain RuntimeError)."""
    if isinstance(err, torch.distributed.DistError):
        return True
    text = str(err)
    return any(s in text for s in ("gloo/transport", "Connection reset by peer", "Connection closed by peer",
                                   "NCCL", "Timed out waiting", "ProcessGroup", "Broken pipe"))

"""Train a student under DeepSpeed (ZeRO-3 by default) from a recipe.

Launch with torchrun or the deepspeed launcher, e.g.::

    torchrun --nproc_per_node 2 -m dist_distill.train configs/tiny/distill.yaml
    deepspeed --num_gpus 8 -m dist_distill.train configs/r1_to_qwen1.5b.yaml --set optim.lr=3e-5

Life cycle (one readable path): setup -> [load_checkpoint] -> train -> save_checkpoint ->
export -> cleanup. Outputs under ``output.dir``: recipe.yaml (the resolved recipe),
metrics.jsonl, tensorboard/, checkpoints/step-N/ (DeepSpeed), model/ (HF safetensors).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch

from .checkpoint import tag_for
from .errors import UserError, run_cli
from .recipe import Recipe, describe_recipe, load_recipe


def deepspeed_config(recipe: Recipe, world_size: int) -> dict:
    """The DeepSpeed JSON generated from the recipe, with `deepspeed.config` keys merged on top."""
    op, ds = recipe.optim, recipe.deepspeed
    precision = ds.precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    config = {
        "train_micro_batch_size_per_gpu": op.micro_batch_size,
        "gradient_accumulation_steps": op.grad_accum,
        "train_batch_size": op.micro_batch_size * op.grad_accum * world_size,
        "gradient_clipping": op.grad_clip,
        "zero_optimization": {"stage": ds.zero_stage, "stage3_gather_16bit_weights_on_model_save": True},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "optimizer": {"type": "AdamW", "params": {"lr": op.lr, "betas": list(op.betas), "eps": 1e-8,
                                                  "weight_decay": op.weight_decay, "torch_adam": True}},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if ds.config:
        path = Path(ds.config)
        if not path.is_file():
            raise UserError(f"deepspeed.config={ds.config}: no such DeepSpeed JSON file")
        _deep_update(config, json.loads(path.read_text()))
    return config


def _deep_update(base: dict, extra: dict) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_update(base[key], value)
        else:
            base[key] = value


class StepSampler:
    """Which samples each rank reads at each optimizer step; a pure function of (seed, step).

    Samples are drawn from an endless stream of per-epoch permutations of a pool. Step s
    consumes pool slots [s*G, (s+1)*G), G = world * grad_accum * micro_batch; slot
    (m * world + r) * micro_batch + j goes to rank r, micro-batch m. The same step therefore
    covers the same samples whatever the split into ranks and micro-batches, and resuming
    at step s needs nothing but s. With progressive stages, stage i's pool is the first
    ceil(fraction * N) samples of one fixed shuffled order, and its stream starts at its first step.
    """

    def __init__(self, num_samples: int, micro_batch: int, grad_accum: int, world: int, rank: int, seed: int,
                 stages: list | None = None):
        self.n, self.mb, self.ga, self.world, self.rank, self.seed = num_samples, micro_batch, grad_accum, world, rank, seed
        self.stages = stages or []
        self.order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed - 1)) \
            if self.stages else torch.arange(num_samples)
        self._perms: dict[tuple[int, int], torch.Tensor] = {}

    def _pool(self, step: int) -> tuple[int, torch.Tensor, int]:
        """(stream key, pool of sample ids, step within the stream)."""
        if not self.stages:
            return 0, self.order, step
        from .schedules import stage_at, stage_sample_limit

        index, stage, step_in_stage = stage_at(step, self.stages)
        return index, self.order[:stage_sample_limit(stage, self.n)], step_in_stage

    def _sample(self, key: int, pool: torch.Tensor, position: int) -> int:
        epoch = position // len(pool)
        if (key, epoch) not in self._perms:
            seed = self.seed + 1_000_003 * key + epoch
            self._perms = {(key, epoch): torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))}
        return int(pool[self._perms[(key, epoch)][position % len(pool)]])

    def step_indices(self, step: int) -> list[torch.Tensor]:
        """Sample indices of this rank's micro-batches at optimizer step `step`: grad_accum x int64 [micro_batch]."""
        key, pool, local_step = self._pool(step)
        base = local_step * self.world * self.ga * self.mb
        return [torch.tensor([self._sample(key, pool, base + (m * self.world + self.rank) * self.mb + j)
                              for j in range(self.mb)]) for m in range(self.ga)]


def get_accelerator_device() -> str:
    """This rank's device: cuda:<local rank> with CUDA, else cpu."""
    if torch.cuda.is_available():
        return f"cuda:{torch.cuda.current_device()}"
    return "cpu"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Trainer:
    """Owns the engine, data, teacher signal and outputs of one training run."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.out = Path(recipe.output.dir)
        self.step = 0
        self.skipped_steps = self.consecutive_skips = self._engine_skips = 0

    # ---- setup -------------------------------------------------------------------------------
    def setup(self) -> None:
        import deepspeed

        from .data import load_tokenized
        from .distill_module import DistillationModule
        from .distributed import default_backend
        from .models import load_model, load_tokenizer
        from .teacher import ColocatedTeacher

        r = self.recipe
        backend = default_backend() if r.deepspeed.dist_backend == "auto" else r.deepspeed.dist_backend
        deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=r.deepspeed.startup_timeout_s))
        self.rank, self.world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        seed_everything(r.seed + self.rank)
        self.tokenizer = load_tokenizer(r.student, "student")
        self.vocab_size = len(self.tokenizer)
        self.data = load_tokenized(r.data.train, self.tokenizer, r.data, r.data.max_samples)
        self.teacher = self._teacher_source()
        self.ds_config = deepspeed_config(r, self.world)
        from transformers.integrations import HfDeepSpeedConfig

        self._hf_ds = HfDeepSpeedConfig(self.ds_config)  # must stay alive: from_pretrained then uses zero.Init
        model = load_model(r.student, "student")
        if model.config.vocab_size < self.vocab_size:
            raise UserError(f"student vocab_size={model.config.vocab_size} is smaller than its tokenizer's {self.vocab_size}")
        teacher_config = self.teacher.model.config if isinstance(self.teacher, ColocatedTeacher) else None
        module = DistillationModule(model, r.loss, self.vocab_size, r.intermediate, teacher_config,
                                    uses_hidden=r.uses_term("hidden"), uses_attention=r.uses_term("attention"))
        self.engine, *_ = deepspeed.initialize(model=module, model_parameters=module.parameters(),
                                               config=self.ds_config, lr_scheduler=self._scheduler)
        if r.deepspeed.zero_stage == 3:
            self.engine.module.register_external_parameters()
        self.sampler = StepSampler(len(self.data), r.optim.micro_batch_size, r.optim.grad_accum, self.world,
                                   self.rank, r.seed, r.stages)
        self.out.mkdir(parents=True, exist_ok=True)
        self._write_partition_report()
        if self.rank == 0:
            r.save(self.out / "recipe.yaml")
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.out / "tensorboard"))
            self.metrics = open(self.out / "metrics.jsonl", "a")

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

    def _teacher_source(self):
        """The recipe's teacher source (None for hard labels only); built before ZeRO-3's model init
        so that a colocated teacher is an ordinary replicated module."""
        from .cache import TeacherCache
        from .models import load_tokenizer, tokenizer_fingerprint
        from .teacher import CacheTeacher, ColocatedTeacher, load_colocated_teacher

        r = self.recipe
        device = torch.device(get_accelerator_device())
        if r.teacher_source.kind == "cache":
            cache = TeacherCache(r.teacher_source.cache_dir)
            cache.check_matches({"tokenizer_sha256": tokenizer_fingerprint(self.tokenizer), "seq_len": r.data.max_seq_len,
                                 "vocab_size": self.vocab_size, "dataset": {"token_ids_sha256": self.data.fingerprint,
                                             "targets_sha256": self.data.targets_fingerprint},
                                 "k": r.teacher_source.top_k})
            return CacheTeacher(cache, r.teacher_source.top_k, device)
        if r.teacher_source.kind == "group":  # a tensor-parallel teacher group in this job (teacher_group.py)
            from .teacher_group import group_teacher

            return group_teacher(r, device, lambda: self.step)
        if r.teacher_source.kind == "colocated":
            if tokenizer_fingerprint(load_tokenizer(r.teacher, "teacher")) != tokenizer_fingerprint(self.tokenizer):
                raise UserError(f"teacher {r.teacher.name_or_path} and student {r.student.name_or_path} use different "
                                "tokenizers: token-level logit distillation is invalid across vocabularies")
            return ColocatedTeacher(load_colocated_teacher(r.teacher, device, r.teacher_source.load_in_8bit),
                                    need_layers=r.uses_term("hidden"), need_attentions=r.uses_term("attention"))
        return None

    def _scheduler(self, optimizer):
        from transformers import get_cosine_with_min_lr_schedule_with_warmup

        op = self.recipe.optim
        return get_cosine_with_min_lr_schedule_with_warmup(optimizer, op.warmup_steps, op.max_steps,
                                                           min_lr_rate=op.min_lr_ratio)

    # ---- checkpoints -------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        """Write and commit a checkpoint of this step (see dist_distill.checkpoint for the protocol).

        A rank that cannot write (disk full, quota) makes every rank stop with an error that
        names the failure; the partial directory is removed and earlier checkpoints are untouched.
        """
        from .checkpoint import commit, fsync_tree, latest_committed, prune, rng_state, write_atomic
        from .faults import maybe_kill_in_save

        root = self.out / "checkpoints"
        directory = root / tag_for(self.step)
        self._check_disk_space(root)
        error = None
        try:
            self.engine.save_checkpoint(str(root), tag=tag_for(self.step), client_state={"step": self.step})
            write_atomic(directory / f"rng-rank{self.rank}.json", json.dumps(rng_state()))
            if self.rank == 0:
                write_atomic(directory / "trainer.json", json.dumps(self.trainer_state(), indent=2))
                self.recipe.save(directory / "recipe.yaml")
            fsync_tree(directory)
        except (OSError, RuntimeError) as err:
            error = err
        failed = torch.tensor([float(error is not None)])
        torch.distributed.all_reduce(failed)
        if failed.item() > 0:
            if self.rank == 0:
                prune(root)
            previous = latest_committed(root)
            where = f"the previous checkpoint {previous[1]} is intact" if previous else "no earlier checkpoint exists"
            raise UserError(f"checkpoint {directory} could not be written on {int(failed.item())} rank(s)"
                            f"{f' (here: {error})' if error else ''}; it was removed and {where}. "
                            "Free disk space (or raise the quota) and resume with --resume")
        maybe_kill_in_save(self.rank, self.step)
        if self.rank == 0:
            commit(directory, {"step": self.step, "world_size": self.world})
            prune(root, self.recipe.output.keep_last)
        torch.distributed.barrier()

    def _check_disk_space(self, root: Path) -> None:
        """Refuse a save that cannot fit, before anything is written (a failure inside DeepSpeed's save,
        between its internal barriers, can leave the ranks waiting on different collectives).

        Estimate: the size of the newest committed checkpoint, else 16 bytes per parameter element
        (16-bit weights + fp32 master weights + two Adam moments), plus 10%.
        """
        from .checkpoint import latest_committed

        previous = latest_committed(root)
        if previous is not None:
            needed = sum(f.stat().st_size for f in previous[1].rglob("*") if f.is_file())
        else:
            needed = 16 * sum(getattr(p, "ds_numel", p.numel()) for p in self.engine.module.parameters())
        needed = int(needed * 1.1)
        root.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(root).free
        short = torch.tensor([float(free < needed)])
        torch.distributed.all_reduce(short)
        if short.item() > 0:
            where = f"the previous checkpoint {previous[1]} is intact" if previous else "no earlier checkpoint exists"
            raise UserError(f"not enough disk space for checkpoint {root / tag_for(self.step)}: it needs about "
                            f"{needed / 2**20:.1f} MiB and {free / 2**20:.1f} MiB are free on this rank's file system "
                            f"(or on another rank's); nothing was written and {where}. Free disk space (or raise the "
                            "quota), lower output.keep_last, and resume with --resume")

    def trainer_state(self) -> dict:
        """What the trainer needs besides the engine to continue exactly: the step (the data, cache
        and stage positions are pure functions of it) and the skip counters."""
        return {"step": self.step, "skipped_steps": self.skipped_steps, "consecutive_skips": self.consecutive_skips,
                "samples_seen": self.step * self.world * self.recipe.optim.grad_accum * self.recipe.optim.micro_batch_size}

    def load_checkpoint(self) -> bool:
        """Resume from the newest COMMITTED checkpoint in output.dir/checkpoints; True when resumed.

        Partial checkpoints (a crash during a save) are ignored and removed.
        """
        from .checkpoint import latest_committed, prune, set_rng_state, weights_only_loads

        root = self.out / "checkpoints"
        found = latest_committed(root)
        torch.distributed.barrier()
        if self.rank == 0:
            prune(root)
        if found is None:
            return False
        step, directory = found
        with weights_only_loads(self.recipe.deepspeed.load_pickled_checkpoints):
            _, client = self.engine.load_checkpoint(str(root), tag=directory.name)
        if client is None:
            raise UserError(f"could not load the checkpoint {directory}")
        state = json.loads((directory / "trainer.json").read_text())
        self.step, self.skipped_steps, self.consecutive_skips = step, state["skipped_steps"], state["consecutive_skips"]
        rng_file = directory / f"rng-rank{self.rank}.json"
        if not rng_file.is_file():
            raise UserError(f"checkpoint {directory} has no {rng_file.name}: it was written by a run with "
                            "another number of ranks; resume with the same world size")
        set_rng_state(json.loads(rng_file.read_text()))
        self._engine_skips = self.engine.skipped_steps
        if self.rank == 0:
            self._truncate_metrics(step)
        return True

    def _truncate_metrics(self, step: int) -> None:
        """Drop metrics.jsonl records past `step` (written after the checkpoint by the run that died)."""
        path = self.out / "metrics.jsonl"
        if path.is_file():
            keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
            from .checkpoint import write_atomic

            write_atomic(path, "".join(line + "\n" for line in keep))
            self.metrics.close()
            self.metrics = open(path, "a")

    # ---- training ----------------------------------------------------------------------------
    def step_settings(self, step_tokens: float):
        """Term weights and temperature at the current step (pure functions of the step: resumable)."""
        from .distill_module import StepSettings
        from .schedules import Ramp, stage_at

        r, step = self.recipe, self.step
        if r.stages:
            weights = stage_at(step, r.stages)[1].weights()
        else:
            weights = r.weights.weights_at(step, r.optim.max_steps)
        temperature = Ramp(r.loss.temperature, r.loss.temperature_end, r.loss.temperature_shape).at(step, r.optim.max_steps)
        return StepSettings(weights=weights, temperature=temperature,
                            l2_scale=step_tokens / (self.world * r.optim.grad_accum))

    def train_step(self) -> dict:
        """One optimizer step over grad_accum micro-batches; returns step metrics (global, normalised)."""
        device = self.engine.device
        micro = self.sampler.step_indices(self.step)
        local_tokens = sum(int((self.data.targets[i] != -100).sum()) for i in micro)
        counts = torch.tensor([local_tokens, sum(int(self.data.attention_mask[i].sum()) for i in micro)],
                              dtype=torch.float64, device=device)
        torch.distributed.all_reduce(counts)
        n_targets = max(counts[0].item(), 1.0)
        settings = self.step_settings(n_targets)
        sums = torch.zeros(5, dtype=torch.float64, device=device)
        from .faults import maybe_kill_at_step, nan_loss

        maybe_kill_at_step(self.rank, self.step + 1)
        bad = torch.zeros(1, device=device)
        for m, indices in enumerate(micro):
            batch = {"input_ids": self.data.input_ids[indices].to(device),
                     "attention_mask": self.data.attention_mask[indices].to(device),
                     "targets": self.data.targets[indices].to(device)}
            teacher = self.teacher.signal(indices, batch) if self.teacher is not None else None
            loss_sum, parts = self.engine(**batch, teacher=teacher, step=settings)
            if nan_loss(self.rank, self.step + 1):
                loss_sum = loss_sum * float("nan")
            bad += (~torch.isfinite(loss_sum.detach())).float()
            if m == len(micro) - 1:
                # one rank's non-finite loss must skip the step on all: poison every rank's last
                # micro-batch so the engine's global gradient norm is non-finite and its step is skipped
                torch.distributed.all_reduce(bad)
                if bad.item() > 0:
                    loss_sum = loss_sum * float("nan")
            # ZeRO averages gradients over ranks; scaling by world / N makes the step's gradient
            # d(sum over all target tokens of all ranks and micro-batches)/d(theta) / N.
            self.engine.backward(loss_sum * (self.world / n_targets), scale_wrt_gas=False)
            self.engine.step()
            sums += torch.stack([loss_sum.detach()] + [parts[k] for k in ("div", "ce", "hidden", "attention")]).double()
        torch.distributed.all_reduce(sums)
        skipped = self._account_skip(bad.item() > 0)
        self.step += 1
        grad_norm = self.engine.get_global_grad_norm()
        mean = (sums / n_targets).tolist()
        return {"step": self.step, "loss": mean[0], "divergence": mean[1], "ce": mean[2], "hidden": mean[3],
                "attention": mean[4], "lr": self.engine.get_lr()[0], "temperature": settings.temperature,
                **{f"weight_{k}": v for k, v in settings.weights.items()},
                "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                "target_tokens": int(counts[0].item()), "tokens": int(counts[1].item()),
                "skipped": skipped, "skipped_total": self.skipped_steps}

    def _account_skip(self, nonfinite_loss: bool) -> bool:
        """Count the step the engine just skipped (non-finite loss or gradient norm on any rank); stop after
        optim.max_consecutive_skips in a row. The engine skipped it iff its own skip counter moved.
        Returns whether this step was skipped."""
        skipped = self.engine.skipped_steps > self._engine_skips
        self._engine_skips = self.engine.skipped_steps
        if nonfinite_loss and not skipped:
            raise RuntimeError("a non-finite loss reached the optimizer step but DeepSpeed applied it: this DeepSpeed "
                               "version does not skip non-finite steps; upgrade deepspeed (>= 0.19 checks the norm)")
        if not skipped:
            self.consecutive_skips = 0
            return False
        self.skipped_steps += 1
        self.consecutive_skips += 1
        print(f"[rank {self.rank}] step {self.step + 1} skipped: non-finite loss or gradient norm "
              f"({self.consecutive_skips} in a row, {self.skipped_steps} in total)", flush=True)
        limit = self.recipe.optim.max_consecutive_skips
        if self.consecutive_skips >= limit:
            raise UserError(f"{limit} optimizer steps in a row had a non-finite loss or gradient norm (last: step "
                            f"{self.step + 1}); stopping. Lower optim.lr, check the data, or resume from the last "
                            "checkpoint with --resume")
        return True

    def train(self) -> None:
        from tqdm import tqdm

        r = self.recipe
        bar = tqdm(total=r.optim.max_steps, initial=self.step, desc="train", disable=self.rank != 0,
                   dynamic_ncols=True)
        started, tokens = time.time(), 0
        while self.step < r.optim.max_steps:
            record = self.train_step()
            tokens += record["tokens"]
            record["tokens_per_s"] = tokens / max(time.time() - started, 1e-9)
            if self.step == 1:
                self._tighten_timeout()
            if self.rank == 0:
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
                self._log(record)
            if r.output.save_every and self.step % r.output.save_every == 0 and self.step < r.optim.max_steps:
                self.save_checkpoint()
        bar.close()
        self.save_checkpoint()

    def _tighten_timeout(self) -> None:
        """After the first step, collectives get deepspeed.timeout_s instead of the start-up timeout."""
        from torch.distributed.distributed_c10d import _set_pg_timeout

        _set_pg_timeout(timedelta(seconds=self.recipe.deepspeed.timeout_s))

    def _log(self, record: dict) -> None:
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        if record["step"] % self.recipe.output.log_every == 0 or record["step"] == self.recipe.optim.max_steps:
            w, s = self.writer, record["step"]
            for key in ("loss", "divergence", "ce", "hidden", "attention"):
                w.add_scalar(f"loss/{key}", record[key], s)
            for key in ("weight_output", "weight_hidden", "weight_attention", "temperature"):
                w.add_scalar(f"schedule/{key}", record[key], s)
            w.add_scalar("optim/lr", record["lr"], s)
            w.add_scalar("optim/grad_norm", record["grad_norm"], s)
            w.add_scalar("throughput/tokens_per_s", record["tokens_per_s"], s)

    # ---- export and cleanup ------------------------------------------------------------------
    def export(self) -> Path:
        """Gather the ZeRO-3 partitions and write the student as an HF directory (safetensors) at output.dir/model."""
        from .export import quantize_8bit, student_state, write_hf_model

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
        if self.rank == 0:
            self.writer.close()
            self.metrics.close()
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


def _is_communication_failure(err: RuntimeError) -> bool:
    """A collective failed because a peer died, hung or closed its connection (gloo raises plain RuntimeError)."""
    if isinstance(err, torch.distributed.DistError):
        return True
    text = str(err)
    return any(s in text for s in ("gloo/transport", "Connection reset by peer", "Connection closed by peer",
                                   "NCCL", "Timed out waiting", "ProcessGroup", "Broken pipe"))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dd-train", description=__doc__.split("\n\n")[0],
                                     epilog="Run with --help-recipe for every recipe key.")
    parser.add_argument("recipe", nargs="?", help="YAML recipe (see configs/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe field, e.g. --set optim.lr=3e-5 (repeatable)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest checkpoint in output.dir/checkpoints")
    parser.add_argument("--help-recipe", action="store_true", help="list every recipe key with its meaning and exit")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="set by the deepspeed launcher; not needed with torchrun")
    args = parser.parse_args(argv)
    if not args.help_recipe and args.recipe is None:
        parser.error("the recipe argument is required")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.help_recipe:
        print(describe_recipe())
        return 0
    recipe = load_recipe(args.recipe, args.set)
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from .teacher_group import split_world

    if split_world(recipe):  # teacher_source.kind=group: this rank was a teacher and has served the students
        return 0
    from .distributed import ensure_single_process_env

    ensure_single_process_env()
    trainer = Trainer(recipe)
    try:
        trainer.setup()
        if args.resume and trainer.load_checkpoint() and trainer.rank == 0:
            print(f"resumed from step {trainer.step}")
        trainer.train()
        if recipe.output.export:
            target = trainer.export()
            if trainer.rank == 0:
                print(f"student exported to {target}")
    except RuntimeError as err:
        if not _is_communication_failure(err):
            raise
        raise UserError(f"a collective operation failed: another rank died or hung (deepspeed.timeout_s="
                        f"{recipe.deepspeed.timeout_s}s after the first step). The newest committed checkpoint in "
                        f"{trainer.out / 'checkpoints'} is intact; resume with --resume. Cause: "
                        f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    if trainer.rank == 0:
        print(f"outputs in {trainer.out}: recipe.yaml, metrics.jsonl, tensorboard/, checkpoints/")
    trainer.cleanup()
    return 0


def cli() -> None:
    """Console-script entry point: bad input exits 2 with a one-paragraph message."""
    raise SystemExit(run_cli(main, "dd-train"))


if __name__ == "__main__":
    cli()

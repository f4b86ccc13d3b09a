"""Evaluation during training: every ``output.eval_every`` steps, on every rank together.

Measured on ``data.eval`` (held-out, at most ``output.eval_samples`` samples, the same ones each time),
with the student as it is in the engine (ZeRO-3 partitions gathered by the modules' own hooks):

- ``eval/heldout_loss``: mean cross-entropy (nats) of the held-out target tokens -- the training CE
  term's definition on data the student never trains on;
- ``eval/kl_teacher``: mean KL(teacher || student) at T = 1 per target token, and
  ``eval/top1_agreement``: fraction of target tokens whose student argmax is the teacher's argmax.
  The teacher comes through the same objects training uses: a colocated teacher scores the held-out
  batches; a top-k cache is read through ``output.eval_teacher_cache`` (a cache built over data.eval)
  and then KL is over the k ids plus one tail bucket (exact at T = 1 for the bucketed distributions,
  a lower bound of the full-vocabulary KL); without that cache, ``kind=cache`` runs measure the same
  on the first ``output.eval_samples`` TRAINING samples, logged as ``eval/train_kl_teacher`` and
  ``eval/train_top1_agreement`` (the training cache covers only those). A group teacher serves the
  training batches only: no KL then.

Records go to TensorBoard (tags above) and ``output.dir/eval.jsonl`` (one line per evaluation, with
``best``); the best evaluation by ``output.best_metric`` is marked in ``checkpoints/best.json``
({"step", "metric", "value", "checkpoint"}), its checkpoint is saved if the step had none and is
never pruned by ``output.keep_last``. A resumed run drops records past its step and carries on.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from dist_distill.data.records import IGNORE_INDEX
from dist_distill.training import checkpoint

BEST_FILE = checkpoint.BEST_FILE
LOWER_IS_BETTER = {"heldout_loss": True, "kl_teacher": True, "top1_agreement": False}


def build_periodic_eval(trainer) -> "PeriodicEval | None":
    """The trainer's evaluator, or None when output.eval_every is 0."""
    return PeriodicEval(trainer) if trainer.recipe.output.eval_every > 0 else None


class PeriodicEval:
    """Held-out metrics of the training student at fixed steps (see the module docstring)."""

    def __init__(self, trainer):
        from dist_distill.data.records import load_tokenized

        r = trainer.recipe
        self.out, self.every, self.last = trainer.out, r.output.eval_every, r.optim.max_steps
        self.metric, self.wanted = r.output.best_metric, set(r.output.eval_metrics)
        self.batch_size = r.optim.micro_batch_size
        self.data = load_tokenized(r.data.eval, trainer.tokenizer, r.data, r.output.eval_samples)
        self.vocab = len(trainer.tokenizer)
        self.teacher, self.teacher_data, self.prefix = self._teacher(trainer)
        self.best, self.first_call = None, True

    def _teacher(self, trainer):
        """(teacher source, TokenizedData it scores, tag prefix) for the KL metrics, or (None, None, "")."""
        r, kind = trainer.recipe, trainer.recipe.teacher_source.kind
        if not ({"kl_teacher", "top1_agreement"} & self.wanted) or trainer.teacher is None or kind == "group":
            return None, None, ""
        if kind == "colocated":
            return trainer.teacher, self.data, "eval/"
        if r.output.eval_teacher_cache:
            from dist_distill.teacher.cache.reader import CacheTeacher, TeacherCache
            from dist_distill.teacher.sources import expected_cache_fields

            from dist_distill.data.records import load_tokenized

            cache = TeacherCache(r.output.eval_teacher_cache)  # built over all of data.eval, like a training cache
            full = load_tokenized(r.data.eval, trainer.tokenizer, r.data, r.data.max_samples)
            cache.check_matches(expected_cache_fields(r, trainer.tokenizer, full))
            return CacheTeacher(cache, r.teacher_source.top_k, trainer.device), self.data, "eval/"
        n = min(len(trainer.data), r.output.eval_samples or len(trainer.data))
        from dist_distill.data.records import TokenizedData

        d = trainer.data
        subset = TokenizedData(d.input_ids[:n], d.attention_mask[:n], d.targets[:n], d.source)
        return trainer.teacher, subset, "eval/train_"

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.last

    # ---- measuring -----------------------------------------------------------------------------
    def _batches(self, n: int, rank: int, world: int):
        """This rank's sample indices of `n`, in batches; every rank gets the same number of batches
        (ZeRO-3 gathers parameters collectively), a rank without samples left gets an empty one."""
        mine = list(range(rank, n, world))
        per_rank = -(-n // world)
        for lo in range(0, per_rank, self.batch_size):
            yield mine[lo:lo + self.batch_size]

    @torch.no_grad()
    def _student_logits(self, trainer, batch: dict) -> torch.Tensor:
        """float32 [n_targets, V] student logits at the batch's target tokens (row-major)."""
        student = trainer.engine.module.student
        hidden = student.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        rows = hidden.last_hidden_state[batch["targets"] != IGNORE_INDEX]
        head = student.get_output_embeddings()
        return torch.cat([head(rows[i:i + 1024]).float()[:, :self.vocab] for i in range(0, max(len(rows), 1), 1024)])

    def _teacher_sums(self, logits: torch.Tensor, signal) -> tuple[float, float]:
        """(sum of KL(teacher || student), number of equal argmaxes) over the rows of `logits`."""
        from dist_distill.evaluation.metrics import kl_and_agreement
        from dist_distill.losses import topk_divergence

        if signal.topk is not None:
            ids, t_logits, lse = signal.topk
            # the exact T=1 tail mass where the source carries it (column 0 of log_tails is T=1)
            log_tails = getattr(signal, "log_tails", None)
            exact = {"teacher_log_tail": log_tails[:, 0]} if log_tails is not None else {}
            kl = topk_divergence(logits, ids, t_logits, lse, "fkl", temperature=1.0, tail="bucket",
                                 scale_by_t2=False, vocab_size=self.vocab, reduction="sum", **exact)
            t_top = ids.gather(1, t_logits.argmax(1, keepdim=True)).squeeze(1)
            return float(kl), float((t_top == logits.argmax(1)).sum())
        t_logits = F.linear(signal.hidden.float(), signal.weight.float(),
                            None if signal.bias is None else signal.bias.float())[:, :self.vocab]
        return kl_and_agreement(F.log_softmax(t_logits, -1), F.log_softmax(logits, -1))

    def _pass(self, trainer, data, with_teacher: bool) -> list[float]:
        """Global sums over `data`: [CE sum, target tokens, KL sum, agreements] (all ranks)."""
        sums = torch.zeros(4, dtype=torch.float64, device=trainer.device)
        for idx in self._batches(len(data), trainer.rank, trainer.world):
            real = len(idx) > 0
            indices = torch.tensor(idx if real else [0], dtype=torch.long)
            batch = {"input_ids": data.input_ids[indices].to(trainer.device),
                     "attention_mask": data.attention_mask[indices].to(trainer.device),
                     "targets": data.targets[indices].to(trainer.device)}
            logits = self._student_logits(trainer, batch)
            if not real:
                continue
            labels = batch["targets"][batch["targets"] != IGNORE_INDEX]
            sums[0] += F.cross_entropy(logits, labels, reduction="sum").double()
            sums[1] += len(labels)
            if with_teacher:
                kl, agree = self._teacher_sums(logits, self.teacher.signal(indices, batch))
                sums[2] += kl
                sums[3] += agree
        torch.distributed.all_reduce(sums)
        return sums.tolist()

    def evaluate(self, trainer) -> dict:
        """All ranks: {"step", "eval/heldout_loss", "eval/heldout_ppl", [prefix]kl_teacher, [prefix]top1_agreement}."""
        import math

        module = trainer.engine.module
        was_training = module.training
        module.eval()
        try:
            ce, n, _, _ = self._pass(trainer, self.data, False)
            record = {"step": trainer.step, "eval/heldout_loss": ce / max(n, 1), "eval/heldout_ppl": math.exp(ce / max(n, 1))}
            if self.teacher is not None:
                _, n_t, kl, agree = self._pass(trainer, self.teacher_data, True)
                if "kl_teacher" in self.wanted:
                    record[f"{self.prefix}kl_teacher"] = kl / max(n_t, 1)
                if "top1_agreement" in self.wanted:
                    record[f"{self.prefix}top1_agreement"] = agree / max(n_t, 1)
        finally:
            module.train(was_training)
        return record

    # ---- the trainer's hook ----------------------------------------------------------------------
    def after_step(self, trainer) -> dict | None:
        """Called by Trainer.train after each step (and its checkpoint, if one was due); evaluates when
        due, logs, and marks the best checkpoint. Returns the record (None when not due)."""
        if self.first_call:
            self._resume(trainer.step - 1, trainer.rank)
            self.first_call = False
        if not self.due(trainer.step):
            return None
        record = self.evaluate(trainer)
        value = self._metric_value(record)
        record["best"] = value is not None and (self.best is None or (value < self.best if LOWER_IS_BETTER[self.metric]
                                                                     else value > self.best))
        if record["best"]:
            self.best = value
            self._mark_best(trainer, value)
        if trainer.rank == 0:
            self._log(trainer, record)
        return record

    def _metric_value(self, record: dict) -> float | None:
        if self.metric == "none":
            return None
        for key in (f"eval/{self.metric}", f"eval/train_{self.metric}"):
            if key in record:
                return record[key]
        return None

    def _mark_best(self, trainer, value: float) -> None:
        """Make sure step-<step> is (or, at the last step, is about to be) a committed checkpoint, then
        rank 0 writes checkpoints/best.json naming it."""
        root = self.out / "checkpoints"
        step = trainer.step
        committed = checkpoint.latest_committed(root)
        if step < self.last and (committed is None or committed[0] != step):
            trainer.save_checkpoint()  # the last step's checkpoint is written by Trainer.train right after
        if trainer.rank == 0:
            best = {"step": step, "metric": self.metric, "value": value, "checkpoint": checkpoint.tag_for(step)}
            root.mkdir(parents=True, exist_ok=True)
            checkpoint.write_atomic(root / BEST_FILE, json.dumps(best, indent=2))

    def _log(self, trainer, record: dict) -> None:
        with open(self.out / "eval.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if trainer.log is not None:
            for key, value in record.items():
                if key.startswith("eval/"):
                    trainer.log.writer.add_scalar(key, value, record["step"])
            trainer.log.writer.flush()
        shown = ", ".join(f"{k.split('/', 1)[1]}={v:.4f}" for k, v in record.items() if k.startswith("eval/"))
        print(f"eval at step {record['step']}: {shown}{' (best)' if record['best'] else ''}", flush=True)

    def _resume(self, step: int, rank: int) -> None:
        """Forget evaluations past `step` (a resumed run redoes them) and take the best from those kept."""
        path = self.out / "eval.jsonl"
        kept = [json.loads(x) for x in path.read_text().splitlines() if x] if path.is_file() else []
        kept = [r for r in kept if r["step"] <= step]
        best = [r for r in kept if r.get("best")]
        self.best = self._metric_value(best[-1]) if best else None
        torch.distributed.barrier()  # every rank has read the file before rank 0 rewrites it
        if rank == 0 and path.is_file():
            checkpoint.write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
        best_file = self.out / "checkpoints" / BEST_FILE
        if rank == 0 and best_file.is_file() and json.loads(best_file.read_text())["step"] > step:
            if best:
                checkpoint.write_atomic(best_file, json.dumps({"step": best[-1]["step"], "metric": self.metric,
                                                               "value": self.best,
                                                               "checkpoint": checkpoint.tag_for(best[-1]["step"])},
                                                              indent=2))
            else:
                best_file.unlink()


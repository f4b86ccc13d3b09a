"""Committed checkpoints: nothing counts until every rank has written and fsynced it.

A checkpoint lives in ``<root>/step-<N>/``: DeepSpeed's engine state (every rank's ZeRO-3
partitions, optimizer state, scheduler), one ``rng-rank<r>.json`` per rank (python, numpy,
torch and CUDA generators), ``trainer.json`` (step, data and cache position, skip counter) and
the resolved ``recipe.yaml``. The life cycle of one save:

1. every rank writes its files (DeepSpeed's ``save_checkpoint`` plus ours), then fsyncs them;
2. a barrier: every rank has finished step 1;
3. rank 0 writes ``COMMITTED`` (temporary name, fsync, atomic rename, fsync of the directory);
4. rank 0 removes partial checkpoints (no marker) and committed ones beyond keep-last-N.

DeepSpeed's own ``latest`` file is written before its final barrier and is not proof that a
checkpoint is whole; resume therefore picks the newest directory that has ``COMMITTED``.
Nothing here unpickles: RNG states and trainer state are JSON.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from dist_distill.errors import UserError

COMMIT_MARKER = "COMMITTED"
PREFIX = "step-"


def tag_for(step: int) -> str:
    return f"{PREFIX}{step}"


def _step_of(path: Path) -> int | None:
    if not path.name.startswith(PREFIX):
        return None
    try:
        return int(path.name[len(PREFIX):])
    except ValueError:
        return None


def list_checkpoints(root: str | Path) -> list[tuple[int, Path, bool]]:
    """(step, directory, committed) of every step-N directory under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(_step_of(p), p) for p in root.iterdir() if p.is_dir()]
    return sorted((s, p, (p / COMMIT_MARKER).is_file()) for s, p in found if s is not None)


def latest_committed(root: str | Path) -> tuple[int, Path] | None:
    """The newest committed checkpoint as (step, directory), or None."""
    committed = [(s, p) for s, p, ok in list_checkpoints(root) if ok]
    return committed[-1] if committed else None


def _fsync_path(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:  # another rank's temporary file, renamed meanwhile
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync every file below `path` and the directories themselves (every rank calls it on the shared
    directory, so each rank's files are flushed by at least their writer)."""
    for dirpath, _, files in os.walk(path):
        for name in files:
            _fsync_path(os.path.join(dirpath, name))
        _fsync_path(dirpath)


def write_atomic(path: Path, data: str | bytes | list[bytes]) -> None:
    """Write `data` (text, bytes, or a list of byte buffers) to `path` via a temporary file, fsync and
    rename, then fsync the directory: a reader sees the old file or the whole new one, never a part."""
    tmp = path.with_name(f".{path.name}.tmp{socket.gethostname()}.{os.getpid()}")
    parts = [data.encode()] if isinstance(data, str) else data if isinstance(data, list) else [data]
    try:
        with open(tmp, "wb") as f:
            for part in parts:
                f.write(part)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:  # disk full, quota, interrupted: no temporary file is left holding the space
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    _fsync_path(str(path.parent))


def commit(directory: Path, info: dict) -> None:
    """Rank 0, after the barrier: mark `directory` as a whole checkpoint."""
    write_atomic(directory / COMMIT_MARKER, json.dumps(info, indent=2) + "\n")


BEST_FILE = "best.json"


def best_tag(root: str | Path) -> str | None:
    """The checkpoint tag (step-N) that ``root/best.json`` names (training.periodic_eval), or None."""
    path = Path(root) / BEST_FILE
    try:
        return json.loads(path.read_text())["checkpoint"] if path.is_file() else None
    except (ValueError, KeyError, TypeError):
        return None


def prune(root: str | Path, keep_last: int = 0) -> list[Path]:
    """Remove partial checkpoints (no commit marker) and, with keep_last > 0, all but the newest
    `keep_last` committed ones. Call only while no save is in progress. Returns what was removed."""
    entries = list_checkpoints(root)
    doomed = [p for _, p, ok in entries if not ok]
    committed = [p for _, p, ok in entries if ok]
    if keep_last > 0:
        best = best_tag(root)  # the best evaluation's checkpoint (training.periodic_eval) is kept
        doomed += [p for p in committed[:-keep_last] if p.name != best]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _unb64(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


def rng_state() -> dict:
    """This process's generator states as JSON-serialisable data."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss],
             "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
             "torch": _b64(torch.get_rng_state())}
    if torch.cuda.is_available():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    """Restore generator states saved by :func:`rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_unb64(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])


def deepspeed_safe_globals() -> list:
    """Classes DeepSpeed pickles into its checkpoint files besides tensors and containers (found by
    loading this project's ZeRO-3 checkpoints with ``weights_only=True``: the ZeRO stage enum and the
    loss scaler; the scaler's fp16 variants too): allowed, and nothing else. Plain-data classes: the
    unpickler rebuilds them from their attribute dicts without calling any code of the file."""
    from deepspeed.runtime.fp16 import loss_scaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    scalers = [getattr(loss_scaler, name) for name in ("LossScalerBase", "LossScaler", "DynamicLossScaler")
               if hasattr(loss_scaler, name)]
    return [ZeroStageEnum, *scalers]


@contextlib.contextmanager
def weights_only_loads(trust_pickles: bool = False):
    """Within the block every ``torch.load`` -- DeepSpeed's checkpoint engine and ``zero_to_fp32``
    pass ``weights_only=False`` -- runs with ``weights_only=True`` and `deepspeed_safe_globals`,
    so a checkpoint file cannot run code. A file that needs more is refused with a `UserError`
    naming it (deepspeed.load_pickled_checkpoints=true lifts this for trusted checkpoints).
    """
    if trust_pickles:
        yield
        return
    real_load = torch.load

    def load(f, *args, **kwargs):
        kwargs["weights_only"] = True
        try:
            with torch.serialization.safe_globals(deepspeed_safe_globals()):
                return real_load(f, *args, **kwargs)
        except pickle.UnpicklingError as err:
            why = str(err).split("Unsupported global:")[-1].split(" was not an allowed global")[0].strip()
            raise UserError(f"checkpoint file {f} holds more than tensors and plain data ({why}): it was refused "
                            "because loading it would run code from the file. If you wrote this checkpoint yourself, "
                            "set deepspeed.load_pickled_checkpoints=true (dd-export: --load-pickled) to load it anyway") from None

    torch.load = load
    try:
        yield
    finally:
        torch.load = real_load


# ---------------------------------------------------------------------------------------------
# Engine checkpoints: the save / resume protocol of a training run (called on every rank)
# ---------------------------------------------------------------------------------------------

def _any_rank(flag: bool, device: torch.device) -> int:
    """How many ranks of the default group raised `flag` (the tensor lives on the group's device:
    NCCL refuses CPU tensors)."""
    count = torch.tensor([float(flag)], device=device)
    torch.distributed.all_reduce(count)
    return int(count.item())


def estimate_checkpoint_bytes(root: Path, parameters) -> int:
    """Bytes the next save needs: the newest committed checkpoint's size, else 16 bytes per parameter
    element (16-bit weights + fp32 master weights + two Adam moments); plus 10 %."""
    previous = latest_committed(root)
    if previous is not None:
        needed = sum(f.stat().st_size for f in previous[1].rglob("*") if f.is_file())
    else:
        needed = 16 * sum(getattr(p, "ds_numel", p.numel()) for p in parameters)
    return int(needed * 1.1)


def _intact(root: Path) -> str:
    previous = latest_committed(root)
    return f"the previous checkpoint {previous[1]} is intact" if previous else "no earlier checkpoint exists"


def check_disk_space(root: Path, step: int, needed: int, device: torch.device) -> None:
    """Refuse a save that cannot fit on any rank, before anything is written (a failure inside
    DeepSpeed's save, between its internal barriers, can leave the ranks waiting on different
    collectives)."""
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    if _any_rank(free < needed, device):
        raise UserError(f"not enough disk space for checkpoint {root / tag_for(step)}: it needs about "
                        f"{needed / 2**20:.1f} MiB and {free / 2**20:.1f} MiB are free on this rank's file system "
                        f"(or on another rank's); nothing was written and {_intact(root)}. Free disk space (or raise "
                        "the quota), lower output.keep_last, and resume with --resume")


def save_checkpoint(engine, root: Path, step: int, rank: int, world: int, trainer_state: dict, recipe,
                    keep_last: int, device: torch.device, on_written=None) -> Path:
    """Write and commit ``root/step-<step>`` on every rank (the protocol in the module docstring).

    A rank that cannot write (disk full, quota) makes every rank stop with an error naming the
    failure; the partial directory is removed and earlier checkpoints are untouched.
    `on_written(step)` runs after every file is fsynced and before the commit (a test seam).
    """
    directory = root / tag_for(step)
    check_disk_space(root, step, estimate_checkpoint_bytes(root, engine.module.parameters()), device)
    error = None
    try:
        engine.save_checkpoint(str(root), tag=tag_for(step), client_state={"step": step})
        write_atomic(directory / f"rng-rank{rank}.json", json.dumps(rng_state()))
        if rank == 0:
            write_atomic(directory / "trainer.json", json.dumps(trainer_state, indent=2))
            recipe.save(directory / "recipe.yaml")
        fsync_tree(directory)
    except (OSError, RuntimeError) as err:
        error = err
    failed = _any_rank(error is not None, device)
    if failed:
        if rank == 0:
            prune(root)
        raise UserError(f"checkpoint {directory} could not be written on {failed} rank(s)"
                        f"{f' (here: {error})' if error else ''}; it was removed and {_intact(root)}. "
                        "Free disk space (or raise the quota) and resume with --resume")
    if on_written is not None:
        on_written(step)
    if rank == 0:
        commit(directory, {"step": step, "world_size": world})
        prune(root, keep_last)
    torch.distributed.barrier()
    return directory


def load_checkpoint(engine, root: Path, rank: int, device: torch.device, trust_pickles: bool = False) -> dict | None:
    """Resume `engine` from the newest COMMITTED checkpoint under `root`, as ONE decision of all ranks.

    Every rank loads its files; the ranks then agree (an all-reduce of failures): either all
    continue from the same step -- the checkpoint's trainer.json is returned, with this rank's
    RNG state restored -- or all stop with the same message naming the checkpoint and, on the
    ranks where it failed, the file. Partial checkpoints (a crash during a save) are removed.
    Returns None when there is nothing to resume from.
    """
    found = latest_committed(root)
    torch.distributed.barrier()
    if rank == 0:
        prune(root)
    if found is None:
        return None
    step, directory = found
    error, state = None, None
    try:
        with weights_only_loads(trust_pickles):
            _, client = engine.load_checkpoint(str(root), tag=directory.name)
        if client is None:
            raise UserError(f"DeepSpeed found no engine state in {directory}")
        rng_file = directory / f"rng-rank{rank}.json"
        if not rng_file.is_file():
            raise UserError(f"{rng_file.name} is missing: the checkpoint was written by a run with another number "
                            "of ranks; resume with the same world size")
        state = json.loads((directory / "trainer.json").read_text())
        set_rng_state(json.loads(rng_file.read_text()))
    except (UserError, OSError, RuntimeError, ValueError, KeyError) as err:
        error = err
    failed = _any_rank(error is not None, device)
    if failed:
        here = f" Here (rank {rank}): {error}" if error is not None else f" This rank (rank {rank}) loaded its files."
        raise UserError(f"could not resume from checkpoint {directory}: loading failed on {failed} rank(s), so no rank "
                        f"continues.{here} Remove or repair that checkpoint (an older committed one is then used) "
                        "or start without --resume")
    return dict(state, step=step)


def truncate_jsonl(path: Path, step: int) -> None:
    """Drop records of the JSON-lines file `path` past `step` (written after a checkpoint by a run that died)."""
    if path.is_file():
        keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        write_atomic(path, "".join(line + "\n" for line in keep))

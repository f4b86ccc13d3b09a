"""Fault injection on CPU, 2 ranks, gloo: crashes, partial checkpoints, NaN steps, dead ranks, full disks."""

import json
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, mount_tmpfs, quiet_env, run_cmd, torchrun, world_overrides
from dist_distill.training.distributed import free_port

pytestmark = pytest.mark.slow
BASE = ["--set", "teacher_source.kind=colocated", "--set", "optim.warmup_steps=1", "--set", "optim.micro_batch_size=4",
        "--set", "optim.grad_accum=2", "--set", "deepspeed.timeout_s=20"]


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def train(world, out, *extra, check=True, **env):
    return torchrun(2, "dist_distill.train", "configs/tiny/distill.yaml", *world_overrides(world, out), *BASE, *extra,
                    check=check, **env)


@pytest.fixture(scope="module")
def straight(tiny_world, tmp_path_factory):
    """8 steps without interruption, checkpoints every 3 steps (the reference trajectory)."""
    out = tmp_path_factory.mktemp("straight")
    train(tiny_world, out, "--set", "optim.max_steps=8", "--set", "output.save_every=3")
    return out


def assert_same_run(a, b):
    ma, mb = metrics(a), metrics(b)
    assert [r["step"] for r in ma] == [r["step"] for r in mb] == list(range(1, 9))
    for x, y in zip(ma, mb):
        assert (x["loss"], x["grad_norm"]) == (y["loss"], y["grad_norm"]), (x, y)  # bit-exact
    wa, wb = load_file(a / "model/model.safetensors"), load_file(b / "model/model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.faults(2)
def test_kill_every_process_then_resume_is_bit_exact(tiny_world, tmp_path, straight):
    proc = train(tiny_world, tmp_path, "--set", "optim.max_steps=8", "--set", "output.save_every=3",
                 check=False, DD_FAULT_KILL_AT_STEP="0:5")  # rank 0 gets SIGKILL, torchrun takes the rest down
    assert proc.returncode != 0
    assert max(r["step"] for r in metrics(tmp_path)) == 4
    assert not (tmp_path / "model").exists()
    train(tiny_world, tmp_path, "--set", "optim.max_steps=8", "--set", "output.save_every=3", "--resume")
    assert_same_run(straight, tmp_path)


@pytest.mark.faults(1)
def test_killed_while_writing_a_checkpoint(tiny_world, tmp_path, straight):
    # both runs in the device test mode (training/device_check.py): the disk-space check and the save and
    # resume agreements hand no host tensor to a group that is NCCL on CUDA (issue 12, items 1 and 2)
    proc = train(tiny_world, tmp_path, "--set", "optim.max_steps=8", "--set", "output.save_every=3",
                 check=False, DD_FAULT_KILL_IN_SAVE="6", DD_CHECK_DEVICES="1")
    assert proc.returncode != 0
    ckpt = tmp_path / "checkpoints"
    assert (ckpt / "step-3/COMMITTED").is_file()
    assert (ckpt / "step-6").is_dir() and not (ckpt / "step-6/COMMITTED").exists()  # all files, no marker
    assert (ckpt / "latest").read_text().strip() == "step-6"  # DeepSpeed's own pointer is not proof
    proc = train(tiny_world, tmp_path, "--set", "optim.max_steps=8", "--set", "output.save_every=3", "--resume",
                 "--set", "output.keep_last=2", DD_CHECK_DEVICES="1")
    assert "resumed from step 3" in proc.stdout and "device test mode (DD_CHECK_DEVICES=1)" in proc.stderr
    assert "collective timeout: deepspeed.timeout_s=" in proc.stdout and "s from step 4 on" in proc.stdout  # resumed too
    assert sorted(p.name for p in ckpt.glob("step-*")) == ["step-6", "step-8"]  # re-written; keep_last=2
    assert (ckpt / "step-6/COMMITTED").is_file()
    assert_same_run(straight, tmp_path)


class _RunsCode:
    """Unpickling this calls print(): what a tampered checkpoint could do with any callable."""

    def __reduce__(self):
        return (print, ("CODE FROM THE CHECKPOINT RAN",))


@pytest.mark.bad_inputs(2)
def test_checkpoint_that_would_run_code_is_refused(tiny_world, tmp_path, straight):
    """DeepSpeed loads its files with torch.load(weights_only=False); resume and dd-export load them with
    weights_only=True: a checkpoint file carrying a callable is refused, naming the file, and never runs."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(straight, run)
    for f in (run / "checkpoints/step-8").glob("*optim_states.pt"):
        state = torch.load(f, weights_only=False)  # our own file from the fixture
        state["tampered"] = _RunsCode()
        torch.save(state, f)
    proc = train(tiny_world, run, "--set", "optim.max_steps=10", "--set", "output.save_every=3", "--resume", check=False)
    out = proc.stdout + proc.stderr.replace("\n  ", " ")
    assert proc.returncode != 0 and "CODE FROM THE CHECKPOINT RAN" not in out
    assert "optim_states.pt holds more than tensors and plain data (GLOBAL print)" in out, out[-3000:]
    assert "deepspeed.load_pickled_checkpoints=true" in out
    proc = run_cmd([sys.executable, "-m", "dist_distill.export", str(run / "checkpoints"), "--model-dir",
                    str(run / "model"), "--out", str(tmp_path / "exported")], check=False)
    err = proc.stderr.replace("\n  ", " ")
    assert proc.returncode == 2 and "CODE FROM THE CHECKPOINT RAN" not in proc.stdout + err
    assert "holds more than tensors and plain data" in err and not (tmp_path / "exported").exists()


@pytest.mark.bad_inputs(1)
def test_resume_is_one_decision_of_all_ranks(tiny_world, tmp_path, straight):
    """Only rank 1's checkpoint file is refused: no rank continues (rank 0 used to print "resumed from
    step 8" and train on); both stop with the same message, naming the checkpoint, and rank 1 the file."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(straight, run)
    files = sorted((run / "checkpoints/step-8").glob("*rank_1_*optim_states.pt"))
    assert len(files) == 1, sorted(p.name for p in (run / "checkpoints/step-8").iterdir())
    state = torch.load(files[0], weights_only=False)
    state["tampered"] = _RunsCode()
    torch.save(state, files[0])
    proc = train(tiny_world, run, "--set", "optim.max_steps=10", "--set", "output.save_every=3", "--resume", check=False)
    out = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode != 0 and "resumed from step" not in out and "CODE FROM THE CHECKPOINT RAN" not in out
    assert max(r["step"] for r in metrics(run)) == 8  # nobody trained on
    for rank in (0, 1):
        assert f"dd-train (rank {rank}): error: could not resume from checkpoint" in out, out[-3000:]
    assert "loading failed on 1 rank(s), so no rank continues. This rank (rank 0) loaded its files." in out
    assert f"Here (rank 1): checkpoint file {files[0]}" in out


@pytest.mark.faults(1)
def test_nan_on_one_rank_skips_the_step_everywhere(tiny_world, tmp_path):
    train(tiny_world, tmp_path, "--set", "optim.max_steps=5", "--set", "output.save_every=2",
          DD_FAULT_NAN_LOSS="1:3")
    m = metrics(tmp_path)
    assert [r["skipped"] for r in m] == [False, False, True, False, False]
    assert m[-1]["skipped_total"] == 1
    assert all(r["loss"] == r["loss"] for r in m if not r["skipped"])  # finite elsewhere
    # the skipped step changed nothing: the parameters after step 3 equal those after step 2
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    at2 = get_fp32_state_dict_from_zero_checkpoint(str(tmp_path / "checkpoints"), tag="step-2")
    train(tiny_world, tmp_path / "again", "--set", "optim.max_steps=5", "--set", "output.save_every=3",
          DD_FAULT_NAN_LOSS="1:3")
    at3 = get_fp32_state_dict_from_zero_checkpoint(str(tmp_path / "again/checkpoints"), tag="step-3")
    assert all(torch.equal(at2[k], at3[k]) for k in at2)


@pytest.mark.faults(3)
def test_consecutive_nans_stop_the_run(tiny_world, tmp_path):
    proc = train(tiny_world, tmp_path, "--set", "optim.max_steps=8", "--set", "optim.max_consecutive_skips=3",
                 check=False, DD_FAULT_NAN_LOSS="0:2,3,4")
    assert proc.returncode != 0
    assert "3 optimizer steps in a row had a non-finite loss or gradient norm (last: step 4); stopping" in proc.stderr
    assert [r["skipped"] for r in metrics(tmp_path)] == [False, True, True]


@pytest.mark.faults(1)
def test_a_dead_rank_makes_the_other_exit_within_the_timeout(tiny_world, tmp_path):
    """Two processes started by hand (no torchrun agent to clean up): rank 1 dies at step 3."""
    args = [sys.executable, "-m", "dist_distill.train", "configs/tiny/distill.yaml",
            *world_overrides(tiny_world, tmp_path), *BASE, "--set", "optim.max_steps=50"]
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        env = quiet_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                        MASTER_PORT=port, DD_FAULT_KILL_AT_STEP="1:3")
        procs.append(subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    procs[1].wait(timeout=900)
    died = time.time()
    _, err = procs[0].communicate(timeout=120)
    assert procs[1].returncode == -9
    assert procs[0].returncode == 2, err[-3000:]
    assert time.time() - died < 20 + 30  # deepspeed.timeout_s plus a margin
    assert "a collective operation failed: another rank died or hung" in err
    assert "Traceback" not in err


@pytest.mark.faults(1)
def test_disk_full_during_checkpoint(tiny_world, tmp_path, straight):
    size = sum(f.stat().st_size for f in (straight / "checkpoints/step-3").rglob("*") if f.is_file())
    disk = tmp_path / "small_disk"
    mount_tmpfs(disk, size * 3 // 2 + 256 * 1024)  # room for one checkpoint and the logs, not two
    try:
        proc = train(tiny_world, disk, "--set", "optim.max_steps=8", "--set", "output.save_every=3",
                     "--set", "output.export=false", check=False)
        assert proc.returncode != 0
        err = proc.stderr.replace("\n  ", " ")
        assert "not enough disk space for checkpoint" in err and "checkpoints/step-6: it needs about" in err, err[-3000:]
        assert "nothing was written and the previous checkpoint" in err and "step-3 is intact" in err
        assert [p.name for p in (disk / "checkpoints").glob("step-*")] == ["step-3"]
        assert (disk / "checkpoints/step-3/COMMITTED").is_file()
    finally:
        subprocess.run(["umount", str(disk)], check=False)

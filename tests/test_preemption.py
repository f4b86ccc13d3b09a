"""Preemption on CPU, 2 ranks, gloo: SIGUSR1 through launch/torchrun.sh -> a committed checkpoint -> exit 75
-> the re-run resumes at that step and its losses equal an uninterrupted run's; the wall-clock budget; the
sbatch script's requeue on 75."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, quiet_env, run_cmd, torchrun, world_overrides
from dist_distill.training.distributed import free_port
from dist_distill.training.preemption import REQUEUE_EXIT_CODE

pytestmark = pytest.mark.slow
STEPS = 12
BASE = ["--set", "teacher_source.kind=colocated", "--set", "optim.warmup_steps=1", "--set", "optim.micro_batch_size=4",
        "--set", "optim.grad_accum=2", "--set", "deepspeed.timeout_s=60", "--set", f"optim.max_steps={STEPS}"]


def metrics(run):
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def node_env(tmp_path, **extra):
    """One fake SLURM node with 2 'GPUs' (CPU ranks)."""
    return quiet_env(SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="localhost", SLURM_JOB_NUM_NODES="1", SLURM_NODEID="0",
                     SLURM_GPUS_ON_NODE="2", MASTER_PORT=str(free_port()), PYTHON=sys.executable,
                     DD_REQUEUE_FILE=str(tmp_path / "requeue.json"), **extra)


def launch(world, out, tmp_path, *extra):
    args = ["bash", "launch/torchrun.sh", "dist_distill.train", "configs/tiny/distill.yaml",
            *world_overrides(world, out), *BASE, *extra]
    return subprocess.Popen(args, cwd=REPO, env=node_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


@pytest.fixture(scope="module")
def straight(tiny_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    torchrun(2, "dist_distill.train", "configs/tiny/distill.yaml", *world_overrides(tiny_world, out), *BASE)
    return out


@pytest.mark.faults(1)
def test_sigusr1_checkpoints_exits_75_and_resumes_exactly(tiny_world, tmp_path, straight):
    run = tmp_path / "run"
    proc = launch(tiny_world, run, tmp_path)
    deadline = time.time() + 600
    while len(metrics(run)) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGUSR1)  # what SLURM's --signal=USR1@grace does to the node's launcher
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == REQUEUE_EXIT_CODE, (out[-3000:], err[-3000:])
    stopped = json.loads((tmp_path / "requeue.json").read_text())["step"]
    assert 3 <= stopped < STEPS
    assert max(r["step"] for r in metrics(run)) == stopped  # the step that was running finished, no more
    assert (run / f"checkpoints/step-{stopped}/COMMITTED").is_file()
    assert not (run / "model").exists()
    assert f"stopped at step {stopped} for a signal (SIGUSR1)" in out
    assert "exit 75 (requeue)" in out and "SIGUSR1 received" in err

    proc = launch(tiny_world, run, tmp_path, "--resume")
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, (out[-3000:], err[-3000:])
    assert f"resumed from step {stopped}" in out
    a, b = metrics(straight), metrics(run)
    assert [r["step"] for r in b] == list(range(1, STEPS + 1))
    for x, y in zip(a, b):  # same samples in the same order, same losses: bit-exact
        assert (x["step"], x["loss"], x["grad_norm"], x["target_tokens"]) == \
            (y["step"], y["loss"], y["grad_norm"], y["target_tokens"]), (x, y)
    wa, wb = load_file(straight / "model/model.safetensors"), load_file(run / "model/model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.faults(1)
def test_wall_clock_budget_stops_with_a_checkpoint(tiny_world, tmp_path):
    proc = torchrun(2, "dist_distill.train", "configs/tiny/distill.yaml", *world_overrides(tiny_world, tmp_path), *BASE,
                    "--exit-duration-mins", "0.0001", check=False)
    assert proc.returncode != 0  # torchrun reports the workers' 75 as a failure ...
    assert "exitcode  : 75" in proc.stderr, proc.stderr[-3000:]  # ... naming it
    assert "stopped at step 1 for the wall-clock budget" in proc.stdout
    assert (tmp_path / "checkpoints/step-1/COMMITTED").is_file()


@pytest.mark.parametrize("srun_rc, requeued, rc", [(75, True, 0), (1, False, 1)])
def test_sbatch_requeues_on_75_only(tiny_world, tmp_path, srun_rc, requeued, rc):
    """slurm/train.sbatch under bash with fake srun/scontrol: the plan and dry run run first, srun starts one
    launch/torchrun.sh per node with --resume, and only the requeue code leads to `scontrol requeue`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    for name, body in (("srun", f'echo "srun $*" >> {calls}\nexit {srun_rc}'), ("scontrol", f'echo "scontrol $*" >> {calls}')):
        (bin_dir / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = quiet_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_ID="777", SLURM_JOB_NUM_NODES="2",
                    SLURM_JOB_NODELIST="n[1-2]", SLURM_GPUS_ON_NODE="2", SLURM_SUBMIT_DIR=str(REPO), PYTHON=sys.executable,
                    DD_EXIT_MINUTES="50", DD_LOGS=str(tmp_path / "logs"))
    proc = subprocess.run(["bash", "slurm/train.sbatch", "configs/tiny/distill.yaml",
                           *world_overrides(tiny_world, tmp_path / "run")], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == rc, (proc.stdout[-3000:], proc.stderr[-3000:])
    assert "revision: " in proc.stdout and "verdict: FITS" in proc.stdout and "dry run: PASS" in proc.stdout
    assert "student:\n  name_or_path: " in proc.stdout  # the resolved recipe at the top of the log
    lines = calls.read_text().splitlines()
    assert lines[0].startswith("srun --ntasks-per-node=1") and "launch/torchrun.sh dist_distill.train" in lines[0]
    assert lines[0].endswith("--resume --exit-duration-mins 50")
    assert ("scontrol requeue 777" in lines) == requeued


@pytest.mark.bad_inputs(1)
def test_bad_budget_is_refused():
    proc = run_cmd([sys.executable, "-m", "dist_distill.train", "configs/tiny/distill.yaml", "--exit-duration-mins", "0"],
                   check=False, timeout=120)
    assert proc.returncode == 2 and "--exit-duration-mins=0.0: expected minutes > 0" in proc.stderr

"""The device test mode (training.device_check, DD_CHECK_DEVICES=1) on the CPU: issue 12's items 1-3.

On CUDA the default groups are NCCL, which refuses CPU tensors; on the CPU box gloo takes every tensor,
so "a CPU tensor handed to a NCCL collective" passed every CPU test. The mode names the CPU process's
accelerator ``cpu:0``, tags tensors by where the code put them and refuses a host tensor on a group
that is NCCL on CUDA (and an op mixing host and accelerator tensors). The probe shows the old
patterns refused and their fixes accepted; the multi-process runs show the package's own paths clean:
ZeRO-3 training with checkpoint and --resume (item 1, the disk-space and save/resume agreements),
the teacher group with TP 2 (item 3: start step broadcast, vocab_offset all_gather, the scorer's id
range), and a TP cache build.
"""

import json
import sys

import pytest

from conftest import run_cmd, torchrun, world_overrides
from dist_distill.training.distributed import free_port

BASE = ["--set", "optim.max_steps=4", "--set", "optim.warmup_steps=1", "--set", "optim.micro_batch_size=4",
        "--set", "optim.grad_accum=2", "--set", "output.export=false", "--set", "teacher_source.top_k=8"]
CHECK = {"DD_CHECK_DEVICES": "1"}


@pytest.mark.slow
def test_the_old_patterns_are_refused_and_their_fixes_pass():
    proc = run_cmd([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                    str(free_port()), "tests/device_check_probe.py"], timeout=900, **CHECK)
    results = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if line and line.split(" ", 1)[0].isidentifier())
    for case in ("host_tensor_to_default_group", "host_broadcast", "moved_to_host"):
        assert results[case].startswith("refused: device test mode: dist."), results
        assert "for a group that is NCCL on CUDA" in results[case] and "<" + case + ">:1" in results[case]
    assert results["host_ids_indexed_by_device_logits"].startswith("refused:") and \
        "mixes a tensor on the accelerator with one on the host" in results["host_ids_indexed_by_device_logits"]
    for case in ("device_tensor_to_default_group", "device_ids_indexed_by_device_logits", "host_tensor_to_gloo_group"):
        assert results[case] == "ok", results


@pytest.mark.slow
def test_zero3_training_checkpoint_and_resume_are_clean(tiny_world, tmp_path):
    """Items 1 and 2: 2 ranks with a colocated teacher (placed on local_device()), a checkpoint at step 2,
    the final one, then --resume: no host tensor meets a device group (the disk-space check, the save
    and resume agreements) and no op mixes host and device tensors."""
    args = [*world_overrides(tiny_world, tmp_path), *BASE, "--set", "output.save_every=2",
            "--set", "teacher_source.kind=colocated"]
    torchrun(2, "dist_distill.train", "configs/tiny/distill.yaml", *args, "--set", "optim.max_steps=2",
             timeout=600, **CHECK)
    proc = torchrun(2, "dist_distill.train", "configs/tiny/distill.yaml", *args, "--resume", timeout=600, **CHECK)
    assert "resumed from step 2" in proc.stdout
    steps = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps][-2:] == [3, 4]
    assert (tmp_path / "checkpoints/step-4/COMMITTED").is_file()


@pytest.mark.slow
def test_teacher_group_with_tensor_parallel_teacher_is_clean(tiny_world, tmp_path):
    """Item 3: 2 TP teacher ranks + 2 students: start step broadcast, vocab-parallel top-k and tails,
    the students' signals, all in the device test mode."""
    torchrun(4, "dist_distill.train", "configs/tiny/distill.yaml", *world_overrides(tiny_world, tmp_path), *BASE,
             "--set", "teacher_source.kind=group", "--set", "teacher_source.tp_size=2",
             "--set", "teacher_source.num_groups=1", timeout=600, **CHECK)
    steps = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 4


@pytest.mark.slow
def test_tensor_parallel_cache_build_is_clean(tiny_world, tmp_path):
    torchrun(2, "dist_distill.cache", "build", "configs/tiny/distill.yaml", *world_overrides(tiny_world, tmp_path),
             "--set", f"teacher_source.cache_dir={tmp_path}/cache", "--set", "teacher_source.tp_size=2",
             "--set", "teacher_source.top_k=8", "--samples-per-shard", "100", "--quiet", timeout=600, **CHECK)
    assert (tmp_path / "cache/manifest.json").is_file()

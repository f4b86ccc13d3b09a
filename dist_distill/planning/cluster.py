"""Where every rank of a job runs: SLURM's environment read into ranks, addresses and the teacher layout.

The launch/ wrappers call this module once per node (``python -m dist_distill.planning.cluster env``)
and ``eval`` the ``export`` lines it prints; tests feed it fake SLURM environments. Nothing here
starts a process.

Global ranks are node-major (node n, local rank l -> n * gpus_per_node + l), as torchrun with
``--node_rank`` and the deepspeed launcher with a hostfile number them. In a
``teacher_source.kind=group`` job the first ``tp_size * num_groups`` global ranks are teachers
(dist_distill.teacher.group.roles.split_world), so teachers fill the first node(s) and a TP group
must not cross a node boundary: its all-reduces need NVLink, not the inter-node network. At 64
GPUs (8 nodes x 8) with tp_size=8, num_groups=1: node 0 is the teacher group, nodes 1-7 hold the
56 ZeRO-3 student ranks.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from dataclasses import dataclass

from dist_distill.errors import UserError


def expand_hostlist(text: str) -> list[str]:
    """SLURM's compressed host list ("gpu[001-003,007],login-1") as host names, in order.

    Handles several bracket groups per name ("rack[1-2]-node[01-02]"), zero padding and
    comma-separated items; what ``scontrol show hostnames`` prints, without needing scontrol.
    """
    hosts: list[str] = []
    for item in _split_top_level(text.strip()):
        if not item:
            continue
        hosts.extend(_expand_item(item))
    if not hosts:
        raise UserError(f"SLURM_JOB_NODELIST={text!r}: no host names in it")
    return hosts


def _split_top_level(text: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise UserError(f"host list {text!r}: unbalanced ']'")
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if depth != 0:
        raise UserError(f"host list {text!r}: unbalanced '['")
    return parts + [cur]


def _expand_item(item: str) -> list[str]:
    m = re.search(r"\[([^\]]*)\]", item)
    if not m:
        return [item]
    head, tail = item[:m.start()], item[m.end():]
    out = []
    for rng in m.group(1).split(","):
        if re.fullmatch(r"\d+", rng):
            values = [rng]
        elif re.fullmatch(r"\d+-\d+", rng):
            lo, hi = rng.split("-")
            if int(hi) < int(lo):
                raise UserError(f"host list item {item!r}: range {rng} runs backwards")
            values = [str(v).zfill(len(lo)) for v in range(int(lo), int(hi) + 1)]
        else:
            raise UserError(f"host list item {item!r}: {rng!r} is not a number or a range like 01-04")
        for v in values:
            out.extend(_expand_item(head + v + tail))
    return out


def _gpus_per_node(env) -> int:
    """GPUs per node from SLURM_GPUS_ON_NODE, SLURM_GPUS_PER_NODE ("8" or "h100:8"), or CUDA_VISIBLE_DEVICES."""
    for key in ("DD_GPUS_PER_NODE", "SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        value = env.get(key)
        if value:
            m = re.search(r"(\d+)(\(|$)", value.split(",")[0])
            if not m:
                raise UserError(f"{key}={value!r}: expected a GPU count such as 8 or h100:8")
            return int(m.group(1))
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible:
        return len([d for d in visible.split(",") if d.strip()])
    raise UserError("cannot tell the GPUs per node: set DD_GPUS_PER_NODE, or request GPUs from SLURM "
                    "(--gpus-per-node=8), or set CUDA_VISIBLE_DEVICES")


@dataclass(frozen=True)
class NodeLayout:
    """One node's place in the job, as the launchers need it."""

    hosts: tuple[str, ...]
    """All nodes of the job, in SLURM's order; hosts[0] runs the rendezvous / MASTER_ADDR."""
    node_rank: int
    """This node's index in `hosts` (SLURM_NODEID)."""
    gpus_per_node: int
    master_port: int
    job_id: str

    @property
    def nodes(self) -> int:
        return len(self.hosts)

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def master_addr(self) -> str:
        return self.hosts[0]

    def global_ranks(self) -> list[int]:
        """Global ranks of this node's processes (local rank l -> node_rank * gpus_per_node + l)."""
        return [self.node_rank * self.gpus_per_node + i for i in range(self.gpus_per_node)]

    def exports(self) -> dict[str, str]:
        """The variables torchrun / the deepspeed launcher read: MASTER_ADDR, MASTER_PORT, NNODES, NODE_RANK,
        NPROC_PER_NODE, WORLD_SIZE, and a rendezvous id unique to the job (restarts of a requeued job too)."""
        return {"MASTER_ADDR": self.master_addr, "MASTER_PORT": str(self.master_port), "NNODES": str(self.nodes),
                "NODE_RANK": str(self.node_rank), "NPROC_PER_NODE": str(self.gpus_per_node),
                "WORLD_SIZE": str(self.world_size), "DD_RDZV_ID": f"dd-{self.job_id}"}


def layout_from_env(env) -> NodeLayout:
    """This node's layout from SLURM's variables (SLURM_JOB_NODELIST, SLURM_NODEID, SLURM_JOB_ID, GPUs per
    node); without SLURM, one node (localhost) with the GPUs of CUDA_VISIBLE_DEVICES / DD_GPUS_PER_NODE.
    MASTER_PORT: the environment's, else 29500 + SLURM_JOB_ID % 20000 (jobs sharing a node differ)."""
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    job = env.get("SLURM_JOB_ID", "local")
    if nodelist:
        hosts = expand_hostlist(nodelist)
        nnodes = env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES")
        if nnodes and int(nnodes) != len(hosts):
            raise UserError(f"SLURM_JOB_NUM_NODES={nnodes} but SLURM_JOB_NODELIST={nodelist!r} names {len(hosts)} hosts")
        if "SLURM_NODEID" in env:
            node = int(env["SLURM_NODEID"])
        elif env.get("SLURMD_NODENAME") in hosts:
            node = hosts.index(env["SLURMD_NODENAME"])
        else:
            raise UserError("SLURM_NODEID is not set: start one launcher per node with "
                            "srun --ntasks-per-node=1 (not from the batch script's shell alone)")
        if not 0 <= node < len(hosts):
            raise UserError(f"SLURM_NODEID={node} is outside the job's {len(hosts)} nodes")
    else:
        hosts, node = (env.get("MASTER_ADDR", "127.0.0.1"),), 0
    port = int(env["MASTER_PORT"]) if env.get("MASTER_PORT") else 29500 + (int(job) % 20000 if job.isdigit() else 0)
    return NodeLayout(tuple(hosts), node, _gpus_per_node(env), port, job)


@dataclass(frozen=True)
class RankRole:
    rank: int
    node: int
    local_rank: int
    role: str
    """"teacher" or "student"."""
    group: int | None = None
    """Teacher group index (teachers only)."""
    tp_rank: int | None = None
    """Rank within the teacher's TP group (teachers only)."""
    student_rank: int | None = None
    """Rank in the students' own ZeRO-3 world (students only)."""


def group_layout(nodes: int, gpus_per_node: int, tp_size: int = 0, num_groups: int = 0) -> list[RankRole]:
    """Every global rank's role in a job of `nodes` x `gpus_per_node` processes whose first
    ``tp_size * num_groups`` ranks are teachers (0, 0: no teacher group). Refuses a TP group that
    would cross a node boundary, and a layout that leaves fewer students than teacher groups."""
    world = nodes * gpus_per_node
    teachers = tp_size * num_groups
    if teachers:
        if tp_size > gpus_per_node or gpus_per_node % tp_size:
            raise UserError(f"teacher_source.tp_size={tp_size} must divide the {gpus_per_node} GPUs per node, so that "
                            "no tensor-parallel group spans two nodes (its all-reduces need the intra-node links)")
        if world - teachers < num_groups:
            raise UserError(f"{world} ranks ({nodes} nodes x {gpus_per_node}) leave {world - teachers} students for "
                            f"{num_groups} teacher group(s) of {tp_size}: add nodes or lower "
                            "teacher_source.num_groups / tp_size")
    out = []
    for rank in range(world):
        node, local = divmod(rank, gpus_per_node)
        if rank < teachers:
            out.append(RankRole(rank, node, local, "teacher", group=rank // tp_size, tp_rank=rank % tp_size))
        else:
            out.append(RankRole(rank, node, local, "student", student_rank=rank - teachers))
    return out


def describe_layout(roles: list[RankRole], gpus_per_node: int) -> list[str]:
    """One line per node: which local ranks are teacher (group.tp_rank) or student ranks."""
    lines = []
    for node in sorted({r.node for r in roles}):
        mine = [r for r in roles if r.node == node]
        teachers = [f"g{r.group}.tp{r.tp_rank}" for r in mine if r.role == "teacher"]
        students = [r.student_rank for r in mine if r.role == "student"]
        parts = []
        if teachers:
            parts.append(f"teachers {', '.join(teachers)}")
        if students:
            parts.append(f"students {students[0]}-{students[-1]}" if len(students) > 1 else f"student {students[0]}")
        lines.append(f"node {node}: " + "; ".join(parts))
    return lines


def main(argv: list[str] | None = None) -> int:
    import os

    parser = argparse.ArgumentParser(prog="python -m dist_distill.planning.cluster",
                                     description="Print this node's launch variables (from SLURM's environment) "
                                                 "as shell exports, or the hostfile of the job.")
    parser.add_argument("what", choices=("env", "hostfile", "layout"),
                        help="env: export lines for torchrun; hostfile: a deepspeed hostfile (host slots=N); "
                             "layout: the teacher/student role of every rank")
    parser.add_argument("--tp-size", type=int, default=0, help="teacher_source.tp_size (layout; 0: no teacher group)")
    parser.add_argument("--num-groups", type=int, default=0, help="teacher_source.num_groups (layout)")
    args = parser.parse_args(argv)
    layout = layout_from_env(os.environ)
    if args.what == "env":
        for key, value in layout.exports().items():
            print(f"export {key}={shlex.quote(value)}")
    elif args.what == "hostfile":
        for host in layout.hosts:
            print(f"{host} slots={layout.gpus_per_node}")
    else:
        roles = group_layout(layout.nodes, layout.gpus_per_node, args.tp_size, args.num_groups)
        print("\n".join(describe_layout(roles, layout.gpus_per_node)))
    return 0


if __name__ == "__main__":
    from dist_distill.errors import run_cli

    sys.exit(run_cli(main, "dd-cluster"))

"""Who is a teacher and who a student in a kind=group job, and the bridge process group between them."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

from dist_distill.errors import UserError

STARTUP_TIMEOUT_S = 1800.0
"""Fallback for deepspeed.startup_timeout_s: seconds allowed for start-up (model loading on the other
role) and for a student's slow step (checkpoint save) as seen from a teacher; dead peers are noticed
at once whatever this is."""
LOGITS_CHUNK_BYTES = 256 << 20
"""Budget of one vocab-parallel logits chunk on a teacher rank ([rows, V / tp] float32)."""


def startup_timeout_s(recipe) -> float:
    return max(recipe.teacher_source.timeout_s, getattr(recipe.deepspeed, "startup_timeout_s", STARTUP_TIMEOUT_S))


class TeacherGroupError(UserError):
    """The teacher group stopped answering (dead or hung rank) or sent something unexpected."""


@dataclass(frozen=True)
class Roles:
    """Who is who in a kind=group job of `world` processes (global ranks)."""

    rank: int
    world: int
    tp_size: int
    num_groups: int

    @property
    def num_teachers(self) -> int:
        return self.tp_size * self.num_groups

    @property
    def num_students(self) -> int:
        return self.world - self.num_teachers

    @property
    def is_teacher(self) -> bool:
        return self.rank < self.num_teachers

    @property
    def group(self) -> int:
        return self.rank // self.tp_size

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    def leader_of(self, student: int) -> int:
        """Global rank of the teacher rank that sends to student `student`."""
        return (student % self.num_groups) * self.tp_size

    def students_of(self, group: int) -> list[int]:
        return [s for s in range(self.num_students) if s % self.num_groups == group]

    def check(self) -> None:
        if self.num_students < self.num_groups:
            raise UserError(f"teacher_source.kind=group with teacher_source.tp_size={self.tp_size} x "
                            f"teacher_source.num_groups={self.num_groups} = {self.num_teachers} teacher ranks leaves "
                            f"{self.num_students} student ranks of {self.world}: launch at least "
                            f"{self.num_teachers + self.num_groups} processes, or lower tp_size / num_groups")



# ---- role split and bridge -------------------------------------------------------------------------
_BRIDGE: tuple[Roles, object] | None = None
"""(roles, bridge process group) of this process once :func:`split_world` ran (student side)."""


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def route_address(master: str, port: int) -> str:
    """This host's address on the interface that reaches `master` (a UDP socket's connect picks the
    route and sends nothing)."""
    family = socket.AF_INET6 if ":" in master else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect((master, port))
        return s.getsockname()[0]


def host_address(env=os.environ, route=route_address) -> str:
    """Where this process's role peers reach it (the role's rank 0 publishes it in the bridge store).

    On one node (LOCAL_WORLD_SIZE == WORLD_SIZE, or a loopback MASTER_ADDR): MASTER_ADDR. Across
    nodes: the address of the interface that routes to MASTER_ADDR (which torchrun, the deepspeed
    launcher and our SLURM wrappers set; SLURM_LAUNCH_NODE_IPADDR as a fallback) -- never
    ``gethostbyname(gethostname())``, which on common images resolves to 127.0.1.1. At 64 GPUs
    on 8 nodes the student role's rank 0 sits on a node other than the master's, so its peers
    need this address, not a loopback one.
    """
    master = env.get("MASTER_ADDR") or env.get("SLURM_LAUNCH_NODE_IPADDR") or "127.0.0.1"
    one_node = env.get("LOCAL_WORLD_SIZE", env.get("WORLD_SIZE")) == env.get("WORLD_SIZE")
    if master in LOOPBACK or one_node:
        return master
    address = route(master, int(env.get("MASTER_PORT", "29500")))
    if address.startswith("127.") or address == "::1":
        raise UserError(f"teacher group: the interface that reaches MASTER_ADDR={master} has the loopback address "
                        f"{address}; a multi-node job needs MASTER_ADDR set to the first node's network address")
    return address


def _role_env(roles: Roles, store) -> None:
    """Rewrite RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT so that `init_process_group(env://)` builds
    this role's own world; the role's rank 0 picks a free port and publishes it in the bridge store."""
    from dist_distill.training.distributed import free_port

    role = "teacher" if roles.is_teacher else "student"
    role_rank = roles.rank if roles.is_teacher else roles.rank - roles.num_teachers
    role_world = roles.num_teachers if roles.is_teacher else roles.num_students
    if role_rank == 0:
        store.set(f"{role}/addr", host_address())
        store.set(f"{role}/port", str(free_port()))
    os.environ.update(RANK=str(role_rank), WORLD_SIZE=str(role_world), TORCHELASTIC_USE_AGENT_STORE="False",
                      MASTER_ADDR=store.get(f"{role}/addr").decode(), MASTER_PORT=store.get(f"{role}/port").decode(),
                      DD_ROLE=role, DD_GLOBAL_RANK=str(roles.rank))


def split_world(recipe) -> tuple[Roles, object] | None:
    """For teacher_source.kind=group: split the launcher's world into teacher and student roles.

    Returns (roles, bridge group) with this role's own world in the environment: a teacher rank
    then serves (:func:`dist_distill.teacher.group.server.serve`); a student rank's DeepSpeed
    builds its default group over the students only, and the bridge is kept for
    :class:`~dist_distill.teacher.group.client.GroupTeacher`. Any other kind: returns None and
    changes nothing.
    """
    global _BRIDGE
    ts = recipe.teacher_source
    if ts.kind != "group":
        return None
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    roles = Roles(rank, world, ts.tp_size, ts.num_groups)
    roles.check()
    addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = int(os.environ.get("DD_BRIDGE_PORT", int(os.environ.get("MASTER_PORT", "29500")) + 1))
    startup = timedelta(seconds=startup_timeout_s(recipe))
    store = dist.TCPStore(addr, port, world, rank == 0, timeout=startup)
    bridge = dist.ProcessGroupGloo(dist.PrefixStore("dd-bridge", store), rank, world, startup)
    _role_env(roles, store)
    if not roles.is_teacher:
        _BRIDGE = (roles, bridge)
    return roles, bridge


def bridge() -> tuple[Roles, object]:
    if _BRIDGE is None:
        raise UserError("teacher_source.kind=group: this process joined no teacher group; launch through "
                        "dd-train (torchrun/deepspeed) so that split_world runs before the trainer")
    return _BRIDGE


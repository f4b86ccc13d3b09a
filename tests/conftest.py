"""Shared fixtures: a small tiny world built once per session, and a torchrun helper."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from dist_distill.training.distributed import free_port

REPO = Path(__file__).resolve().parents[1]
# `python -m pytest` from the root puts the root on sys.path, where kernels/ would pass for the PyPI
# `kernels` package (transformers probes for it); launch/test.sh also sets PYTHONSAFEPATH=1
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO]

# Token stores (data/store.py) of this test session in one temporary folder, inherited by subprocesses,
# instead of ~/.cache/dist_distill/token_store. Each pytest-xdist worker makes its own in pytest_configure
# (the controller's folder reaches the workers through the environment). A helper script that imports this
# module in a test's subprocess (every rank of a torchrun) keeps the folder it inherited, so its ranks
# share one store; a DD_DATA_STORE set by the user before pytest is kept too.
if "DD_DATA_STORE" not in os.environ:
    os.environ["DD_DATA_STORE"] = tempfile.mkdtemp(prefix="dd-test-store-")
    os.environ["DD_TEST_STORE_FROM_CONFTEST"] = "1"

# Triton kernels on CPU tensors run under the interpreter, which Triton reads when a kernel is defined: set it
# before any test module imports the kernels (with pytest-xdist a worker's first file may be any file).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Small tensors on 2 shared cores: one intra-op thread is much faster and avoids oversubscription.
torch.set_num_threads(1)


def quiet_env(**extra: str) -> dict:
    """The environment of a test's subprocess: quiet, one thread, PYTHONSAFEPATH=1 (the repository root is
    never on sys.path, see test_layout), and tests/ on PYTHONPATH for helper scripts run by path."""
    return dict(os.environ, PYTHONWARNINGS="ignore", TRANSFORMERS_VERBOSITY="error", DS_ACCELERATOR="cpu",
                OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONSAFEPATH="1",
                PYTHONPATH=os.pathsep.join(filter(None, [str(REPO / "tests"), os.environ.get("PYTHONPATH")])), **extra)


def run_cmd(args: list[str], timeout: float = 600, check: bool = True, **env: str) -> subprocess.CompletedProcess:
    """Run a command from the repository root; on unexpected failure show its output."""
    proc = subprocess.run(args, cwd=REPO, env=quiet_env(**env), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n"
                             f"--- stderr\n{proc.stderr[-6000:]}")
    return proc


def torchrun(nproc: int, module: str, *args: str, **kw) -> subprocess.CompletedProcess:
    return run_cmd([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                    "--master_port", str(free_port()), "-m", module, *args], **kw)


def module_cmd(module: str, *args: str, **kw) -> subprocess.CompletedProcess:
    return run_cmd([sys.executable, "-m", module, *args], **kw)


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> Path:
    """A small world: 2000 teacher records, 256 student records, 64 held-out, untrained models."""
    from dist_distill.tiny_world import build_world

    out = tmp_path_factory.mktemp("world")
    build_world(out, teacher_samples=2000, student_samples=256, num_heldout=64, seed=3)
    return out


def mount_tmpfs(path: Path, size: int) -> None:
    """Mount a tmpfs of `size` bytes (a small disk to fill) at `path`; skips the test without root."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")


def world_overrides(world: Path, out: Path, cache: bool = True) -> list[str]:
    """--set overrides pointing configs/tiny/distill.yaml at a test world (teacher = untrained teacher_init)."""
    sets = [f"student.name_or_path={world}/student_init", f"teacher.name_or_path={world}/teacher_init",
            f"data.train={world}/data/student_train.jsonl", f"data.eval={world}/data/heldout.jsonl",
            f"teacher_source.cache_dir={world}/cache", f"output.dir={out}"]
    if not cache:
        sets += ["teacher_source.kind=none", "loss.ce_weight=1.0"]
    return [x for s in sets for x in ("--set", s)]


# ---- reliability accounting: tests declare what they inject; the summary counts what passed ----
_COUNTS = {"faults": 0, "bad_inputs": 0}


def pytest_configure(config):
    if hasattr(config, "workerinput") and os.environ.get("DD_TEST_STORE_FROM_CONFTEST") == "1":  # an xdist worker
        os.environ["DD_DATA_STORE"] = tempfile.mkdtemp(prefix="dd-test-store-")
    config.addinivalue_line("markers", "faults(n): the test injects n faults and passes only if all are survived")
    config.addinivalue_line("markers", "bad_inputs(n): the test feeds n bad inputs and checks each clear error")


def pytest_runtest_logreport(report):
    if report.when == "call" and report.passed:
        for name in _COUNTS:
            for value in getattr(report, "user_properties", []):
                if value[0] == name:
                    _COUNTS[name] += value[1]


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    for name in _COUNTS:
        marker = item.get_closest_marker(name)
        if marker is not None:
            item.user_properties.append((name, marker.args[0] if marker.args else 1))


def pytest_terminal_summary(terminalreporter):
    if any(_COUNTS.values()):
        terminalreporter.write_line(f"reliability: {_COUNTS['faults']} injected faults survived; "
                                    f"{_COUNTS['bad_inputs']} bad inputs refused with a clear error")

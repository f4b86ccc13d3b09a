"""The package's shape: no import cycles, thin command modules, and no `kernels` shadowing from the root."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, quiet_env

PACKAGE = REPO / "dist_distill"
COMMANDS = ("train", "cache", "evaluate", "export", "quickstart", "tiny_world", "generate")


def module_name(path: Path) -> str:
    """Import name of a source file of the package (kernels/ is mapped to dist_distill.kernels)."""
    if path.is_relative_to(REPO / "kernels"):
        parts = ("dist_distill", "kernels", *path.relative_to(REPO / "kernels").with_suffix("").parts)
    else:
        parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    files = list(PACKAGE.rglob("*.py")) + list((REPO / "kernels").rglob("*.py"))
    return {module_name(f): f for f in files}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Package modules that `name` imports anywhere in its file (module level or inside functions)."""
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        out.update(t for t in targets if t in known and t != name)
    return out


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph as a list of nodes (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_find_cycle_detects_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a"}}) is None


def test_no_import_cycles_in_the_package():
    """Every import counts, lazy ones inside functions too: a cycle broken by a lazy import is still
    two modules that need each other."""
    modules = package_modules()
    graph = {name: imports_of(name, path, set(modules)) for name, path in modules.items()}
    assert "dist_distill.teacher.scorer" in graph["dist_distill.teacher.cache.writer"]  # the parser sees imports
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_command_modules_are_thin():
    """Commands parse arguments and call the library; none defines a class, none is long."""
    for command in COMMANDS[:4] + ("generate",):
        tree = ast.parse((PACKAGE / f"{command}.py").read_text())
        assert not [n for n in tree.body if isinstance(n, ast.ClassDef)], command
        assert len((PACKAGE / f"{command}.py").read_text().splitlines()) < 130, command


def test_every_subpackage_has_one_job_in_its_docstring():
    for init in PACKAGE.rglob("__init__.py"):
        assert ast.get_docstring(ast.parse(init.read_text())), f"{init} has no docstring saying what it holds"


@pytest.mark.parametrize("command", COMMANDS)
def test_python_m_commands_answer_help(command):
    proc = subprocess.run([sys.executable, "-m", f"dist_distill.{command}", "--help"], cwd=REPO, env=quiet_env(),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and "usage" in proc.stdout.lower(), proc.stderr[-2000:]


PROBE = "import importlib.util, sys; s = importlib.util.find_spec('kernels'); print(s.origin if s else None)"


def test_repository_kernels_folder_does_not_shadow_the_pypi_package():
    """Run from the repository root as the launchers and the tests run (PYTHONSAFEPATH=1), Python does
    not find our kernels/ folder as a top-level `kernels` package (the HF kernel hub's name); without
    it, it would -- which is why every launcher sets it."""
    ours = str(REPO / "kernels" / "__init__.py")
    env = quiet_env()
    assert env.get("PYTHONSAFEPATH") == "1"
    safe = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert safe.returncode == 0 and safe.stdout.strip() != ours, safe.stdout
    unsafe_env = {k: v for k, v in env.items() if k != "PYTHONSAFEPATH"}
    unsafe = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=unsafe_env, capture_output=True, text=True,
                            timeout=60)
    assert unsafe.stdout.strip() == ours  # the shadowing is real without the setting
    for launcher in ("launch/test.sh", "launch/quickstart.sh", ".ci/run"):
        assert "PYTHONSAFEPATH=1" in (REPO / launcher).read_text(), launcher
    assert str(REPO) not in [os.path.abspath(p or ".") for p in sys.path]  # conftest dropped it here too


def test_deepspeed_cpu_comm_op_is_built_in_setup_not_in_a_test():
    """DeepSpeed's CPU accelerator JIT-builds its deepspeed_shm_comm C++ op at first use (1-5 minutes);
    launch/setup_env.sh builds it into .venv/torch_extensions and launch/test.sh points every test
    there, so no timed test pays for the build."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("the CPU comm op is only used without CUDA")
    folder = os.environ.get("TORCH_EXTENSIONS_DIR")
    assert folder, "run the suite through launch/test.sh (it exports TORCH_EXTENSIONS_DIR)"
    assert list(Path(folder).rglob("deepspeed_shm_comm*.so")), f"not built in {folder}"


def test_gpu_check_parses_and_says_no_gpu_on_cpu(tmp_path):
    script = REPO / "launch" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: run launch/gpu_check.sh itself")
    proc = subprocess.run(["bash", str(script), str(tmp_path / "out")], cwd=REPO, env=quiet_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().splitlines() == [
        "gpu_check: no GPU here (torch.cuda.is_available() is False): nothing to check"]

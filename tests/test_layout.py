"""The package's shape: no module imports another that imports it back, earlier module paths still
import, and the commands that need no PyTorch start without importing it."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import denselora as dl

from conftest import tiny_llama

PACKAGE = Path(dl.__file__).resolve().parent


def _modules() -> dict[str, Path]:
    """Dotted name -> file of every module of the package (a package is its ``__init__.py``; the
    compiled ``_core`` is its stub)."""
    found = {}
    for path in [*PACKAGE.rglob("*.py"), *PACKAGE.rglob("*.pyi")]:
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that ``name`` imports anywhere in its code (in functions too), and
    those it hands on lazily through ``attach`` (`denselora._lazy`)."""
    is_package = path.name == "__init__.py"
    here = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "attach":
            exports = node.args[1] if len(node.args) > 1 else None
            listed = [k.value for k in exports.keys] if isinstance(exports, ast.Dict) else []
            for keyword in node.keywords:
                if keyword.arg == "submodules" and isinstance(keyword.value, ast.List):
                    listed += [element.value for element in keyword.value.elts]
            targets = [f"{name}.{module}" for module in listed]
        else:
            continue
        found.update(t for t in targets if t in modules and t != name)
    return found


def test_no_module_imports_one_that_imports_it_back():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    # Tarjan's strongly connected components: a component of two or more modules is a circle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for name in sorted(graph):
        if name not in index:
            visit(name)
    assert len(graph) > 20 and any(graph.values())  # the scan sees the package
    assert circles == []


@pytest.mark.parametrize(
    "earlier, now, names",
    [
        ("denselora.bundle", "denselora.io.bundle", ["Bundle", "pack"]),
        ("denselora.data", "denselora.training.data", ["Example", "TokenizedDataset", "load_examples", "split_examples"]),
        ("denselora.evaluation", "denselora.training.evaluation", ["multiple_choice_accuracy", "generation_accuracy"]),
        ("denselora.optim", "denselora.training.optim", ["create_optimizer", "param_groups"]),
        ("denselora.io", "denselora.io.adapter", ["load_adapter", "save_adapter", "save_adapter_to"]),
        ("denselora.training", "denselora.training.loop", ["train", "evaluate_loss", "token_loss_sum"]),
        ("denselora.kernels", "denselora.kernels.fused", ["fused_branch", "set_num_threads", "isa", "available_isas"]),
    ],
)
def test_earlier_module_paths_still_import(earlier, now, names):
    import importlib

    old, new = importlib.import_module(earlier), importlib.import_module(now)
    for name in names:
        assert getattr(old, name) is getattr(new, name), name


def test_the_package_hands_on_every_public_name():
    for name in dl.__all__:
        assert getattr(dl, name) is not None, name
    for name in dl.io.__all__:
        assert getattr(dl.io, name) is not None, name
    assert dl.kernels.fused_branch is dl.kernels.fused.fused_branch
    with pytest.raises(AttributeError):
        dl.no_such_name  # noqa: B018


def _imported_packages(stderr: str) -> set[str]:
    """Top-level packages in the ``-X importtime`` report of a process."""
    found = set()
    for line in stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            found.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return found


def _run(tmp_path: Path, *args: str, code: str | None = None) -> tuple[subprocess.CompletedProcess, set[str]]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PACKAGE.parent), os.environ.get("PYTHONPATH", "")])}
    launcher = ["-c", code] if code else ["-m", "denselora.cli"]
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", *launcher, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    return proc, _imported_packages(proc.stderr)


def test_storage_commands_start_without_pytorch(tmp_path):
    model = dl.get_denselora_model(tiny_llama(), dl.DenseLoRAConfig(r=4))
    model.save_pretrained(tmp_path / "adapters" / "a")
    bundle = str(tmp_path / "all.dl")
    commands = [
        ["--help"],
        ["pack", str(tmp_path / "adapters"), "-o", bundle],
        ["inspect", bundle],
        ["verify", bundle],
        ["unpack", bundle, "-o", str(tmp_path / "out")],
    ]
    for args in commands:
        proc, imported = _run(tmp_path, *args)
        assert proc.returncode == 0, (args, proc.stderr[-2000:])
        assert "denselora" in imported  # the report is read
        assert not imported & {"torch", "transformers"}, args
    assert (tmp_path / "out" / "a" / "adapter.safetensors").is_file()
    proc, imported = _run(tmp_path, str(tmp_path / "adapters"), "-o", str(tmp_path / "again.dl"), code="import sys; from denselora.cli import pack_main; sys.exit(pack_main())")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not imported & {"torch", "transformers"}
    # The commands that need PyTorch import it, and the report shows it.
    proc, imported = _run(tmp_path, "merge", "--help")
    assert proc.returncode == 0 and "torch" in imported

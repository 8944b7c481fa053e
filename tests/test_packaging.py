"""How the project is put together: layering, no import circle, collision-free wheel."""

from __future__ import annotations

import ast
import inspect
import os
import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: Source folders and the import names they install under (pyproject's package-dir).
PACKAGES = {"somp_ref": "somp_ref", "adapters": "somp_ref.adapters", "verify": "somp_ref.verify"}
#: The optional parts; everything else is the numpy/scipy core, which must never import
#: them or the libraries they need, directly or lazily.
ADDONS = ("somp_ref.adapters", "somp_ref.verify")
CORE_FORBIDDEN = ("torch", "transformers", "accelerate", *ADDONS)


def project_modules() -> dict[str, Path]:
    """Import name -> source file of every module the wheel installs."""
    modules = {}
    for folder, name in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((name, *parts))] = path
    return modules


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """Every name ``path`` imports, at module level or inside functions (a lazy import is
    still a dependency: it only hides a circle until the function runs)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                qualified = f"{node.module}.{alias.name}"
                found.add(qualified if qualified in modules else node.module)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {
        name: {dep for dep in imports_of(path, modules) if dep in modules and dep != name}
        for name, path in modules.items()
    }


def test_pyproject_lists_every_package():
    # setuptools installs only the packages pyproject names (package-dir maps the folders),
    # so a new subpackage missing from the list would be absent from the wheel.
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    config = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))["tool"]["setuptools"]
    on_disk = {
        ".".join((PACKAGES[folder], *init.parent.relative_to(ROOT / folder).parts))
        for folder in PACKAGES
        for init in (ROOT / folder).rglob("__init__.py")
    }
    assert set(config["packages"]) == on_disk


def test_the_core_never_imports_torch_adapters_or_verify():
    modules = project_modules()
    core = {n: p for n, p in modules.items() if not n.startswith(ADDONS)}
    offenders = {
        name: sorted(d for d in imports_of(path, modules) if d.startswith(CORE_FORBIDDEN))
        for name, path in core.items()
    }
    assert {n: d for n, d in offenders.items() if d} == {}


def test_no_module_imports_the_old_top_level_names():
    modules = project_modules()
    stale = {
        name: sorted(d for d in imports_of(path, modules) if d.split(".")[0] in PACKAGES)
        for name, path in modules.items()
    }
    assert {n: d for n, d in stale.items() if any(not x.startswith("somp_ref") for x in d)} == {}


def test_no_import_circle():
    graph = import_graph()
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(path[path.index(dep) :] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_the_walk_sees_lazy_imports(tmp_path):
    # The graph must count an import inside a function: that is how circles hide.
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from somp_ref.adapters.report import write_report\n")
    modules = {"somp_ref.adapters.report": source}
    assert imports_of(source, modules) == {"somp_ref.adapters.report"}


def _venv_python(folder: Path) -> Path:
    venv.EnvBuilder(with_pip=True).create(folder)
    return folder / ("Scripts" if os.name == "nt" else "bin") / "python"


def _core_dependencies() -> list[str]:
    """The requirements of pyproject.toml's ``dependencies = [...]`` (tomllib is 3.11+)."""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    block = re.search(r"^dependencies = \[(.*?)^\]", text, flags=re.S | re.M)[1]
    return re.findall(r'^\s*"([^"]+)"', block, flags=re.M)


def test_the_core_dependencies_are_read_from_pyproject():
    found = _core_dependencies()
    assert {"numpy", "scipy", "safetensors", "threadpoolctl"} <= {
        re.split(r"[<>=!~ ]", requirement)[0] for requirement in found
    }, found


@pytest.mark.packaging
def test_the_wheel_installs_beside_adapterhub_and_verify(tmp_path):
    """Our wheel and PyPI's ``adapters`` (AdapterHub) and ``verify`` share no import name."""
    # Build from a copy: setuptools writes build/ and *.egg-info/ beside the sources.
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".*", "build", "*.egg-info"))
    wheels = tmp_path / "wheels"
    pip = [sys.executable, "-m", "pip"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(source)],
        check=True,
    )
    python = str(_venv_python(tmp_path / "venv"))
    quiet = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    # torch first, pinned (the local CPU wheel); then ours without its dependencies, then
    # the two distributions we once collided with, with theirs (AdapterHub pins
    # transformers 4.x), and our core dependencies as pyproject.toml lists them.
    subprocess.run([*quiet, "torch==2.13.0"], check=True)
    ours = next(wheels.glob("somp_ref-*.whl"))
    subprocess.run([*quiet, "--no-deps", str(ours)], check=True)
    subprocess.run([*quiet, "adapters", "verify", *_core_dependencies()], check=True)
    probe = (
        "import adapters, verify, somp_ref.adapters, somp_ref.verify.ports\n"
        "import somp_ref.heads, somp_ref.store, somp_ref.cli\n"
        "import somp_ref.adapters.torch_somp\n"
        "from somp_ref.verify.ports import golden_cases\n"
        "assert len(golden_cases()) >= 10\n"
        "assert hasattr(adapters, 'AutoAdapterModel'), adapters.__file__\n"
        "assert hasattr(verify, 'expect'), verify.__file__\n"
        "print(adapters.__file__); print(verify.__file__); print(somp_ref.adapters.__file__)\n"
    )
    done = subprocess.run([python, "-c", probe], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    theirs_adapters, theirs_verify, ours_adapters = done.stdout.split()
    assert Path(theirs_adapters).parent.name == "adapters"
    assert Path(theirs_verify).parent.name == "verify"
    assert Path(ours_adapters).parent.parent.name == "somp_ref"


def test_the_python_api_names_stay_functions_once_their_modules_are_imported():
    # A submodule named like an API function would replace it on the package as soon as
    # anything imports that submodule ("'module' object is not callable").
    pytest.importorskip("torch")
    import importlib

    import somp_ref.adapters as api

    for name, module in api._API.items():
        importlib.import_module(module)
        assert callable(getattr(api, name)) and not inspect.ismodule(getattr(api, name)), name

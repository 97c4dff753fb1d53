"""The dependency rule: model/ -> export/ -> service/ (-> release/), never backwards; the attack
catalogue (attacks/) and the benchmarks (bench/) stand outside the pipeline and nothing in it
imports them."""

import ast
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "model": {"export", "service", "release"},
    "export": {"service", "release"},
    "service": {"torch", "torchvision", "model", "export", "release", "bench", "attacks"},
    # A client of the service, like any other: it reaches the service only through its protocols
    # (and the OIP's generated messages), so it runs against any server.
    "attacks": {"torch", "torchvision", "model", "export", "release", "bench"},
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_import_against_the_pipeline(package):
    offenders = {
        str(path.relative_to(ROOT)): sorted(_imports(path) & FORBIDDEN[package])
        for path in (ROOT / package).rglob("*.py")
    }
    assert not {k: v for k, v in offenders.items() if v}


def test_importing_every_service_module_loads_no_torch():
    code = """
import importlib, json, pkgutil, sys
import service
for info in pkgutil.walk_packages(service.__path__, "service."):
    importlib.import_module(info.name)
print(json.dumps(sorted(m for m in ("torch", "torchvision", "model", "export") if m in sys.modules)))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_ssd_serve_command_path_loads_no_torch():
    code = "import sys, cli; cli.build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _closure(packages: dict[str, dict], roots: set[str]) -> set[str]:
    seen, todo = set(), list(roots)
    while todo:
        name = todo.pop()
        if name in seen or name not in packages:
            continue
        seen.add(name)
        for dep in packages[name].get("dependencies", []):
            todo.append(dep["name"])
        for extra_deps in packages[name].get("optional-dependencies", {}).values():
            todo.extend(d["name"] for d in extra_deps)
    return seen


def test_serving_install_pulls_no_torch():
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    packages = {p["name"]: p for p in lock["package"]}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["dependency-groups"]["serving"] == ["ssd-detector[serve]"]  # uv's group: the extra
    serving = {dep["name"] for dep in packages["ssd-detector"]["optional-dependencies"]["serve"]}
    installed = _closure(packages, serving)
    assert "fastapi" in installed and "onnxruntime-gpu" in installed  # the walk really ran
    assert not installed & {"torch", "torchvision", "onnx", "onnxscript"}, sorted(installed)


def _module_imports(path: Path, package_root: Path) -> set[str]:
    """Project modules imported anywhere in the file, inside functions too (a lazy import still
    ties the two modules together), but not under ``if TYPE_CHECKING``."""
    module = ".".join(path.relative_to(package_root).with_suffix("").parts).removesuffix(".__init__")
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    tree = ast.parse(path.read_text())
    typing_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING")
        for inner in ast.walk(node)
    }
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            names.add(base)
            names |= {f"{base}.{alias.name}" for alias in node.names}
    return names


def test_only_the_benchmarks_tests_import_bench():
    """The tests' own helpers (the attack catalogue, the calibrated model) live outside bench/, so
    a test of the product never depends on a benchmark's code."""
    allowed = {"test_bench.py", "test_peers.py"}
    importers = sorted(
        path.name
        for path in (ROOT / "tests").rglob("*.py")
        if "bench" in _imports(path) and path.name not in allowed
    )
    assert not importers


def test_no_import_circles():
    modules = {}
    for package in ("model", "export", "service", "bench", "attacks"):
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            modules[name] = path
    graph = {
        name: {m for m in _module_imports(path, ROOT) if m in modules and m != name}
        for name, path in modules.items()
    }

    def cycle_from(start: str) -> list[str] | None:
        stack, seen = [(start, [start])], set()
        while stack:
            node, trail = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    return [*trail, start]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*trail, nxt]))
        return None

    circles = [c for c in map(cycle_from, graph) if c]
    assert not circles, circles[0]


def test_model_facts_load_without_torch():
    """The registry (recipes, torchvision names) and the export defaults import no torch: the `ssd`
    command reads them to build its parsers, `ssd serve` included."""
    code = (
        "import sys, model.registry, model.config, export.cli\n"
        "assert model.registry.MODELS['ssd300_vgg16'].recipe.lr > 0\n"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# A relative path that climbs out of the repository (one or more parent steps, then names).
_CLIMB = re.compile(r"(?<![\w./])((?:\.\./)+[\w.-]+(?:/[\w.-]+)*)")
# An absolute path to a sibling of this checkout (its parent folder, then another name); none
# where the checkout sits at the root. From where the checkout is, not a list of names.
_SIBLING = (
    re.compile(re.escape(str(ROOT.parent).rstrip("/")) + r"/(?!" + re.escape(ROOT.name) + r"\b)[\w.-]")
    if ROOT.parent != ROOT.parent.parent
    else None
)


def test_no_tracked_file_points_outside_the_repository():
    """The repository stands alone: nothing it holds names a file beside it (a clone has none)."""
    tracked = (
        subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
        .stdout.decode()
        .split("\0")
    )
    found = []
    for name in filter(None, tracked):
        path = ROOT / name
        if path.suffix in (".jpg", ".png", ".onnx", ".pt", ".pb") or not path.is_file():
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            for match in _CLIMB.finditer(line):
                # Outside from the file's folder and from the root (commands run there): both.
                target = match.group(1)
                if all(not (base / target).resolve().is_relative_to(ROOT) for base in (path.parent, ROOT)):
                    found.append(f"{name}:{number}: {target}")
            if _SIBLING is not None and _SIBLING.search(line):
                found.append(f"{name}:{number}: {line.strip()[:80]}")
    assert not found, "paths outside the repository:\n" + "\n".join(found)

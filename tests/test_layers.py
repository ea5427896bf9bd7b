"""The floors of the code base and who may import what (docs/design.md, "Layout").

Each package of swapfs is a floor that imports only the floors below it, and
only by their faces: ``from swapfs.engine import Volume``, never
``from swapfs.engine.volume import Volume``, from outside the engine. A
face is the package's ``__init__`` and its ``__all__``. The engine's own
unit tests (tests/engine) and the bit-flip campaign (tools/bitflip.py, which
must know the bytes it damages) may reach inside the engine.

Read from the source with :mod:`ast`, imports inside functions and under
``TYPE_CHECKING`` included: a cycle a type hint hides is still a cycle.
"""

import ast
import importlib
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("engine", "cache", "control", "guest", "cli")

#: The swapfs floors each part of the tree may import (by face).
ALLOWED = {
    "swapfs.engine": set(),
    "swapfs.control": set(),
    "swapfs.cache": {"swapfs.engine"},
    "swapfs.guest": {"swapfs.control"},
    "swapfs.cli": {"swapfs.engine", "swapfs.cache", "swapfs.control"},
    "mountd": {f"swapfs.{name}" for name in PACKAGES},
    "tools": {"mountd", *(f"swapfs.{name}" for name in PACKAGES)},
    "tests": {"mountd", *(f"swapfs.{name}" for name in PACKAGES)},
}
#: Files that may import the engine's modules, not only its face.
INSIDE_THE_ENGINE = ("tests/engine/", "tools/bitflip.py")


def _sources() -> Iterator[Path]:
    for top in ("swapfs", "mountd", "tools", "tests"):
        yield from sorted((ROOT / top).rglob("*.py"))


def _part(path: Path) -> str:
    """The key of ALLOWED that *path* falls under."""
    parts = path.relative_to(ROOT).parts
    return f"swapfs.{parts[1]}" if parts[0] == "swapfs" else parts[0]


def _imports(path: Path) -> Iterator[tuple[int, str, list[str]]]:
    """(line, module, names) of every import in *path*, those of the Python
    a test hands a child process as a string included; ``from swapfs import
    cache`` counts as an import of ``swapfs.cache``."""
    tree = ast.parse(path.read_text(), str(path))
    yield from _imports_in(tree, 0)
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and "import " in node.value:
            try:
                script = ast.parse(node.value)
            except SyntaxError:
                continue  # prose, not a script
            yield from _imports_in(script, node.lineno - 1)


def _imports_in(tree: ast.AST, offset: int) -> Iterator[tuple[int, str, list[str]]]:
    for node in ast.walk(tree):
        line = offset + getattr(node, "lineno", 0)
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield line, alias.name, []
        elif isinstance(node, ast.ImportFrom) and node.level:
            yield line, "." * node.level + (node.module or ""), []
        elif isinstance(node, ast.ImportFrom) and node.module == "swapfs":
            for alias in node.names:
                yield line, f"swapfs.{alias.name}", []
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield line, node.module, [alias.name for alias in node.names]


def _floor(module: str) -> str | None:
    """The floor *module* belongs to (swapfs.engine.index: swapfs.engine;
    mountd.link: mountd), None for one outside the project."""
    parts = module.split(".")
    if parts[0] == "mountd":
        return "mountd"
    if parts[0] != "swapfs" or len(parts) < 2:
        return None
    return ".".join(parts[:2])


def test_swapfs_holds_only_packages() -> None:
    """The old flat modules are gone: no shim stands in for them."""
    files = sorted(path.name for path in (ROOT / "swapfs").iterdir()
                   if path.is_file() or path.name == "__pycache__")
    # An extension module left by a build of the flat package would import
    # as the old module: a shim nobody wrote.
    assert files in (["__init__.py"], ["__init__.py", "__pycache__"])
    packages = sorted(path.name for path in (ROOT / "swapfs").iterdir()
                      if (path / "__init__.py").exists())
    assert packages == sorted(PACKAGES)


def test_each_floor_imports_only_the_floors_below_it_by_their_faces() -> None:
    wrong = []
    for path in _sources():
        part = _part(path)
        relative = str(path.relative_to(ROOT))
        for line, module, names in _imports(path):
            where = f"{relative}:{line}: {module}"
            if module.startswith("."):
                wrong.append(f"{where}: a relative import; name the module")
                continue
            floor = _floor(module)
            if floor is None or floor == part:
                continue
            inside = floor == "swapfs.engine" and relative.startswith(INSIDE_THE_ENGINE)
            if floor not in ALLOWED[part]:
                wrong.append(f"{where}: {part} may not import {floor}")
            elif inside or floor == "mountd":  # the daemon is the top: no face
                continue
            elif module != floor:
                wrong.append(f"{where}: import {floor}'s face, not its module")
            else:
                face = importlib.import_module(floor)
                missing = [name for name in names if name not in face.__all__]
                if missing:
                    wrong.append(f"{where}: {missing} not in {floor}.__all__")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("package", PACKAGES)
def test_a_face_exports_what_it_names(package: str) -> None:
    face = importlib.import_module(f"swapfs.{package}")
    assert len(set(face.__all__)) == len(face.__all__)
    for name in face.__all__:
        assert hasattr(face, name), f"swapfs.{package}.__all__ names {name}, which it lacks"


def test_the_daemons_modules_import_each_other_without_a_cycle() -> None:
    graph: dict[str, set[str]] = {}
    for path in sorted((ROOT / "mountd").rglob("*.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        graph[name] = {module for _, module, _ in _imports(path)
                       if module.startswith("mountd.") or module == "mountd"}
        graph[name] |= {f"{module}.{item}" for _, module, names in _imports(path)
                        if module.startswith("mountd") for item in names}
    graph = {name: {target for target in targets if target in graph and target != name}
             for name, targets in graph.items()}
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(name):] + [name]))
        if name in done:
            return
        for target in sorted(graph[name]):
            visit(target, [*path, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])


def test_only_the_engine_is_compiled() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = config["tool"]["swapfs"]["compiled"]
    assert listed and all(name.startswith("swapfs.engine.") for name in listed)
    for name in listed:
        assert (ROOT / (name.replace(".", "/") + ".py")).exists(), name


def test_the_guest_side_carries_nothing_of_the_engine() -> None:
    """The driver runs in guests: importing it loads no engine, LMDB or FUSE."""
    import subprocess
    import sys
    script = ("import sys, swapfs.guest\n"
              "print(sorted(m for m in sys.modules if m.split('.')[0] in "
              "('lmdb', 'pyfuse3', 'trio', 'mountd') or m.startswith('swapfs.engine')"
              " or m.startswith('swapfs.cache')))")
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                           check=True, cwd=ROOT)
    assert child.stdout.strip() == "[]"


def test_the_floors_agree_on_a_pool_slot() -> None:
    """A sealed record takes whole slots of the pool: the driver manager
    counts them in the engine's blocks, and the control floor keeps no copy."""
    from mountd.drivers import DriverManager
    from swapfs.cache import TransientCache
    from swapfs.engine import BLOCK_SIZE
    assert not hasattr(importlib.import_module("swapfs.control.records"), "SLOT_SIZE")
    assert DriverManager(TransientCache(0), 30.0).records.slot_size == BLOCK_SIZE

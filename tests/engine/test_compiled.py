"""The engine modules that the build compiles are the ones imported, unless
SWAPFS_PURE_PYTHON asks for their source (swapfs/engine/compiled.py).

`make test` runs the engine's tests both ways: the whole suite as built,
then the engine's own files again with SWAPFS_PURE_PYTHON=1.
"""

import importlib
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from swapfs.engine import compiled

ROOT = Path(__file__).resolve().parents[2]
LISTED = sorted(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["swapfs"]["compiled"])
#: The same modules by their names in the engine, as compiled.loaded() and
#: ``swapfs status`` show them.
SHOWN = [name.rpartition(".")[2] for name in LISTED]


def _loaded_in_child(package_parent: Path, pure: bool) -> subprocess.CompletedProcess[str]:
    """Import every listed module in a fresh interpreter; it prints compiled.loaded()."""
    env = {**os.environ, "PYTHONPATH": str(package_parent)}
    env.pop(compiled.PURE_ENV, None)
    if pure:
        env[compiled.PURE_ENV] = "1"
    script = ("import importlib, swapfs.engine.compiled as c\n"
              f"for name in {LISTED!r}: importlib.import_module(name)\n"
              "print(','.join(c.loaded()))")
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, check=True, cwd="/")


def test_this_run_imports_the_compiled_modules_or_with_the_variable_their_source() -> None:
    modules = [importlib.import_module(name) for name in LISTED]
    if compiled.pure():
        assert compiled.loaded() == []
        assert all(str(module.__file__).endswith(".py") for module in modules)
    else:
        assert compiled.built() and sorted(compiled.built()) == LISTED, \
            "no build of the compiled modules, or of other ones: run make setup"
        assert compiled.loaded() == SHOWN, (
            f"{compiled.describe()}: the build failed or is stale (make setup rebuilds; "
            f"stale: {compiled.stale()})")


def test_the_variable_makes_every_module_run_its_source() -> None:
    assert _loaded_in_child(ROOT, pure=True).stdout.strip() == ""


def test_a_module_changed_since_its_build_runs_its_source(tmp_path: Path) -> None:
    if compiled.pure() or compiled.loaded() != SHOWN:
        pytest.skip("needs the compiled build")
    shutil.copytree(ROOT / "swapfs", tmp_path / "swapfs",
                    ignore=shutil.ignore_patterns("__pycache__"))
    changed = LISTED[0]
    with open(tmp_path / f"{changed.replace('.', '/')}.py", "a") as source:
        source.write("# an edit after the build\n")
    child = _loaded_in_child(tmp_path, pure=False)
    assert child.stdout.strip().split(",") == [name.rpartition(".")[2] for name in LISTED
                                               if name != changed]
    assert f"{changed} or a module whose C types it takes changed" in child.stderr


@pytest.mark.parametrize("suffix", [".py", ".pxd"])
def test_an_edit_of_a_module_with_c_types_makes_it_and_its_users_run_source(
        tmp_path: Path, suffix: str) -> None:
    """slottable's extension takes DedupTable's C layout (slottable.pxd): it
    cannot import beside a DedupTable run from source, so an edit of either
    of deduptable's files sends both to their source."""
    if compiled.pure() or compiled.loaded() != SHOWN:
        pytest.skip("needs the compiled build")
    shutil.copytree(ROOT / "swapfs", tmp_path / "swapfs",
                    ignore=shutil.ignore_patterns("__pycache__"))
    with open(tmp_path / "swapfs" / "engine" / f"deduptable{suffix}", "a") as source:
        source.write("# an edit after the build\n")
    child = _loaded_in_child(tmp_path, pure=False)
    assert child.stdout.strip().split(",") == [name for name in SHOWN
                                               if name not in ("deduptable", "slottable")]
    assert "swapfs.engine.slottable or a module whose C types" in child.stderr

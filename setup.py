"""Compiles the engine's per-block modules with Cython, where it can.

The modules listed, by dotted path, under ``[tool.swapfs] compiled`` in
pyproject.toml are ordinary Python, all in ``swapfs.engine``. Cython
compiles each, unchanged (with the C types of the ``.pxd`` beside it, where
there is one), into an extension module of the same name that Python
imports in place of the ``.py`` (docs/performance.md, "The compiled path").
Every extension is optional: where one does not build (no C compiler, no
Python headers, no Cython, a construct Cython refuses) the install goes on
and that module stays pure Python. The build lists the
SHA-256 of each source it compiled (``.py`` and ``.pxd``) in
``swapfs/engine/compiled.json``;
``swapfs/engine/compiled.py`` imports an extension only while its source
still has that digest.
"""

import importlib.util
import json
import sysconfig
import tomllib
from pathlib import Path
from typing import Any

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

try:
    from Cython.Build import cythonize
except ImportError:  # a build without its build requirements: pure Python
    cythonize = None

MANIFEST = "compiled.json"
PACKAGE = "swapfs.engine"
# Python's semantics exactly: annotations are not types to Cython (an
# argument annotated bytes still takes a bytearray, as in Python).
DIRECTIVES = {"language_level": 3, "annotation_typing": False}

with open("pyproject.toml", "rb") as config:
    MODULES: list[str] = tomllib.load(config)["tool"]["swapfs"]["compiled"]
if any(name.rpartition(".")[0] != PACKAGE for name in MODULES):
    raise SystemExit(f"pyproject.toml: only modules of {PACKAGE} are compiled")


def _load_compiled() -> Any:
    """swapfs/engine/compiled.py, which says how a source is digested, loaded
    on its own: importing the package would import the engine."""
    spec = importlib.util.spec_from_file_location("compiled", "swapfs/engine/compiled.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


source_digest = _load_compiled().source_digest


class BuildCompiled(build_ext):
    """Cythonize, then compile, each module on its own; a failure skips that
    module only; then write the manifest of what was built beside it, and
    remove any other extension module there (an earlier build's)."""

    def finalize_options(self) -> None:
        super().finalize_options()
        if self.parallel is None:
            self.parallel = True  # one compiler per core: the C files are large
        self.digests: dict[str, str] = {}
        self.built: dict[str, str] = {}

    def run(self) -> None:
        kept = []
        for ext in self.extensions:
            source = ext.sources[0]
            digest = source_digest(Path(source))
            try:
                if cythonize is None:
                    raise RuntimeError("Cython is not installed")
                (generated,) = cythonize(
                    [Extension(ext.name, [source])], build_dir="build/cython", force=True,
                    quiet=True, compiler_directives=DIRECTIVES)
            except Exception as exc:  # Cython reports its own errors above this
                self.warn(f"{ext.name} stays pure Python: {exc}")
                continue
            ext.sources = generated.sources
            self.digests[ext.name] = digest
            kept.append(ext)
        self.extensions = kept
        super().run()
        package = Path(self.get_ext_fullpath(MODULES[0])).parent
        keep = {Path(self.get_ext_fullpath(name)).name for name in self.built}
        suffix = sysconfig.get_config_var("EXT_SUFFIX")
        for leftover in package.glob(f"*{suffix}"):
            if leftover.name not in keep:
                leftover.unlink()  # an earlier build's, of a module not compiled now
        # A build from before the engine had a package of its own left its
        # extensions in swapfs/, where they would import as the old modules.
        for leftover in [*package.parent.glob(f"*{suffix}"), package.parent / MANIFEST]:
            leftover.unlink(missing_ok=True)
        (package / MANIFEST).write_text(json.dumps(
            {name: self.built.get(name) for name in MODULES}, indent=1) + "\n")

    def build_extension(self, ext: Any) -> None:
        super().build_extension(ext)  # raises if it failed: the module is not listed
        self.built[ext.name] = self.digests[ext.name]


setup(
    ext_modules=[Extension(name, [name.replace(".", "/") + ".py"], optional=True)
                 for name in MODULES],
    cmdclass={"build_ext": BuildCompiled},
)

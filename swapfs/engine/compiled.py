"""Which of the engine's modules run compiled, and the way back to their source.

The engine is the one package the build compiles (setup.py): Cython turns
each module listed, by dotted path, under ``[tool.swapfs] compiled`` in
pyproject.toml into an extension module beside its source
(``swapfs/engine/volume.cpython-311-x86_64-linux-gnu.so`` beside
``swapfs/engine/volume.py``), unchanged (with the C types of the ``.pxd``
beside it, where there is one), which Python imports in place of the
``.py``. The build writes in ``compiled.json`` each module it was to
compile, with the SHA-256 of the source it compiled (:func:`source_digest`;
null for one that did not compile). :func:`install` (called by ``swapfs/engine/__init__.py``,
before any other module of the engine is imported) puts a finder first on
``sys.meta_path`` that imports a module's ``.py`` instead of its extension

- for every module, when ``SWAPFS_PURE_PYTHON`` is set (to anything but
  ``0``): the pure-Python fallback, which the test suite runs too;
- for a module whose source changed since it was compiled (its ``.py``,
  or the ``.pxd`` beside it that gives the build C types), or that takes
  the C types of a module run from source (``cimport`` in its ``.pxd``),
  with a warning; ``make setup`` compiles it again: an edit is never
  hidden behind a stale build.

A module the build could not compile simply has no extension: Python
imports its source as usual.
"""

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import re
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

PURE_ENV = "SWAPFS_PURE_PYTHON"
MANIFEST = "compiled.json"
_PACKAGE = Path(__file__).parent
_PACKAGE_NAME = __name__.rpartition(".")[0]
_CIMPORT = re.compile(rf"^from {re.escape(_PACKAGE_NAME)}\.(\w+) cimport", re.MULTILINE)
_SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]


def pure() -> bool:
    """Was the pure-Python fallback asked for?"""
    return os.environ.get(PURE_ENV, "") not in ("", "0")


def built() -> dict[str, str | None]:
    """The build's manifest: each module (dotted path) it was to compile, with
    the digest of the source it compiled, None if it did not (empty without
    a build)."""
    try:
        manifest: dict[str, str | None] = json.loads((_PACKAGE / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}
    return manifest


def source_digest(source: Path) -> str:
    """The SHA-256 of a module's source *source* (its ``.py``) and of the
    ``.pxd`` beside it that gives the compiled build its C types, if any:
    an edit of either makes the extension stale. setup.py lists these."""
    digest = hashlib.sha256(source.read_bytes())
    types = source.with_suffix(".pxd")
    if types.exists():
        digest.update(types.read_bytes())
    return digest.hexdigest()


def _source(name: str) -> Path:
    """The source of the engine module *name* (a dotted path)."""
    return _PACKAGE / f"{name.rpartition('.')[2]}.py"


def _cimports(name: str) -> set[str]:
    """The engine modules whose C types module *name*'s ``.pxd`` takes
    (``from swapfs.engine.deduptable cimport DedupTable``), by dotted path."""
    try:
        types = _source(name).with_suffix(".pxd").read_text()
    except OSError:
        return set()
    return {f"{_PACKAGE_NAME}.{match}" for match in _CIMPORT.findall(types)}


def _fresh() -> set[str]:
    """The modules whose extension was built from their source as it is now,
    and whose extension types it takes from others run compiled too: an
    extension that takes ``DedupTable``'s C layout cannot import beside a
    pure-Python ``DedupTable``."""
    fresh = set()
    for name, digest in built().items():
        try:
            if source_digest(_source(name)) == digest:
                fresh.add(name)
        except OSError:
            pass
    needs = {name: _cimports(name) for name in fresh}
    while dropped := {name for name in fresh if not needs[name] <= fresh}:
        fresh -= dropped
    return fresh


def stale() -> list[str]:
    """The modules (by name in the engine) with an extension that was built
    from another source."""
    fresh = {_short(name) for name in _fresh()}
    names = (path.name.removesuffix(_SUFFIX) for path in _PACKAGE.glob(f"*{_SUFFIX}"))
    return sorted(name for name in names if name not in fresh)


def _short(name: str) -> str:
    """An engine module's name as the daemon and ``swapfs status`` show it
    (``swapfs.engine.volume``: ``volume``)."""
    return name.rpartition(".")[2]


class _SourceFirst(importlib.abc.MetaPathFinder):
    """Imports an engine module from its ``.py`` when it has an extension
    that must not be used."""

    def __init__(self, pure: bool, fresh: set[str]) -> None:
        self.pure = pure
        self.fresh = fresh

    def find_spec(self, fullname: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        package, _, name = fullname.rpartition(".")
        if package != __package__ or fullname in self.fresh:
            return None
        if not (_PACKAGE / f"{name}{_SUFFIX}").exists():
            return None
        if not self.pure:
            warnings.warn(f"{fullname} or a module whose C types it takes changed since "
                          "it was compiled: running its source (make setup compiles it "
                          "again)", RuntimeWarning, stacklevel=2)
        return importlib.util.spec_from_file_location(fullname, _source(fullname))


def install() -> None:
    """Put the finder in place (once)."""
    if not any(isinstance(finder, _SourceFirst) for finder in sys.meta_path):
        sys.meta_path.insert(0, _SourceFirst(pure(), set() if pure() else _fresh()))


def describe() -> str:
    """Which path the engine runs, in a line: the build's modules, imported."""
    if pure():
        return f"pure Python ({PURE_ENV} is set)"
    for name in built():
        importlib.import_module(name)
    running = loaded()
    if not running:
        return "pure Python (no compiled build)"
    python = [_short(name) for name in built() if _short(name) not in running]
    return f"compiled: {', '.join(running)}" + (
        f"; pure Python: {', '.join(python)}" if python else "")


def loaded() -> list[str]:
    """The engine's modules imported so far that run compiled, by name in
    the engine (what ``swapfs status`` shows as ``compiled``)."""
    return sorted(_short(name) for name, module in list(sys.modules.items())
                  if isinstance(getattr(module, "__loader__", None),
                                importlib.machinery.ExtensionFileLoader)
                  and name.startswith(f"{__package__}."))

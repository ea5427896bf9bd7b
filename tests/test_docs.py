"""The documents name only files and modules that exist.

Every path of the tree (``swapfs/engine/volume.py``, ``tests/engine/...``)
and every dotted name (``swapfs.engine.lease.acquire``, ``mountd.daemon``)
that README.md, docs/*.md or a module's docstring cites must resolve: a
file or module moved or renamed without its documents fails here.
"""

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SOURCES = [path for top in ("swapfs", "mountd", "tools")
           for path in sorted((ROOT / top).rglob("*.py"))]
PATH = re.compile(r"(?<![\w/.-])((?:swapfs|mountd|tests|tools|docs|systemd|patches)"
                  r"/[\w/.*-]*[\w*])")
#: Names in the documents that are files, not modules.
NOT_MODULES = {"swapfs.key", "swapfs.target"}
#: What the build makes (not in the tree until it ran).
BUILT = re.compile(r"\.so$|compiled\.json$")
DOTTED = re.compile(r"(?<![\w/.-])((?:swapfs|mountd)(?:\.[A-Za-z_]\w*)+)")


def _resolves(dotted: str) -> bool:
    """Is *dotted* a module, or an attribute of one (swapfs.engine.lease.acquire)?"""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            target = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            if not hasattr(target, name):
                return False
            target = getattr(target, name)
        return True
    return False


def _cited(text: str) -> tuple[set[str], set[str]]:
    paths = {match.rstrip(".") for match in PATH.findall(text)}
    dotted = {match.rstrip(".") for match in DOTTED.findall(text)}
    return paths, dotted


@pytest.mark.parametrize("document", DOCUMENTS + SOURCES,
                         ids=lambda path: str(path.relative_to(ROOT)))
def test_every_cited_file_and_module_exists(document: Path) -> None:
    text = document.read_text()
    if document.suffix == ".py":
        text = "\n".join(re.findall(r'"""(.*?)"""', text, re.S)
                         + re.findall(r"#(.*)", text))
    paths, dotted = _cited(text)
    missing = sorted(path for path in paths if not BUILT.search(path)
                     and not any(ROOT.glob(path)) and not (ROOT / path).exists())
    unknown = sorted(name for name in dotted - NOT_MODULES if not _resolves(name))
    assert not missing and not unknown, f"missing files {missing}, unknown names {unknown}"

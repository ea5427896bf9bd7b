"""Writes the daemon's settings, the fields of ``mountd.config.Config``, out as
the settings table of ``docs/configuration.md`` and as ``systemd/example.toml``.

Both files are committed, and ``tests/mount/test_config.py`` fails when
either differs from what this renders: after changing a setting, run::

    .venv/bin/python -m tools.config_docs

It rewrites the example file whole, and the table between the two marker
comments of the docs (the rest of that page is written by hand).
"""

import json
import re
import textwrap
import types
import typing
from dataclasses import Field, fields
from pathlib import Path
from typing import Any

from mountd.config import Config

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "configuration.md"
EXAMPLE = ROOT / "systemd" / "example.toml"

#: The comments around the generated table in DOCS.
BEGIN = "<!-- settings: generated from mountd/config.py by python -m tools.config_docs -->"
END = "<!-- end of settings -->"

_EXAMPLE_HEAD = """\
# swapfs daemon configuration: copy to /etc/swapfs/NAME.toml and enable
# swapfs@NAME.service. Every setting is listed with its default; see
# docs/configuration.md (this file is generated from mountd/config.py).
"""
_NAMES = {bool: "bool", int: "int", float: "number", str: "string", Path: "string"}
_LINK = re.compile(r"\[([^]]+)\]\(([^)]+)\)")


def _is_table(entry: Field[Any]) -> bool:
    return typing.get_origin(entry.type) is dict


def _type_name(hint: Any) -> str:
    """How the docs name a setting's type: ``int``, ``list of strings``, ``table``."""
    if typing.get_origin(hint) is types.UnionType:
        (hint,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        return f"list of {_NAMES[item]}s"
    if typing.get_origin(hint) is dict:
        return "table"
    return _NAMES[hint]


def _default(entry: Field[Any]) -> Any:
    return entry.default_factory() if callable(entry.default_factory) else entry.default


def markdown_table() -> str:
    """The settings table of docs/configuration.md, markers included."""
    rows = [BEGIN, "| setting | type | default | meaning |", "| --- | --- | --- | --- |"]
    for entry in fields(Config):
        default = _default(entry)
        name = f"[{entry.name}.NAME]" if _is_table(entry) else entry.name
        shown = ("(required)" if default is None else "none" if _is_table(entry)
                 else f"`{json.dumps(default)}`")
        meaning = entry.metadata["doc"].replace("|", "\\|")
        rows.append(f"| `{name}` | {_type_name(entry.type)} | {shown} | {meaning} |")
    return "\n".join([*rows, END]) + "\n"


def _comment(doc: str, required: bool = False) -> list[str]:
    """A setting's documentation as TOML comment lines: plain text, and each
    link as the path of the page it points to; a setting without a default
    says it is required."""
    def path(link: re.Match[str]) -> str:
        target = link.group(2)
        return "docs/" + (DOCS.name + target if target.startswith("#") else target)
    text = _LINK.sub(path, doc).replace("`", "") + (" (required)" if required else "")
    return textwrap.wrap(text + ".", 78, initial_indent="# ", subsequent_indent="# ",
                         break_long_words=False, break_on_hyphens=False)


def example_file() -> str:
    """systemd/example.toml: every setting with its default, or its example
    value where it has none; tables, which TOML puts last, commented out."""
    lines = [_EXAMPLE_HEAD]
    tables = []
    for entry in fields(Config):
        default, example = _default(entry), entry.metadata["example"]
        if _is_table(entry):
            tables += ["", *_comment(entry.metadata["doc"]),
                       *(f"# {line}" for line in example.splitlines())]
            continue
        value = example if default is None else json.dumps(default)
        lines += [*_comment(entry.metadata["doc"], required=default is None),
                  f"{entry.name} = {value}"]
    return "\n".join([*lines, *tables]) + "\n"


def docs_with_table(docs: str) -> str:
    """*docs* with the text from BEGIN to END replaced by :func:`markdown_table`."""
    start, end = docs.index(BEGIN), docs.index(END) + len(END) + 1
    return docs[:start] + markdown_table() + docs[end:]


def main() -> None:
    DOCS.write_text(docs_with_table(DOCS.read_text()))
    EXAMPLE.write_text(example_file())


if __name__ == "__main__":
    main()

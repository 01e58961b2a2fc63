"""The docs keep up with the code: every CLI command and option is in docs/cli.md, every error message the code
can raise is in docs/troubleshooting.md, and every relative link in README.md and docs/ resolves."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import click
import pytest

from hqexport.cli import main

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
ERROR_CLASSES = {"HQExportError", "UnsupportedModelError", "KernelBuildError"}
#: literal pieces of a message shorter than this are too generic to identify it
MIN_FRAGMENT = 12


def _commands(group: click.Group, prefix: str = "hqexport") -> list[tuple[str, click.Command]]:
    found = [(prefix, group)]
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            found += _commands(command, f"{prefix} {name}")
        else:
            found.append((f"{prefix} {name}", command))
    return found


def _sections(markdown: str) -> dict[str, str]:
    """`## `hqexport x`` heading -> the text up to the next heading."""
    parts = re.split(r"^## `([^`]+)`.*$", markdown, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def test_every_cli_command_and_option_is_in_the_reference():
    sections = _sections((DOCS / "cli.md").read_text())
    missing = []
    for name, command in _commands(main):
        if name not in sections:
            missing.append(f"command {name!r}")
            continue
        for param in command.params:
            names = [param.human_readable_name] if isinstance(param, click.Argument) else [*param.opts, *param.secondary_opts]
            missing += [f"{name} {opt}" for opt in names if f"`{opt}`" not in sections[name]]
    assert not missing, f"docs/cli.md lacks {missing}: run python docs/gen_cli.py"


def test_the_reference_documents_no_removed_command():
    names = {name for name, _ in _commands(main)}
    stale = [name for name in _sections((DOCS / "cli.md").read_text()) if name not in names]
    assert not stale, f"docs/cli.md documents commands the CLI no longer has: {stale}; run python docs/gen_cli.py"


def _literal_fragments(node: ast.expr) -> list[str] | None:
    """The constant text pieces of a message expression (str, f-string, concatenation); None if not literal."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.JoinedStr):
        return [v.value for v in node.values if isinstance(v, ast.Constant)]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _literal_fragments(node.left), _literal_fragments(node.right)
        return None if left is None and right is None else (left or []) + (right or [])
    return None


def _raised_messages() -> list[tuple[str, str]]:
    """(where, identifying fragment) for every error the package constructs with a literal message."""
    found = []
    for file in sorted((ROOT / "hqexport").rglob("*.py")):
        for node in ast.walk(ast.parse(file.read_text())):
            if not (isinstance(node, ast.Call) and node.args):
                continue
            name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
            if name not in ERROR_CLASSES:
                continue
            pieces = _literal_fragments(node.args[0]) or []
            longest = max((piece.strip() for piece in pieces), key=len, default="")
            if len(longest) >= MIN_FRAGMENT:
                found.append((f"{file.relative_to(ROOT)}:{node.lineno}", longest))
    return found


def test_finds_the_error_messages():
    assert len(_raised_messages()) > 100  # the scan works (the package raises well over a hundred)


def test_every_error_message_is_in_troubleshooting():
    text = " ".join((DOCS / "troubleshooting.md").read_text().split())
    missing = [f"{where}: {fragment!r}" for where, fragment in _raised_messages() if " ".join(fragment.split()) not in text]
    assert not missing, "docs/troubleshooting.md lacks these messages:\n" + "\n".join(missing)


def _links(file: Path) -> list[str]:
    return re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", file.read_text())


@pytest.mark.parametrize("file", [ROOT / "README.md", *sorted(DOCS.glob("*.md")), *sorted((ROOT / "samples").glob("*/README.md"))], ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(file):
    broken = [link for link in _links(file) if "://" not in link and not (file.parent / link).exists()]
    assert not broken, f"{file.relative_to(ROOT)} links to missing files: {broken}"


def test_readme_links_every_doc_page():
    linked = {Path(link).name for link in _links(ROOT / "README.md")}
    unlinked = [page.name for page in sorted(DOCS.glob("*.md")) if page.name not in linked]
    assert not unlinked, f"README.md's Docs section does not link {unlinked}"

"""Write docs/cli.md from the click commands of hqexport.cli (run after changing the CLI).

    python docs/gen_cli.py            # rewrite docs/cli.md
    python docs/gen_cli.py --check    # exit 1 if docs/cli.md is not what this would write

tests/test_docs.py fails when a command or an option is missing from docs/cli.md.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import click

from hqexport.cli import main

OUT = Path(__file__).resolve().parent / "cli.md"

INTRO = """# Command-line reference

Generated from the click commands by `docs/gen_cli.py` — edit the help texts in `hqexport/cli.py` and run
`python docs/gen_cli.py`. Exit codes everywhere: 0 success (validation passed), 1 validation failed,
2 bad input or usage (one line on stderr: `hqexport: error: <file>: <problem>`; see
[troubleshooting.md](troubleshooting.md)).
"""


#: what the positional arguments are (click has no help text for arguments)
ARGUMENTS = {
    "PATH": "an HQQ source folder or an exported folder",
    "SOURCE": "an HQQ source folder: hqq's save_quantized (config.json + qmodel.pt) or HQQ safetensors (sharded or not)",
    "OUT": "an exported folder (written by hqexport convert)",
}


def commands(group: click.Group, prefix: str) -> list[tuple[str, click.Command]]:
    """(full name, command) for every command under `group`, depth first, in declaration order."""
    found: list[tuple[str, click.Command]] = []
    for name, command in group.commands.items():
        full = f"{prefix} {name}"
        found.append((full, command))
        if isinstance(command, click.Group):
            found += commands(command, full)
    return found


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def help_markdown(text: str) -> str:
    """click help -> markdown: paragraphs re-flowed, click's \\b (verbatim) paragraphs as code blocks."""
    blocks = []
    for paragraph in inspect.cleandoc(text).split("\n\n"):
        if paragraph.startswith("\b"):
            blocks.append("```\n" + inspect.cleandoc(paragraph.removeprefix("\b")) + "\n```")
        else:
            blocks.append(" ".join(paragraph.split()))
    return "\n\n".join(blocks)


def section(full_name: str, command: click.Command) -> str:
    context = click.Context(command, info_name=full_name)
    lines = [f"## `{full_name}`", "", "```", command.get_usage(context).removeprefix("Usage: "), "```", ""]
    lines += [help_markdown(command.help or ""), ""]
    rows = []
    for param in command.params:
        if isinstance(param, click.Argument):
            what = ARGUMENTS.get(param.human_readable_name, "")
            rows.append((f"`{param.human_readable_name}` (argument)", f"{what} ({'required' if param.required else 'optional'})"))
            continue
        names = ", ".join(f"`{opt}`" for opt in [*param.opts, *param.secondary_opts])
        if param.is_flag:
            kind = "flag"
        elif isinstance(param.type, click.Choice):
            kind = " | ".join(param.type.choices)
        else:
            kind = param.metavar or param.type.name.upper()
        details = [param.help or ""]
        if param.multiple and "repeatable" not in (param.help or ""):
            details.append("Repeatable.")
        if param.required:
            details.append("Required.")
        if param.show_default and param.default is not None and not param.is_flag:
            details.append(f"Default: `{param.default}`.")
        rows.append((f"{names} {_cell(kind)}", _cell(" ".join(d for d in details if d))))
    rows.append(("`-h`, `--help` flag", "Show the help and exit."))
    if isinstance(command, click.Group):
        lines += ["Subcommands: " + ", ".join(f"`{full_name} {name}`" for name in command.commands), ""]
    lines += ["| argument / option | meaning |", "|---|---|", *(f"| {a} | {b} |" for a, b in rows), ""]
    return "\n".join(lines)


def render() -> str:
    parts = [INTRO, section("hqexport", main).replace("## `hqexport`", "## `hqexport` (the group)")]
    parts += [section(name, command) for name, command in commands(main, "hqexport")]
    return "\n".join(parts).rstrip() + "\n"


if __name__ == "__main__":
    text = render()
    if sys.argv[1:] == ["--check"]:
        sys.exit(0 if OUT.read_text() == text else f"{OUT} is out of date: run python docs/gen_cli.py")
    OUT.write_text(text)
    print(f"wrote {OUT}")

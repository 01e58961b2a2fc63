"""`--adapter [NAME=]PATH` arguments: adapter names and the adapter folders a PATH holds."""

from __future__ import annotations

import re
from pathlib import Path

from hqexport.adapters.peft_config import CONFIG_FILE
from hqexport.errors import HQExportError

_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def check_adapter_name(name: str, where: str | Path | None = None) -> str:
    """Adapter names become file names (adapters/NAME.onnx_adapter): no separators, no '..', no leading dot."""
    if not _NAME_RE.fullmatch(name) or ".." in name:
        raise HQExportError(
            f"adapter name {name!r} is not allowed: use letters, digits, '_', '-' and '.', not starting with '.', "
            "without '..' or path separators",
            where,
        )
    return name


def parse_adapter_argument(value: str) -> tuple[str | None, Path]:
    """`--adapter [NAME=]PATH` -> (NAME or None, PATH)."""
    name, sep, path = value.partition("=")
    if not sep:
        return None, Path(value)
    if not path:
        raise HQExportError(f"--adapter {value!r}: nothing after '='; expected NAME=PATH")
    return check_adapter_name(name), Path(path)


def find_adapter_folders(path: Path, name: str | None = None) -> list[tuple[str, Path]]:
    """The adapters under PATH: PATH itself and/or its sub-folders (PEFT saves non-default adapters there)."""
    path = Path(path)
    if not path.is_dir():
        raise HQExportError("adapter folder not found", path)
    found: list[tuple[str, Path]] = []
    if (path / CONFIG_FILE).is_file():
        found.append((name or path.resolve().name, path))
    for sub in sorted(p for p in path.iterdir() if p.is_dir() and (p / CONFIG_FILE).is_file()):
        found.append((sub.name, sub))
    if not found:
        raise HQExportError(f"no {CONFIG_FILE} here or in a sub-folder: not a PEFT adapter folder", path)
    if name is not None and len(found) > 1:
        listed = ", ".join(n for n, _ in found)
        raise HQExportError(f"holds several adapters ({listed}); drop NAME= and they keep these names", path)
    for adapter_name, folder in found:
        check_adapter_name(adapter_name, folder)
    return found

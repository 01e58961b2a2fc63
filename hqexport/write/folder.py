"""The output folder: built in a temporary sibling folder and moved into place only when complete.

OUT is refused if it exists (unless --force), if it is or lies inside the source folder, or if it contains the
source. --force replaces only a folder hqexport wrote before (it holds hqexport.json) or an empty one, so a
typo cannot wipe an unrelated folder.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hqexport.errors import HQExportError

MANIFEST_FILE = "hqexport.json"


def check_output(out: Path, *, force: bool, source: Path | None = None) -> None:
    """Refuse an output folder that convert must not write (before any long work starts)."""
    target = out.resolve()
    if source is not None:
        src = source.resolve()
        if target == src or src in target.parents:
            raise HQExportError("is inside the source folder; choose an output folder outside it", out)
        if target in src.parents:
            raise HQExportError("contains the source folder; choose another output folder", out)
    if not out.exists():
        return
    if not out.is_dir():
        raise HQExportError("exists and is not a folder", out)
    if not force:
        raise HQExportError("already exists; pass --force to replace it", out)
    if not (out / MANIFEST_FILE).is_file() and any(out.iterdir()):
        raise HQExportError(
            f"is not an hqexport output (no {MANIFEST_FILE}) and not empty; --force will not replace it", out
        )


@contextmanager
def staged_output(out: Path, *, force: bool, source: Path | None = None) -> Iterator[Path]:
    """Yield an empty staging folder next to `out`; on success it becomes `out`, on error it is removed."""
    check_output(out, force=force, source=source)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield staging
        check_output(out, force=force, source=source)  # OUT may have appeared meanwhile
        _commit(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _commit(staging: Path, out: Path) -> None:
    if not out.exists():
        staging.rename(out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    replaced = old / out.name
    out.rename(replaced)
    try:
        staging.rename(out)
    except OSError:
        replaced.rename(out)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)

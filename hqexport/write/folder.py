"""The output folder: built in a temporary sibling folder and moved into place only when complete.

OUT is refused if it exists (unless --force), if it is or lies inside the source folder, or if it contains the
source. --force replaces only a folder hqexport wrote before (it holds hqexport.json) or an empty one, so a
typo cannot wipe an unrelated folder.

A convert that is killed (SIGKILL, power loss) cannot remove its staging folder `.OUT.partial-*`. Each running
convert holds an flock on its staging folder, so the next convert to the same OUT can tell a dead one's
leftovers (lock free) from a concurrent convert's (lock held) and removes only the former.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hqexport.errors import HQExportError
from hqexport.files import MANIFEST_FILE


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
    """Yield an empty staging folder next to `out`; on success it becomes `out`, on error it is removed.

    A file-system error inside the block (disk full, no permission) becomes an HQExportError naming OUT.
    """
    check_output(out, force=force, source=source)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(out)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    except OSError as error:
        raise HQExportError(f"cannot create the output folder ({_describe(error)})", out) from None
    lock = _lock(staging)
    try:
        yield staging
        check_output(out, force=force, source=source)  # OUT may have appeared meanwhile
        _commit(staging, out)
    except OSError as error:
        raise HQExportError(f"convert stopped on a file-system error ({_describe(error)}); nothing was written", out) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        os.close(lock)


def remove_stale_staging(out: Path) -> list[Path]:
    """Remove `.OUT.partial-*` / `.OUT.old-*` folders left by a killed convert (no process holds their lock)."""
    prefixes = (f".{out.name}.partial-", f".{out.name}.old-")
    removed = []
    for folder in sorted(out.parent.iterdir()):
        if not folder.name.startswith(prefixes) or folder.is_symlink() or not folder.is_dir():
            continue
        try:
            lock = _lock(folder)
        except BlockingIOError:  # a running convert owns it
            continue
        try:
            shutil.rmtree(folder)
            removed.append(folder)
        finally:
            os.close(lock)
    return removed


def _lock(folder: Path) -> int:
    """An open descriptor of `folder` holding an exclusive flock (released when closed or the process dies)."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(descriptor)
        raise
    return descriptor


def _describe(error: OSError) -> str:
    reason = error.strerror or str(error)
    return f"{reason}: {error.filename}" if error.filename else reason


def _commit(staging: Path, out: Path) -> None:
    if not out.exists():
        staging.rename(out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    lock = _lock(old)
    replaced = old / out.name
    out.rename(replaced)
    try:
        staging.rename(out)
    except OSError:
        replaced.rename(out)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)
        os.close(lock)

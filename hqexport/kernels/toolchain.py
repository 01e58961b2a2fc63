"""What building the kernels needs from the machine: the cache folder, commands that fail as KernelBuildError,
and a lock across processes (pytest workers, parallel CLI runs)."""

from __future__ import annotations

import fcntl
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hqexport.errors import HQExportError

COMMAND_TIMEOUT_S = 600


class KernelBuildError(HQExportError):
    """The custom-op library could not be built (missing compiler, headers out of reach, compile error)."""


def cache_dir() -> Path:
    """Where headers and built libraries are kept: $HQEXPORT_CACHE, else ~/.cache/hqexport."""
    root = os.environ.get("HQEXPORT_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "hqexport"


def run_command(command: list[str], what: str, cwd: Path | None = None) -> str:
    """Runs `command` (for `what`, named in errors); its stdout, or a KernelBuildError with the output's tail."""
    try:
        result = subprocess.run(
            command, cwd=cwd, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False
        )
    except FileNotFoundError:
        raise KernelBuildError(f"{what}: {command[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise KernelBuildError(f"{what}: {command[0]} did not finish in {COMMAND_TIMEOUT_S} s") from None
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-15:]
        raise KernelBuildError(f"{what} failed ({' '.join(command[:2])} ...):\n" + "\n".join(tail))
    return result.stdout


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Serializes builds and fetches across processes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)

"""onnxruntime's C/C++ headers, which ship in no PyPI package: from `ORT_INCLUDE_DIR` (an onnxruntime SDK), or from
Debian's `libonnxruntime-dev`, fetched with apt into a private folder (own sources list, lists and cache; the
system's apt state is only read) and unpacked there, once."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from hqexport.kernels.toolchain import KernelBuildError, cache_dir, locked, run_command

DEBIAN_PACKAGE = "libonnxruntime-dev"
DEBIAN_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")


def debian_suite() -> str:
    return os.environ.get("HQEXPORT_DEBIAN_SUITE", "trixie")


def _header_root(candidate: Path) -> Path | None:
    for folder in (candidate, candidate / "onnxruntime", candidate / "include", candidate / "include" / "onnxruntime"):
        if (folder / "onnxruntime_cxx_api.h").exists():
            return folder
    return None


def _apt_options(root: Path) -> list[str]:
    options = {
        "Dir::Etc::sourcelist": root / "sources.list",
        "Dir::Etc::sourceparts": "-",
        "Dir::Etc::preferencesparts": root / "preferences.d",
        "Dir::State::Lists": root / "lists",
        "Dir::State::status": "/dev/null",
        "Dir::Cache": root / "cache",
        "Debug::NoLocking": "1",
    }
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        options["APT::Sandbox::User"] = "root"  # the _apt user cannot write our private folder
    return [arg for key, value in options.items() for arg in ("-o", f"{key}={value}")]


def fetch_debian_headers() -> Path:
    """onnxruntime's headers from Debian's libonnxruntime-dev, fetched once into the cache."""
    suite = debian_suite()
    headers = cache_dir() / "ort-headers" / suite
    with locked(cache_dir() / "ort-headers.lock"):
        found = _header_root(headers)
        if found is not None:
            return found
        if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
            raise KernelBuildError(
                "onnxruntime's C/C++ headers are needed to build the kernels: set ORT_INCLUDE_DIR to an onnxruntime "
                "SDK's include folder (apt-get and dpkg-deb, used to fetch Debian's libonnxruntime-dev, are missing)"
            )
        if not DEBIAN_KEYRING.exists():
            raise KernelBuildError(
                f"{DEBIAN_KEYRING} is missing (package debian-archive-keyring): it is needed to verify Debian's "
                "libonnxruntime-dev; install it or set ORT_INCLUDE_DIR to an onnxruntime SDK's include folder"
            )
        apt_root = cache_dir() / "apt" / suite
        for folder in ("lists/partial", "cache/archives/partial", "preferences.d"):
            (apt_root / folder).mkdir(parents=True, exist_ok=True)
        (apt_root / "sources.list").write_text(
            f"deb [signed-by={DEBIAN_KEYRING}] http://deb.debian.org/debian {suite} main\n"
        )
        options = _apt_options(apt_root)
        what = f"fetching {DEBIAN_PACKAGE} from Debian {suite} (set ORT_INCLUDE_DIR to skip)"
        run_command(["apt-get", *options, "update"], what)
        with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
            run_command(["apt-get", *options, "download", DEBIAN_PACKAGE], what, cwd=Path(tmp))
            debs = sorted(Path(tmp).glob(f"{DEBIAN_PACKAGE}_*.deb"))
            if not debs:
                raise KernelBuildError(f"{what}: apt-get downloaded no {DEBIAN_PACKAGE} package")
            run_command(["dpkg-deb", "-x", str(debs[0]), str(Path(tmp) / "root")], f"unpacking {debs[0].name}")
            include = Path(tmp) / "root" / "usr" / "include" / "onnxruntime"
            if _header_root(include) is None:
                raise KernelBuildError(f"{debs[0].name} holds no onnxruntime_cxx_api.h")
            (include / "DEBIAN_PACKAGE").write_text(debs[0].name + "\n")
            headers.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(headers, ignore_errors=True)
            shutil.move(str(include), headers)
        return headers


def ort_include_dir() -> Path:
    """The folder holding onnxruntime_cxx_api.h: $ORT_INCLUDE_DIR, else Debian's headers (fetched on first use)."""
    given = os.environ.get("ORT_INCLUDE_DIR")
    if given:
        found = _header_root(Path(given))
        if found is None:
            raise KernelBuildError("ORT_INCLUDE_DIR holds no onnxruntime_cxx_api.h", given)
        return found
    return fetch_debian_headers()

"""Builds the hqexport custom-op library (docs/kernels.md).

onnxruntime's C/C++ headers ship in no PyPI package: they come from `ORT_INCLUDE_DIR` (an onnxruntime SDK), or
from Debian's `libonnxruntime-dev`, fetched with apt into a private folder (own sources list, lists and cache; the
system's apt state is only read) and unpacked there. The CPU kernel is compiled with g++ twice (x86-64-v2 and
x86-64-v3, picked at run time) and linked with the custom-op glue; the CUDA kernel joins the same library when nvcc
is present and the installed onnxruntime has the CUDA execution provider. Everything lands in a cache folder keyed by
a hash of the sources, flags and headers, so a rebuild happens only when one of them changes.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hqexport.errors import HQExportError

HERE = Path(__file__).parent
CPU_SOURCES = (HERE / "src" / "cpu_kernel.cpp", HERE / "src" / "custom_op.cpp", HERE / "src" / "problem.h")
CUDA_SOURCE = HERE / "cuda" / "hqq_matmul.cu"
LIBRARY_NAME = "libhqexport_kernels.so"
DEBIAN_PACKAGE = "libonnxruntime-dev"
DEBIAN_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
#: CUDA targets: SASS for Hopper, PTX that any newer driver can JIT for other GPUs
CUDA_ARCH_FLAGS = ("-gencode=arch=compute_90,code=sm_90", "-gencode=arch=compute_75,code=compute_75")
_CXX_FLAGS = ("-std=c++17", "-O3", "-fPIC", "-fvisibility=hidden", "-fvisibility-inlines-hidden", "-Wall")
_ISA_FLAGS = {"baseline": ("-march=x86-64-v2",), "avx2": ("-march=x86-64-v3", "-ffp-contract=fast")}
_COMMAND_TIMEOUT_S = 600


class KernelBuildError(HQExportError):
    """The custom-op library could not be built (missing compiler, headers out of reach, compile error)."""


def cache_dir() -> Path:
    """Where headers and built libraries are kept: $HQEXPORT_CACHE, else ~/.cache/hqexport."""
    root = os.environ.get("HQEXPORT_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "hqexport"


def debian_suite() -> str:
    return os.environ.get("HQEXPORT_DEBIAN_SUITE", "trixie")


def nvcc() -> str | None:
    """Path of nvcc ($CUDA_HOME/bin, then PATH), or None."""
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and (Path(cuda_home) / "bin" / "nvcc").exists():
        return str(Path(cuda_home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def cuda_ep_available() -> bool:
    """Whether the installed onnxruntime can run CUDA kernels (onnxruntime-gpu)."""
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def with_cuda() -> bool:
    """The CUDA kernel goes into the library only when it can run: nvcc and the CUDA EP both present."""
    return os.environ.get("HQEXPORT_KERNELS_CUDA", "1") != "0" and nvcc() is not None and cuda_ep_available()


def _run(command: list[str], what: str, cwd: Path | None = None) -> str:
    try:
        result = subprocess.run(
            command, cwd=cwd, capture_output=True, text=True, timeout=_COMMAND_TIMEOUT_S, check=False
        )
    except FileNotFoundError:
        raise KernelBuildError(f"{what}: {command[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise KernelBuildError(f"{what}: {command[0]} did not finish in {_COMMAND_TIMEOUT_S} s") from None
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-15:]
        raise KernelBuildError(f"{what} failed ({' '.join(command[:2])} ...):\n" + "\n".join(tail))
    return result.stdout


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serializes builds and fetches across processes (pytest workers, parallel CLI runs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


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
    with _locked(cache_dir() / "ort-headers.lock"):
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
        _run(["apt-get", *options, "update"], what)
        with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
            _run(["apt-get", *options, "download", DEBIAN_PACKAGE], what, cwd=Path(tmp))
            debs = sorted(Path(tmp).glob(f"{DEBIAN_PACKAGE}_*.deb"))
            if not debs:
                raise KernelBuildError(f"{what}: apt-get downloaded no {DEBIAN_PACKAGE} package")
            _run(["dpkg-deb", "-x", str(debs[0]), str(Path(tmp) / "root")], f"unpacking {debs[0].name}")
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


def _build_key(cuda: bool) -> str:
    digest = hashlib.sha256()
    for source in (*CPU_SOURCES, *((CUDA_SOURCE,) if cuda else ())):
        digest.update(source.name.encode() + b"\0" + source.read_bytes())
    header_origin = os.environ.get("ORT_INCLUDE_DIR") or f"debian:{debian_suite()}"
    for part in (header_origin, platform.machine(), str(cuda), *_CXX_FLAGS, *CUDA_ARCH_FLAGS):
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()[:16]


def _library_file(cuda: bool) -> Path:
    return cache_dir() / "kernels" / _build_key(cuda) / LIBRARY_NAME


def library_path(build: bool = False) -> Path | None:
    """The built library for the current sources, building it first when `build` is true; else None if absent."""
    library = _library_file(with_cuda())
    if library.exists():
        return library
    return build_library() if build else None


def _isa_flags(isa: str) -> tuple[str, ...]:
    return _ISA_FLAGS[isa] if platform.machine() in ("x86_64", "AMD64") else ()


def compile_cuda_object(out: Path) -> Path:
    """Compiles the CUDA kernel into an object file (the whole build where the CUDA EP is absent: a compile check)."""
    compiler = nvcc()
    if compiler is None:
        raise KernelBuildError("nvcc was not found (set CUDA_HOME or put nvcc on PATH)")
    command = [compiler, "-std=c++17", "-O3", *CUDA_ARCH_FLAGS, "-Xcompiler", "-fPIC,-fvisibility=hidden"]
    command += [f"-I{HERE / 'src'}", "-c", str(CUDA_SOURCE), "-o", str(out)]
    _run(command, f"compiling {CUDA_SOURCE.name} with nvcc")
    return out


def cuda_compile_check() -> Path:
    """Compiles the CUDA kernel to an object file only (no CUDA EP to run it), cached like the library."""
    digest = hashlib.sha256(CUDA_SOURCE.read_bytes() + CPU_SOURCES[2].read_bytes() + " ".join(CUDA_ARCH_FLAGS).encode())
    out = cache_dir() / "kernels" / f"cuda-check-{digest.hexdigest()[:16]}" / "hqq_matmul_cuda.o"
    with _locked(cache_dir() / "kernels.lock"):
        if not out.exists():
            with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
                compile_cuda_object(Path(tmp) / out.name)
                out.parent.mkdir(parents=True, exist_ok=True)
                os.replace(Path(tmp) / out.name, out)
    return out


def _cuda_link_flags() -> list[str]:
    home = Path(nvcc()).resolve().parent.parent  # type: ignore[arg-type]
    return [f"-L{home / 'lib64'}", f"-L{home / 'lib'}", "-lcudart_static", "-ldl", "-lrt", "-lpthread"]


def build_library(force: bool = False) -> Path:
    """Builds (or finds in the cache) the custom-op library and returns its path."""
    cuda = with_cuda()
    library = _library_file(cuda)
    with _locked(cache_dir() / "kernels.lock"):
        if library.exists() and not force:
            return library
        include = ort_include_dir()
        cxx = os.environ.get("CXX", "g++")
        src = HERE / "src"
        with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
            work = Path(tmp)
            jobs = []
            for isa in _ISA_FLAGS:
                flags = [*_CXX_FLAGS, *_isa_flags(isa), f"-DHQX_ISA={isa}"]
                jobs.append([cxx, *flags, "-c", str(src / "cpu_kernel.cpp"), "-o", str(work / f"cpu_{isa}.o")])
            glue = [cxx, *_CXX_FLAGS, *_isa_flags("baseline"), f"-I{include}", f"-I{src}"]
            glue += ["-DHQEXPORT_WITH_CUDA"] if cuda else []
            jobs.append([*glue, "-c", str(src / "custom_op.cpp"), "-o", str(work / "custom_op.o")])
            _run_parallel(jobs)
            objects = sorted(str(path) for path in work.glob("*.o"))
            if cuda:
                objects.append(str(compile_cuda_object(work / "hqq_matmul_cuda.o")))
            link = [cxx, "-shared", "-o", str(work / LIBRARY_NAME), *objects, "-Wl,-z,defs", "-pthread"]
            _run(link + (_cuda_link_flags() if cuda else []), "linking the kernels library")
            library.parent.mkdir(parents=True, exist_ok=True)
            os.replace(work / LIBRARY_NAME, library)
        return library


def _run_parallel(commands: list[list[str]]) -> None:
    """Runs compiler commands side by side; raises with the first failure's output."""
    try:
        processes = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in commands]
    except FileNotFoundError as missing:
        raise KernelBuildError(f"compiling the kernels: {missing.filename} is not installed") from None
    failures = []
    for command, process in zip(commands, processes, strict=True):
        _, stderr = process.communicate(timeout=_COMMAND_TIMEOUT_S)
        if process.returncode != 0:
            failures.append(f"{Path(command[-3]).name}:\n" + "\n".join(stderr.strip().splitlines()[-15:]))
    if failures:
        raise KernelBuildError("compiling the kernels failed:\n" + "\n".join(failures))

"""Builds the hqexport custom-op library (docs/kernels.md).

With onnxruntime's headers (headers.py), the CPU kernel is compiled with g++ twice (x86-64-v2 and
x86-64-v3, picked at run time) and linked with the custom-op glue; the CUDA kernel joins the same library when nvcc
is present and the installed onnxruntime has the CUDA execution provider. Everything lands in a cache folder keyed by
a hash of the sources, flags and headers, so a rebuild happens only when one of them changes.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from hqexport.kernels.headers import debian_suite, ort_include_dir
from hqexport.kernels.toolchain import COMMAND_TIMEOUT_S, KernelBuildError, cache_dir, locked, run_command

HERE = Path(__file__).parent
CPU_SOURCES = (HERE / "src" / "cpu_kernel.cpp", HERE / "src" / "custom_op.cpp", HERE / "src" / "problem.h", HERE / "src" / "shortlist.cpp",
               HERE / "src" / "shortlist.h")
CUDA_SOURCE = HERE / "cuda" / "hqq_matmul.cu"
LIBRARY_NAME = "libhqexport_kernels.so"
#: CUDA targets: SASS for Hopper, PTX that any newer driver can JIT for other GPUs
CUDA_ARCH_FLAGS = ("-gencode=arch=compute_90,code=sm_90", "-gencode=arch=compute_75,code=compute_75")
_CXX_FLAGS = ("-std=c++17", "-O3", "-fPIC", "-fvisibility=hidden", "-fvisibility-inlines-hidden", "-Wall")
_ISA_FLAGS = {"baseline": ("-march=x86-64-v2",), "avx2": ("-march=x86-64-v3", "-ffp-contract=fast")}


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
    run_command(command, f"compiling {CUDA_SOURCE.name} with nvcc")
    return out


def cuda_compile_check() -> Path:
    """Compiles the CUDA kernel to an object file only (no CUDA EP to run it), cached like the library."""
    digest = hashlib.sha256(CUDA_SOURCE.read_bytes() + CPU_SOURCES[2].read_bytes() + " ".join(CUDA_ARCH_FLAGS).encode())
    out = cache_dir() / "kernels" / f"cuda-check-{digest.hexdigest()[:16]}" / "hqq_matmul_cuda.o"
    with locked(cache_dir() / "kernels.lock"):
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
    with locked(cache_dir() / "kernels.lock"):
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
            jobs.append([*glue, "-c", str(src / "shortlist.cpp"), "-o", str(work / "shortlist.o")])
            _run_parallel(jobs)
            objects = sorted(str(path) for path in work.glob("*.o"))
            if cuda:
                objects.append(str(compile_cuda_object(work / "hqq_matmul_cuda.o")))
            link = [cxx, "-shared", "-o", str(work / LIBRARY_NAME), *objects, "-Wl,-z,defs", "-pthread"]
            run_command(link + (_cuda_link_flags() if cuda else []), "linking the kernels library")
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
        _, stderr = process.communicate(timeout=COMMAND_TIMEOUT_S)
        if process.returncode != 0:
            failures.append(f"{Path(command[-3]).name}:\n" + "\n".join(stderr.strip().splitlines()[-15:]))
    if failures:
        raise KernelBuildError("compiling the kernels failed:\n" + "\n".join(failures))

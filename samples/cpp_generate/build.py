"""Configure and build hqexport_generate with CMake; prints the program's path.

    python build.py [--build-dir build]

Headers: $ORT_INCLUDE_DIR, else Debian's libonnxruntime-dev fetched by hqexport's kernel build (cached in
~/.cache/hqexport). Library: the libonnxruntime shared library inside the installed onnxruntime wheel, so the
program runs the same onnxruntime as Python does.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def ort_library() -> Path:
    """onnxruntime/capi/libonnxruntime.so.* of the pip wheel imported by this Python."""
    import onnxruntime

    capi = Path(onnxruntime.__file__).parent / "capi"
    found = sorted(capi.glob("libonnxruntime.so*"))
    if not found:
        raise SystemExit(f"no libonnxruntime.so* in {capi} (is this the onnxruntime wheel?)")
    return found[0]


def ort_include_dir() -> Path:
    from hqexport.kernels.headers import ort_include_dir as find  # honours ORT_INCLUDE_DIR

    return find()


def build(build_dir: Path) -> Path:
    configure = [
        "cmake", "-S", str(HERE), "-B", str(build_dir),
        f"-DORT_INCLUDE_DIR={ort_include_dir()}", f"-DORT_LIBRARY={ort_library()}",
    ]
    subprocess.run(configure, check=True, stdout=sys.stderr)
    subprocess.run(["cmake", "--build", str(build_dir), "-j", "2"], check=True, stdout=sys.stderr)
    return build_dir / "hqexport_generate"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build-dir", type=Path, default=HERE / "build")
    print(build(parser.parse_args().build_dir.resolve()))


if __name__ == "__main__":
    main()

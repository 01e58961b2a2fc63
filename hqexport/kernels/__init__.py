"""Compiled kernels of hqexport::HQQMatMul: an onnxruntime custom-op library (CPU, and CUDA where available).

    library_path(build=True)      # build once (cached), get the .so
    register(session_options)     # load it into an onnxruntime.SessionOptions if it is built
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from hqexport.kernels.build import build_library, library_path
from hqexport.kernels.toolchain import KernelBuildError

__all__ = ["KernelBuildError", "build_library", "library_path", "register"]

if TYPE_CHECKING:
    import onnxruntime as ort


def register(options: ort.SessionOptions, build: bool = False) -> Path | None:
    """Registers the library with `options` when it is built (or `build` is true); returns its path, else None."""
    path = library_path(build=build)
    if path is not None:
        options.register_custom_ops_library(str(path))
    return path

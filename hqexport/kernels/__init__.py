"""Compiled kernels of hqexport::HQQMatMul: an onnxruntime custom-op library (CPU, and CUDA where available).

    library_path(build=True)      # build once (cached), get the .so
    register(session_options)     # load it into an onnxruntime.SessionOptions if it is built
    register_shipped(folder, session_options)  # load the copy an exported folder ships, if it ships one
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from hqexport.errors import HQExportError
from hqexport.kernels.build import LIBRARY_NAME, build_library, library_path
from hqexport.kernels.toolchain import KernelBuildError

__all__ = ["KernelBuildError", "build_library", "library_path", "register", "register_shipped"]

if TYPE_CHECKING:
    import onnxruntime as ort


def register(options: ort.SessionOptions, build: bool = False) -> Path | None:
    """Registers the library with `options` when it is built (or `build` is true); returns its path, else None."""
    path = library_path(build=build)
    if path is not None:
        options.register_custom_ops_library(str(path))
    return path


def register_shipped(folder: Path, options: ort.SessionOptions) -> Path | None:
    """Registers the library an exported `folder` ships (as its samples and onnxruntime-genai do) and returns its
    path; None when the folder ships none, and its hqexport ops then run as their ONNX function bodies."""
    path = folder / LIBRARY_NAME
    if not path.is_file():
        return None
    try:
        options.register_custom_ops_library(str(path))
    except Exception as error:  # onnxruntime raises its own exception types
        raise HQExportError(
            f"the folder's kernels library does not load on this machine ({error}); run it where it was converted, or "
            "convert with --no-kernels", path,
        ) from None
    return path

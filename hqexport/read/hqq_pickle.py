"""Reader for hqq's `save_quantized` folders: config.json + qmodel.pt.

qmodel.pt is a torch pickle of {module name: {key: value}}: HQQ layers hold W_q and hqq's meta (plain Python
values, torch.Size, torch.dtype, tensors), other modules their parameters. It is only ever loaded with
`torch.load(weights_only=True)`; a pickle that needs anything more is refused, never executed.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path

import torch

from hqexport.errors import HQExportError
from hqexport.model import QuantizedLinear, QuantizedModel
from hqexport.read.folder import assemble, read_config, source_file
from hqexport.read.meta import layer_from_meta

WEIGHTS_FILE = "qmodel.pt"


def load_pickle(path: Path) -> dict[str, dict]:
    """The module dict of a qmodel.pt, loaded without executing code."""
    if not zipfile.is_zipfile(path):
        raise HQExportError("is not a torch.save zip archive (truncated, or not written by torch.save)", path)
    try:
        state = torch.load(path, weights_only=True, map_location="cpu", mmap=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        what = f" (it asks for {found.group(1)})" if found else ""
        raise HQExportError(
            f"refused: this pickle needs more than tensors and plain values to load{what}; it was not executed", path
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as error:
        raise HQExportError(f"is not a readable torch file ({type(error).__name__}: {error})", path) from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, dict) for k, v in state.items()):
        raise HQExportError("is not an hqq save_quantized file (expected {module name: {key: value}})", path)
    return state


def read_hqq_pickle(root: Path) -> QuantizedModel:
    """Read an hqq `save_quantized` folder."""
    config = read_config(root)
    weights = source_file(root, WEIGHTS_FILE)
    state = load_pickle(weights)
    linears: dict[str, QuantizedLinear] = {}
    tensors: dict[str, torch.Tensor] = {}
    for module, entries in state.items():
        if "W_q" in entries:
            linears[module] = _layer(weights, module, entries)
            continue
        for key, value in entries.items():
            if not isinstance(value, torch.Tensor):
                raise HQExportError(f"module {module} holds a non-tensor {key!r} but no W_q", weights)
            tensors[f"{module}.{key}" if module else key] = value.detach()
    return assemble("hqq-pickle", root, config, linears, tensors, weights, [root / "config.json", weights])


def _layer(weights: Path, module: str, entries: dict) -> QuantizedLinear:
    meta = {key: value for key, value in entries.items() if key not in ("W_q", "bias")}
    packed, bias = entries["W_q"], entries.get("bias")
    if not isinstance(packed, torch.Tensor) or not (bias is None or isinstance(bias, torch.Tensor)):
        raise HQExportError(f"layer {module}: W_q and bias must be tensors", weights)
    try:
        return layer_from_meta(module, packed, meta, bias)
    except HQExportError as error:
        raise HQExportError(error.message, weights) from None
    except (KeyError, TypeError, ValueError, OverflowError) as error:
        raise HQExportError(f"layer {module} has malformed hqq metadata ({type(error).__name__}: {error})", weights) from None

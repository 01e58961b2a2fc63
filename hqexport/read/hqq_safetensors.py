"""Reader for HQQ safetensors (transformers 4.x / hqq `save_to_safetensors` layout), single file or sharded.

An HQQ linear is recognised by its `<module>.W_q` key; its metadata sits beside it as small tensors that
hqq encodes as ASCII (strings, dtypes: uint8 arrays), uint8 (bools), int32 (ints), float32 (nbits 1.58) and
int64 (shape). hqq decodes dtypes with `eval`; here they go through a fixed table and nothing is evaluated.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from hqexport.errors import HQExportError
from hqexport.model import QuantizedLinear, QuantizedModel
from hqexport.read.folder import assemble, read_config, source_file
from hqexport.read.meta import layer_from_meta

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

_DTYPES = {
    f"torch.{name}": getattr(torch, name)
    for name in ("float32", "float16", "bfloat16", "float64", "uint8", "int8", "int16", "int32", "int64")
}


def _ascii(value: torch.Tensor) -> str:
    if value.dtype != torch.uint8 or value.dim() != 1:
        raise ValueError(f"expected a 1-D uint8 ASCII tensor, got {value.dtype} {list(value.shape)}")
    try:
        return bytes(value.tolist()).decode("ascii")
    except UnicodeDecodeError:
        raise ValueError("not ASCII") from None


def _dtype(value: torch.Tensor) -> torch.dtype:
    text = _ascii(value)
    if text not in _DTYPES:
        raise ValueError(f"unknown dtype {text!r}")
    return _DTYPES[text]


def _scalar(value: torch.Tensor) -> float | int:
    if value.numel() != 1:
        raise ValueError(f"expected one value, got shape {list(value.shape)}")
    return value.item()


def _int(value: torch.Tensor) -> int:
    number = _scalar(value)
    if number != int(number):
        raise ValueError(f"expected an integer, got {number}")
    return int(number)


def _nbits(value: torch.Tensor) -> float | int:
    """hqq writes int32 for whole widths and float32 for 1.58 (1.5800000429...): keep two decimals."""
    bits = round(float(_scalar(value)), 2)
    return int(bits) if bits.is_integer() else bits


def _bool(value: torch.Tensor) -> bool:
    return bool(_scalar(value))


def _shape(value: torch.Tensor) -> tuple[int, ...]:
    if value.dtype.is_floating_point or value.dim() != 1:
        raise ValueError(f"expected a 1-D integer tensor, got {value.dtype} {list(value.shape)}")
    return tuple(int(v) for v in value.tolist())


#: hqq meta key -> decoder; keys not listed (optimize, round_zero, offload_meta, ...) are not needed.
_DECODERS: dict[str, Callable[[torch.Tensor], Any]] = {
    "scale": lambda t: t,
    "zero": lambda t: t,
    "shape": _shape,
    "nbits": _nbits,
    "group_size": _int,
    "axis": _int,
    "packing": _ascii,
    "compute_dtype": _dtype,
    "unpack_view_dtype": _dtype,
    "view_as_float": _bool,
    "quant_scale": _bool,
    "quant_zero": _bool,
}


def weight_files(root: Path) -> list[Path]:
    """The safetensors files of the folder: the index's shards, or model.safetensors, or every *.safetensors."""
    index = root / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(source_file(root, INDEX_FILE).read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
            raise HQExportError(f"is not a valid safetensors index ({type(error).__name__}: {error})", index) from None
        missing = [name for name in names if not (root / name).is_file()]
        if missing:
            raise HQExportError(f"lists {', '.join(missing)}, which is not in the folder", index)
        return [source_file(root, name) for name in names]
    if (root / SINGLE_FILE).is_file():
        return [source_file(root, SINGLE_FILE)]
    return [source_file(root, path.name) for path in sorted(root.glob("*.safetensors"))]


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file; any damage becomes an HQExportError naming the file."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as error:
        raise HQExportError(f"is not a readable safetensors file ({error})", path) from None


def has_hqq_layers(files: list[Path]) -> bool:
    """Whether any file has a `.W_q` key (reads headers only)."""
    for path in files:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                if any(key.endswith(".W_q") for key in handle.keys()):
                    return True
        except (SafetensorError, OSError, RuntimeError, ValueError) as error:
            raise HQExportError(f"is not a readable safetensors file ({error})", path) from None
    return False


def read_hqq_safetensors(root: Path) -> QuantizedModel:
    """Read a folder of HQQ safetensors (config.json + model.safetensors or shards with an index)."""
    config = read_config(root)
    files = weight_files(root)
    if not files:
        raise HQExportError("has no safetensors files", root)
    state: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    for path in files:
        for key, value in load_tensors(path).items():
            state[key] = value
            origin[key] = path
    modules = sorted(key.removesuffix(".W_q") for key in state if key.endswith(".W_q"))
    linears: dict[str, QuantizedLinear] = {}
    for module in modules:
        linears[module] = _layer(module, state, origin[f"{module}.W_q"])
    prefixes = tuple(module + "." for module in modules)
    tensors = {key: value for key, value in state.items() if not key.startswith(prefixes)}
    weights = files[0] if len(files) == 1 else root / INDEX_FILE
    read = [root / "config.json", *files] + ([root / INDEX_FILE] if (root / INDEX_FILE).is_file() else [])
    return assemble("hqq-safetensors", root, config, linears, tensors, weights, read)


def _layer(module: str, state: dict[str, torch.Tensor], path: Path) -> QuantizedLinear:
    meta: dict[str, Any] = {}
    for key, decode in _DECODERS.items():
        value = state.get(f"{module}.{key}")
        if value is None:
            continue
        try:
            meta[key] = decode(value)
        except (ValueError, OverflowError) as error:
            raise HQExportError(f"layer {module}: metadata {key!r} is malformed ({error})", path) from None
    missing = [key for key in ("nbits", "group_size", "axis", "shape", "packing") if key not in meta]
    if missing and not (meta.get("quant_scale") or meta.get("quant_zero")):
        raise HQExportError(f"layer {module} lacks hqq metadata {', '.join(missing)}", path)
    try:
        return layer_from_meta(module, state[f"{module}.W_q"], meta, state.get(f"{module}.bias"))
    except HQExportError as error:
        raise HQExportError(error.message, path) from None
    except (KeyError, TypeError, ValueError, OverflowError) as error:
        raise HQExportError(f"layer {module} has malformed hqq metadata ({type(error).__name__}: {error})", path) from None

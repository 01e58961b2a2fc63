"""hqexport.json: what was exported, from what, with which tools (format in .notes/common.md, docs)."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path
from typing import Any

from hqexport import __version__
from hqexport.export.decoder import DecoderIO
from hqexport.model import QuantizedModel

FORMAT_VERSION = 1
_LIBRARIES = ("torch", "hqq", "transformers", "onnx", "onnxruntime")


def tool_versions() -> dict[str, str]:
    versions = {"hqexport": __version__}
    for name in _LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def build_manifest(
    qmodel: QuantizedModel,
    io: DecoderIO,
    layer_ops: dict[str, dict[str, Any]],
    *,
    architecture: str,
    dtype: str,
    opset: int,
    outputs: dict[str, str],
    adapters: dict[str, dict[str, Any]],
    lm_head: dict[str, Any],
) -> dict[str, Any]:
    """The manifest dict.

    layer_ops: per layer path, the op computing it ("op", "node", "initializers", optional "lowering");
    outputs: each written file (path relative to the folder) -> sha256; adapters: the adapters section;
    lm_head: how the head is stored (lower/lm_head.py HeadChoice). model.lossy lists every choice that
    departs from the source's exact result (validate then measures the loss instead of requiring exactness).
    """
    accuracy_levels = {entry.get("lowering", {}).get("accuracy_level") for entry in layer_ops.values()}
    lossy = [f"accuracy_level {level}" for level in sorted(level for level in accuracy_levels if level)]
    if lm_head.get("lossy"):
        lossy.append(f"lm_head {lm_head['format']}" + (" (the tied embedding too)" if lm_head.get("shared_with_embedding") else ""))
    source = qmodel.provenance
    layers = {}
    for path, layer in qmodel.linears.items():
        layers[path] = {
            "nbits": layer.fmt.nbits,
            "group_size": layer.fmt.group_size,
            "axis": layer.fmt.axis,
            "shape": [layer.out_features, layer.in_features],
            "compute_dtype": _dtype_name(layer.compute_dtype),
            **layer_ops[path],
        }
    return {
        "format_version": FORMAT_VERSION,
        "tool": tool_versions(),
        "source": {
            "path": str(Path(source.path).resolve()) if source.path is not None else None,
            "kind": source.kind,
            "files": dict(source.files),
        },
        "model": {
            "architecture": architecture,
            "model_type": qmodel.config.get("model_type"),
            "num_hidden_layers": io.num_layers,
            "num_key_value_heads": io.num_key_value_heads,
            "head_dim": io.head_dim,
            "vocab_size": qmodel.config.get("vocab_size"),
            "dtype": dtype,
            "opset": opset,
            "uses_position_ids": "position_ids" in io.input_names,
            "lm_head": lm_head,
            "lossy": lossy,
        },
        "layers": layers,
        "adapters": adapters,
        "outputs": outputs,
    }

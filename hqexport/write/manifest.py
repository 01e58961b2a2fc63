"""hqexport.json: what was exported, from what, with which tools (format in .notes/common.md, docs)."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path
from typing import Any

from hqexport import __version__
from hqexport.export.decoder import DecoderIO
from hqexport.export.onnx_export import LayerNode
from hqexport.model import QuantizedModel
from hqexport.ops.schema import DOMAIN, OP_TYPE

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
    layer_nodes: dict[str, LayerNode],
    *,
    architecture: str,
    dtype: str,
    opset: int,
    outputs: dict[str, str],
) -> dict[str, Any]:
    """The manifest dict; `outputs` maps each written file (relative name) to its sha256."""
    source = qmodel.provenance
    layers = {}
    for path, layer in qmodel.linears.items():
        node = layer_nodes[path]
        layers[path] = {
            "nbits": layer.fmt.nbits,
            "group_size": layer.fmt.group_size,
            "axis": layer.fmt.axis,
            "shape": [layer.out_features, layer.in_features],
            "compute_dtype": _dtype_name(layer.compute_dtype),
            "op": f"{DOMAIN}.{OP_TYPE}",
            "node": node.node,
            "initializers": dict(node.initializers),
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
        },
        "layers": layers,
        "adapters": {},
        "outputs": outputs,
    }

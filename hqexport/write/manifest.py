"""Build hqexport.json's content (hqexport/manifest.py) from the source model and the exported graph's layers."""

from __future__ import annotations

from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from hqexport import __version__
from hqexport.export.decoder import DecoderIO
from hqexport.export.graph import LayerNode
from hqexport.manifest import LayerEntry, Manifest, ModelInfo, SourceInfo
from hqexport.model import QuantizedModel
from hqexport.ops.nbits import OP_TYPE as NBITS_OP_TYPE
from hqexport.ops.schema import DOMAIN, MS_DOMAIN

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


STOCK_NBITS_OP = f"{MS_DOMAIN}.MatMulNBits"


def _lossy_level(level: int, compute_dtype: Any) -> bool:
    """Whether a layer's accuracy level departs from HQQ's result: 4 always (int8 activations); 1 for a float16 /
    bfloat16 layer (its weights computed in fp32, not rounded to that dtype as hqq does)."""
    return level == 4 or (level == 1 and _dtype_name(compute_dtype) != "float32")


def _fp32_weights(op: str, kernels: bool) -> bool:
    """Whether a layer's `op` computes its weights as MatMulNBits does, in fp32, without a float16 / bfloat16
    layer's roundings: stock MatMulNBits (--ops ort), or an HQQMatMulNBits node in a folder without the kernels
    library, which runs its function body (MatMulNBits) instead."""
    return op == STOCK_NBITS_OP or (not kernels and op.startswith(f"{DOMAIN}.{NBITS_OP_TYPE}"))


def build_manifest(
    qmodel: QuantizedModel,
    io: DecoderIO,
    layers: Mapping[str, LayerNode],
    *,
    architecture: str,
    dtype: str,
    opset: int,
    outputs: dict[str, str],
    adapters: dict[str, dict[str, Any]],
    lm_head: dict[str, Any],
    kernels: bool = True,
) -> Manifest:
    """The manifest of an export.

    layers: where each of the source's quantized layers is in the graph; outputs: each written file (path relative
    to the folder) -> sha256; adapters: the adapters section; lm_head: how the head is stored (lower/lm_head.py
    HeadChoice); kernels: whether the folder ships the kernels library. model.lossy lists every choice that departs
    from the source's exact result (validate then measures the loss instead of requiring exactness): an accuracy
    level only where it changes a layer's result.
    """
    lossy_levels = {
        layers[path].lowering.accuracy_level
        for path, layer in qmodel.linears.items()
        if layers[path].lowering and _lossy_level(layers[path].lowering.accuracy_level, layer.compute_dtype)
    }
    lossy = [f"accuracy_level {level}" for level in sorted(lossy_levels)]
    if dtype == "fp32" and any(
        _fp32_weights(layers[path].op, kernels) and _dtype_name(layer.compute_dtype) != "float32" for path, layer in qmodel.linears.items()
    ):
        lossy.append("MatMulNBits weights in fp32 for float16 / bfloat16 layers")
    if lm_head.get("lossy"):
        lossy.append(f"lm_head {lm_head['format']}" + (" (the tied embedding too)" if lm_head.get("shared_with_embedding") else ""))
    source = qmodel.provenance
    entries = {}
    for path, layer in qmodel.linears.items():
        node = layers[path]
        entries[path] = LayerEntry(
            nbits=layer.fmt.nbits, group_size=layer.fmt.group_size, axis=layer.fmt.axis, shape=layer.shape,
            compute_dtype=_dtype_name(layer.compute_dtype), op=node.op, node=node.node,
            initializers=dict(node.initializers), rows=node.rows, lowering=node.lowering,
        )
    return Manifest(
        tool=tool_versions(),
        source=SourceInfo(
            path=str(Path(source.path).resolve()) if source.path is not None else None, kind=source.kind, files=dict(source.files)
        ),
        model=ModelInfo(
            architecture=architecture,
            model_type=qmodel.config.get("model_type"),
            num_hidden_layers=io.num_layers,
            num_key_value_heads=io.num_key_value_heads,
            head_dim=io.head_dim,
            vocab_size=qmodel.config.get("vocab_size"),
            dtype=dtype,
            opset=opset,
            uses_position_ids="position_ids" in io.input_names,
            lm_head=lm_head,
            lossy=lossy,
        ),
        layers=entries,
        adapters=adapters,
        outputs=outputs,
    )

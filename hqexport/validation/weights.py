"""The weight each quantized ONNX node implies, decoded from its initializers with hqexport's numpy path.

One decoder per op the export may emit, keyed like the manifest's `layers[...].op`:

- `hqexport.HQQMatMul`: canonical codes, scale and zero in the compute dtype; decoded with
  `hqexport.ops.reference.dequantize_canonical` (the op's numpy reference) and compared with hqq's
  `HQQLinear.dequantize()` **exactly** (same dtype, array_equal).
- `com.microsoft.MatMulNBits` and `hqexport.HQQMatMulNBits[LoRA]` (lowered layers, docs/ops.md): codes in MatMulNBits'
  B, uint8 zero points and scales in the activation dtype, plus the optional `zero_correction` per group (the
  fused op's sixth input; a separate correction MatMul's otherwise). The implied weight
  (q - zp) * s + corr is evaluated in float64; it cannot be bit-identical to hqq's (one rounding more), so it
  must agree to a few units in the last place of the coarser of the compute and activation dtypes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from hqexport.formats import unpack_canonical
from hqexport.manifest import LayerEntry
from hqexport.ops.nbits import FUNCTIONS as NBITS_FUNCTIONS
from hqexport.ops.reference import dequantize_canonical
from hqexport.ops.schema import DOMAIN, HQQ_OP, MS_DOMAIN, OP_TYPE
from hqexport.validation.exported import Exported

NBITS_OP = f"{MS_DOMAIN}.MatMulNBits"
#: onnxruntime's MatMulNBits and hqexport's ops on its codes (with adapters, gating inside the node)
_NBITS_OP_TYPES = ("MatMulNBits", *NBITS_FUNCTIONS)


@dataclass
class DecodedWeight:
    weight: np.ndarray  # [N, K]
    exact: bool  # True: must equal hqq's dequantize() bit for bit; False: within a few ulp


class DecodeError(Exception):
    """The ONNX side of one layer is not what the manifest says (missing initializer, wrong attributes)."""


def _nodes_by_name(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {node.name: node for node in model.graph.node}


def _attrs(node: onnx.NodeProto) -> dict[str, int]:
    return {attribute.name: helper.get_attribute_value(attribute) for attribute in node.attribute}


def _hqq(exported: Exported, name: str, entry: LayerEntry, nodes: dict[str, onnx.NodeProto]) -> DecodedWeight:
    names = entry.initializers
    node = nodes.get(entry.node)
    if node is None or node.op_type != OP_TYPE:
        raise DecodeError(f"no HQQMatMul node named {entry.node!r} in model.onnx")
    attrs = _attrs(node)
    n, k = _node_n(entry, attrs), entry.shape[1]
    if (attrs.get("N"), attrs.get("K"), attrs.get("group_size"), attrs.get("axis")) != (n, k, entry.group_size, entry.axis):
        raise DecodeError(f"node attributes {attrs} disagree with the manifest {entry.to_json()}")
    try:
        packed, scale, zero = (exported.initializer(names[key]) for key in ("weight", "scale", "zero"))
    except KeyError as error:
        raise DecodeError(f"initializer {error} is missing") from None
    if list(node.input[1:4]) != [names["weight"], names["scale"], names["zero"]]:
        raise DecodeError(f"node {node.name} reads {list(node.input[1:4])}, the manifest names {names}")
    if scale.dtype != zero.dtype or scale.size != n * k // attrs["group_size"]:
        raise DecodeError(f"scale {scale.dtype}{list(scale.shape)} / zero {zero.dtype}{list(zero.shape)} do not fit")
    weight = dequantize_canonical(
        packed, scale, zero, N=n, K=k, bits=attrs["bits"], group_size=attrs["group_size"], axis=attrs["axis"]
    )
    return DecodedWeight(_rows(weight, entry), exact=True)


def _matmulnbits(exported: Exported, name: str, entry: LayerEntry, nodes: dict[str, onnx.NodeProto]) -> DecodedWeight:
    names = {key: f"{entry.node}.{key}" for key in ("B", "scales", "zero_points", "zero_correction")}
    names.update(entry.initializers)
    node = next((n for n in nodes.values() if n.op_type in _NBITS_OP_TYPES and len(n.input) > 1 and n.input[1] == names["B"]), None)
    if node is None:
        raise DecodeError(f"no MatMulNBits or HQQMatMulNBits node reads {names['B']!r}")
    attrs = _attrs(node)
    n, k, bits, block = attrs["N"], attrs["K"], attrs["bits"], attrs["block_size"]
    if [n, k] != [_node_n(entry, attrs), entry.shape[1]] or block != entry.group_size:
        raise DecodeError(f"MatMulNBits attributes {attrs} disagree with the manifest {entry.to_json()}")
    blocks = k // block
    try:
        b = exported.initializer(names["B"])
        scales = exported.initializer(names["scales"]).astype(np.float64).reshape(n, blocks)
        zp_packed = exported.initializer(node.input[3]) if len(node.input) > 3 and node.input[3] else None
    except KeyError as error:
        raise DecodeError(f"initializer {error} is missing") from None
    codes = unpack_canonical(b.reshape(n, -1), k, bits).astype(np.float64)
    if zp_packed is None:
        zp = np.full((n, blocks), float(1 << (bits - 1)))
    elif zp_packed.dtype == np.uint8:
        zp = unpack_canonical(zp_packed.reshape(n, -1), blocks, bits).astype(np.float64)
    else:
        zp = zp_packed.astype(np.float64).reshape(n, blocks)
    weight = (codes.reshape(n, blocks, block) - zp[:, :, None]) * scales[:, :, None]
    if exported.has_initializer(names["zero_correction"]):
        correction = exported.initializer(names["zero_correction"]).astype(np.float64)  # [blocks, N]
        weight = weight + correction.T[:, :, None]
    return DecodedWeight(_rows(weight.reshape(n, k), entry), exact=False)


def _node_n(entry: LayerEntry, attrs: dict) -> int:
    """N of the node computing the layer: the layer's own, or in a packed node (the manifest's "rows" [start, stop)
    name the layer's part) the node's, if the part fits in it."""
    if entry.rows is None:
        return entry.shape[0]
    start, stop = entry.rows
    fits = 0 <= start and stop - start == entry.shape[0] and stop <= int(attrs.get("N", -1))
    return int(attrs["N"]) if fits else -1


def _rows(weight: np.ndarray, entry: LayerEntry) -> np.ndarray:
    return weight if entry.rows is None else weight[entry.rows[0] : entry.rows[1]]


DECODERS: dict[str, Callable[[Exported, str, LayerEntry, dict], DecodedWeight]] = {
    HQQ_OP: _hqq, NBITS_OP: _matmulnbits, **{f"{DOMAIN}.{op_type}": _matmulnbits for op_type in NBITS_FUNCTIONS},
}


def decode_layers(exported: Exported) -> dict[str, DecodedWeight | DecodeError]:
    """Every manifest layer's implied weight, or the reason it could not be decoded."""
    nodes = _nodes_by_name(exported.graph)
    decoded: dict[str, DecodedWeight | DecodeError] = {}
    for name, entry in exported.layers.items():
        decoder = DECODERS.get(entry.op)
        if decoder is None:
            decoded[name] = DecodeError(f"op {entry.op!r} has no weight decoder")
            continue
        try:
            decoded[name] = decoder(exported, name, entry, nodes)
        except DecodeError as error:
            decoded[name] = error
    return decoded

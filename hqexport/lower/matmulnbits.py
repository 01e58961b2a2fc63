"""Lower hqexport.HQQMatMul to onnxruntime's com.microsoft.MatMulNBits where that op expresses the layer.

HQQ zero points are fractional; MatMulNBits runs its fast kernels only with uint8 zero points. So each group's
zero z is split into an integer part and a correction (design.md §5):

    (q - z) * s  =  (q - zr) * s  +  (zr - z) * s,         zr = clip(round(z), 0, 2^bits - 1)
    Y = MatMulNBits(A; q, s, zr)  +  (A summed over each K-group) @ corr^T,   corr = (zr - z) * s

which is exact up to float rounding. 3-bit codes ride in a 4-bit container and 1-bit codes in a 2-bit one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from hqexport.errors import HQExportError
from hqexport.formats.canonical import pack_canonical, unpack_canonical

_CONTAINER_BITS = {1: 2, 2: 2, 3: 4, 4: 4, 8: 8}
MS_DOMAIN = "com.microsoft"


@dataclass(frozen=True)
class LayerDecision:
    """What the pass did with one HQQMatMul node (recorded in the manifest)."""

    op: str  # "com.microsoft.MatMulNBits" or "hqexport.HQQMatMul"
    reason: str | None = None  # why the layer stayed an hqexport op
    node: str | None = None  # the MatMulNBits node now computing the layer
    initializers: dict[str, str] | None = None  # its inputs: "B", "scales", "zero_points" (+ "zero_correction")
    container_bits: int | None = None
    accuracy_level: int | None = None
    zero_correction: bool | None = None  # False when every zero point was already an integer in range

    def to_json(self) -> dict:
        return {key: value for key, value in asdict(self).items() if value is not None}


def matmulnbits_blocker(*, bits: int, group_size: int, axis: int, in_features: int) -> str | None:
    """Why MatMulNBits cannot express this layer exactly, or None when it can."""
    if axis != 1:
        return "axis 0 groups run along the output dimension; MatMulNBits blocks run along K"
    if bits not in _CONTAINER_BITS:
        return f"{bits}-bit storage has no MatMulNBits container"
    if group_size < 16 or group_size & (group_size - 1):
        return f"group size {group_size} is not a power of 2 >= 16"
    if in_features % group_size:
        return f"group size {group_size} does not divide K={in_features}, so groups straddle rows"
    return None


class LowerToMatMulNBits(ir.passes.InPlacePass):
    """Replace every expressible HQQMatMul node by MatMulNBits (+ exact zero-point correction).

    mode "auto" keeps the others as hqexport ops; mode "ort" raises HQExportError for the first that cannot be
    lowered. `decisions` maps node names to what was done.
    """

    def __init__(self, mode: str = "auto", accuracy_level: int = 0) -> None:
        super().__init__()
        if mode not in ("auto", "ort"):
            raise ValueError(f"mode must be 'auto' or 'ort', not {mode!r}")
        self.mode = mode
        self.accuracy_level = accuracy_level
        self.decisions: dict[str, LayerDecision] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for node in list(graph):
            if node.domain != "hqexport" or node.op_type != "HQQMatMul":
                continue
            attrs = {key: node.attributes.get_int(key) for key in ("N", "K", "bits", "group_size", "axis")}
            blocker = matmulnbits_blocker(
                bits=attrs["bits"], group_size=attrs["group_size"], axis=attrs["axis"], in_features=attrs["K"]
            )
            if blocker is not None:
                if self.mode == "ort":
                    raise HQExportError(f"--ops ort: layer {node.name} cannot run as MatMulNBits: {blocker}")
                self.decisions[node.name] = LayerDecision(op="hqexport.HQQMatMul", reason=blocker)
                continue
            self.decisions[node.name] = self._lower(graph, node, **attrs)
            modified = True
        if modified:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
            common_passes.RemoveUnusedNodesPass()(model)
            common_passes.RemoveUnusedFunctionsPass()(model)
            common_passes.RemoveUnusedOpsetsPass()(model)
        return ir.passes.PassResult(model, modified)

    def _lower(self, graph: ir.Graph, node: ir.Node, *, N: int, K: int, bits: int, group_size: int, axis: int) -> LayerDecision:
        a, w, scale, zero, *rest = node.inputs
        bias = rest[0] if rest else None
        act_dtype = a.dtype
        if act_dtype is None:
            raise HQExportError(f"layer {node.name}: the input's dtype is unknown, cannot lower it")
        act_np = act_dtype.numpy()
        container = _CONTAINER_BITS[bits]
        blocks = K // group_size
        codes = unpack_canonical(_const(w, node), K, bits)
        packed = pack_canonical(codes, container).reshape(N, blocks, group_size * container // 8)
        s = _const(scale, node).astype(np.float64).reshape(N, blocks)
        z = _const(zero, node).astype(np.float64).reshape(N, blocks)
        zr = np.clip(np.round(z), 0, (1 << container) - 1)
        correction = (zr - z) * s

        prefix = node.name or w.name
        new_nodes: list[ir.Node] = []
        names: dict[str, str] = {}

        def initializer(suffix: str, array: np.ndarray) -> ir.Value:
            names[suffix] = f"{prefix}.{suffix}"
            value = ir.Value(name=names[suffix], const_value=ir.tensor(array, name=names[suffix]))
            graph.register_initializer(value)
            return value

        def add(op_type: str, inputs: list[ir.Value | None], domain: str = "", **attributes) -> ir.Value:
            new = ir.node(op_type, inputs, attributes or None, domain=domain, name=f"{prefix}/{op_type}_{len(new_nodes)}")
            new_nodes.append(new)
            return new.outputs[0]

        y = add(
            "MatMulNBits",
            [a, initializer("B", packed), initializer("scales", s.reshape(-1).astype(act_np)),
             initializer("zero_points", pack_canonical(zr.astype(np.uint8), container).reshape(-1))],
            domain=MS_DOMAIN, K=K, N=N, bits=container, block_size=group_size, accuracy_level=self.accuracy_level,
        )
        needs_correction = bool(np.any(correction != 0))
        if needs_correction:
            leading = add("Shape", [a], end=-1)
            grouped_shape = add("Concat", [leading, initializer("group_shape", np.array([blocks, group_size], np.int64))], axis=0)
            group_sums = add(
                "ReduceSum", [add("Reshape", [a, grouped_shape]), initializer("sum_axes", np.array([-1], np.int64))],
                keepdims=0,
            )
            y = add("Add", [y, add("MatMul", [group_sums, initializer("zero_correction", correction.T.astype(act_np))])])
        if bias is not None:
            y = add("Add", [y, bias])
        ir.convenience.replace_nodes_and_values(graph, node, [node], new_nodes, [node.outputs[0]], [y])
        for value in (w, scale, zero):
            if not value.uses() and value.name in graph.initializers:
                del graph.initializers[value.name]
        return LayerDecision(
            op="com.microsoft.MatMulNBits",
            node=new_nodes[0].name,
            initializers={key: names[key] for key in ("B", "scales", "zero_points", "zero_correction") if key in names},
            container_bits=container,
            accuracy_level=self.accuracy_level,
            zero_correction=needs_correction,
        )


def _const(value: ir.Value | None, node: ir.Node) -> np.ndarray:
    if value is None or value.const_value is None:
        raise HQExportError(f"layer {node.name}: packed weights, scale and zero must be initializers to lower it")
    return value.const_value.numpy()

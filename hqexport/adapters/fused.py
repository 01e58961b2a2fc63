"""ONNX pass: LoRA inside the layer's node, so that an adapter adds no nodes and an inactive one no work.

Where every target layer runs as an hqexport.HQQMatMulNBits node (convert --ops auto with the kernel library, fp32,
accuracy level 0) and no adapter uses DoRA, each node computing adapted layers becomes an HQQMatMulNBitsLoRA node
(ops/nbits.py) instead of getting graph.py's branches. A node packing several layers (q/k/v, gate/up) carries one
segment per adapted layer, in output-column order; its parameters are named after the node's module path:

    <path>.lora_A.weight  [segments * r, K]     each segment's lora_A (PEFT's [r, in]), stacked
    <path>.lora_B.weight  [sum of widths, r]    each segment's scaling * lora_B (PEFT's [out, r]), stacked

An adapter that targets only some of the segments, or with a smaller rank for some, fills the rest with zeros. In
separate mode both are graph inputs with rank-0 defaults ([0, K], [widths, 0]), so the base model runs unless an
adapter overrides them; in bake mode they are constants.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from hqexport.adapters.graph import add_parameter, lora_a_name, lora_b_name
from hqexport.adapters.spec import AdapterSpec
from hqexport.adapters.values import lora_matmul_weights
from hqexport.errors import HQExportError
from hqexport.export.graph import LayerNode
from hqexport.ops.nbits import LORA_COLUMNS, LORA_OP_TYPE
from hqexport.ops.nbits import OP_TYPE as NBITS_OP_TYPE
from hqexport.ops.schema import DOMAIN


@dataclass(frozen=True)
class FusedGroup:
    """The adapted layers of one HQQMatMulNBits node."""

    path: str  # module path of the node (a packed node's, e.g. model.layers.0.mlp.gate_up_proj): names its parameters
    node: str
    in_features: int
    modules: tuple[str, ...]  # the adapted layers, in output-column order
    columns: tuple[tuple[int, int], ...]  # each one's output columns [start, stop) in the node's output

    @property
    def widths(self) -> int:
        return sum(stop - start for start, stop in self.columns)


def fused_groups(layers: Mapping[str, LayerNode], targets: Collection[str]) -> dict[str, FusedGroup]:
    """The HQQMatMulNBits nodes computing `targets` (module paths of `layers`), by node name."""
    members: dict[str, list[str]] = {}
    for module in targets:
        layer = layers.get(module)
        if layer is None:
            raise HQExportError(f"the exported graph has no node for target module {module}")
        members.setdefault(layer.node, []).append(module)
    groups = {}
    for node, modules in members.items():
        columns = {m: layers[m].rows or (0, layers[m].shape[0]) for m in modules}
        ordered = tuple(sorted(modules, key=lambda m: columns[m]))
        first = layers[ordered[0]]
        groups[node] = FusedGroup(first.module, node, first.shape[1], ordered, tuple(columns[m] for m in ordered))
    return groups


def group_parameters(group: FusedGroup, spec: AdapterSpec, dtype: np.dtype) -> dict[str, np.ndarray] | None:
    """The two parameters of `group` for one adapter, or None when the adapter adapts none of its layers."""
    factors = {m: lora_matmul_weights(spec.modules[m], dtype) for m in group.modules if m in spec.modules}
    if not factors:
        return None
    rank = max(a_t.shape[1] for a_t, _ in factors.values())
    lora_a = np.zeros((len(group.modules) * rank, group.in_features), dtype)
    lora_b = np.zeros((group.widths, rank), dtype)
    row = 0
    for s, (module, (start, stop)) in enumerate(zip(group.modules, group.columns)):
        if module in factors:
            a_t, b_t = factors[module]
            lora_a[s * rank : s * rank + a_t.shape[1]] = a_t.T
            lora_b[row : row + stop - start, : b_t.shape[0]] = b_t.T
        row += stop - start
    if not (np.isfinite(lora_a).all() and np.isfinite(lora_b).all()):
        raise HQExportError(f"adapter {spec.name}: {', '.join(factors)} have factors beyond {np.dtype(dtype).name}'s range")
    return {lora_a_name(group.path): lora_a, lora_b_name(group.path): lora_b}


def rank0_parameters(group: FusedGroup, dtype: np.dtype) -> dict[str, np.ndarray]:
    """The group's parameters of an adapter that leaves it alone."""
    return {
        lora_a_name(group.path): np.zeros((0, group.in_features), dtype),
        lora_b_name(group.path): np.zeros((group.widths, 0), dtype),
    }


class FuseLora(ir.passes.InPlacePass):
    """Turn each group's HQQMatMulNBits node into HQQMatMulNBitsLoRA.

    baked: the parameters of the one adapter of bake mode (constants); None for separate mode (graph inputs with
    rank-0 defaults).
    """

    def __init__(self, groups: Mapping[str, FusedGroup], *, dtype: np.dtype, baked: Mapping[str, np.ndarray] | None) -> None:
        super().__init__()
        self.groups, self.dtype, self.baked = groups, np.dtype(dtype), baked

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        nodes = {node.name: node for node in graph}
        taken = set(graph.initializers) | {value.name for value in graph.inputs}
        for group in self.groups.values():
            node = nodes.get(group.node)
            if node is None or node.domain != DOMAIN or node.op_type != NBITS_OP_TYPE:
                raise HQExportError(f"{', '.join(group.modules)}: LoRA fuses into an HQQMatMulNBits node, not {group.node}")
            for name in (lora_a_name(group.path), lora_b_name(group.path)):
                if name in taken:
                    raise HQExportError(f"the exported graph already has a tensor named {name}")
            self._fuse(graph, node, group)
        return ir.passes.PassResult(model, modified=bool(self.groups))

    def _fuse(self, graph: ir.Graph, node: ir.Node, group: FusedGroup) -> None:
        a_name, b_name = lora_a_name(group.path), lora_b_name(group.path)
        if self.baked is None:
            defaults = rank0_parameters(group, self.dtype)
            rows, rank = f"lora_rows_{group.path}", f"lora_r_{group.path}"
            lora_a = add_parameter(graph, a_name, defaults[a_name], [rows, group.in_features])
            lora_b = add_parameter(graph, b_name, defaults[b_name], [group.widths, rank])
        else:
            lora_a = add_parameter(graph, a_name, self.baked[a_name], None)
            lora_b = add_parameter(graph, b_name, self.baked[b_name], None)
        attributes = {**{key: attr.as_int() for key, attr in node.attributes.items()}, LORA_COLUMNS: [c for pair in group.columns for c in pair]}
        fused = ir.node(LORA_OP_TYPE, [*node.inputs, lora_a, lora_b], attributes, domain=DOMAIN, name=node.name)
        ir.convenience.replace_nodes_and_values(graph, node, [node], [fused], [node.outputs[0]], [fused.outputs[0]])


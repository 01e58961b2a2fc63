"""ONNX pass: a LoRA branch beside each target HQQ node.

For a target layer whose node computes Y = A @ W^T (+ bias) (its output; for a layer packed with others, its
part of the packed node's output: the layer entry's "output", with "rows"), that value is renamed Y_base and
    Y = Y_base + (A @ lora_A^T) @ (scaling * lora_B)^T
is added right after it (so topological order holds and consumers of Y are untouched). With DoRA (PEFT's
forward in eval mode, with f = m / ||W + scaling * B A||_row, a constant per output row once weights are frozen):
    Y = Y_base + (f - 1) * (Y_base - bias) + f * (A @ lora_A^T) @ (scaling * lora_B)^T

Names follow onnxruntime's LoRA conventions: `<module>.lora_A.weight` [in, r] and `<module>.lora_B.weight`
[r, out] (transposed for MatMul, scaling folded into B), DoRA's factor `<module>.dora_scale` [out].
- separate: each is a graph input with an initializer of the same name (overridable), rank-0 ([in, 0], [0, out])
  and a factor of ones, so the base model runs unless an adapter overrides them;
- bake: plain initializers holding one adapter's values.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from hqexport.errors import HQExportError
from hqexport.export.graph import LayerNode


def lora_a_name(module: str) -> str:
    return f"{module}.lora_A.weight"


def lora_b_name(module: str) -> str:
    return f"{module}.lora_B.weight"


def dora_scale_name(module: str) -> str:
    return f"{module}.dora_scale"


@dataclass(frozen=True)
class Branch:
    """One module's LoRA branch. Values (numpy, the model's activation dtype) only in bake mode."""

    module: str
    in_features: int
    out_features: int
    dora: bool
    lora_a_t: np.ndarray | None = None  # [in, r]
    lora_b_t: np.ndarray | None = None  # [r, out], scaling folded in
    dora_scale: np.ndarray | None = None  # [out]


class InsertLoraBranches(ir.passes.InPlacePass):
    """Add a branch per entry of `branches` (module path -> Branch).

    `layers`: where each layer is in the graph, by module path (for a layer packed with others, its rows and the
    output value holding its part). overridable=True is separate mode (graph inputs with rank-0 defaults), False
    is bake mode (constants).
    """

    def __init__(self, layers: Mapping[str, LayerNode], branches: Mapping[str, Branch], *, dtype: np.dtype, overridable: bool) -> None:
        super().__init__()
        self.layers, self.branches, self.dtype, self.overridable = layers, branches, np.dtype(dtype), overridable

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        nodes = {node.name: node for node in graph}
        taken = set(graph.initializers) | {value.name for value in graph.inputs}
        for module, branch in self.branches.items():
            layer = self.layers.get(module)
            node = nodes.get(layer.node) if layer is not None else None
            if node is None:
                raise HQExportError(f"the exported graph has no node for target module {module}")
            for name in (lora_a_name(module), lora_b_name(module), dora_scale_name(module)):
                if name in taken:
                    raise HQExportError(f"the exported graph already has a tensor named {name}")
            _add_branch(graph, node, layer, branch, self.dtype, self.overridable)
        return ir.passes.PassResult(model, modified=bool(self.branches))


def add_parameter(graph: ir.Graph, name: str, value: np.ndarray, shape: list[int | str] | None) -> ir.Value:
    """An initializer; with `shape` also a graph input of that (symbolic) shape, i.e. overridable."""
    tensor = ir.tensor(value, name=name)
    declared = ir.Shape(shape if shape is not None else list(value.shape))
    param = ir.Value(name=name, shape=declared, type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(param)
    if shape is not None:
        graph.inputs.append(param)
    return param


def _add_branch(
    graph: ir.Graph, node: ir.Node, layer: LayerNode, branch: Branch, dtype: np.dtype, overridable: bool
) -> None:
    module, k, n = branch.module, branch.in_features, branch.out_features
    rank = f"lora_r_{module}"
    if overridable:
        lora_a = add_parameter(graph, lora_a_name(module), np.zeros((k, 0), dtype), [k, rank])
        lora_b = add_parameter(graph, lora_b_name(module), np.zeros((0, n), dtype), [rank, n])
        factor = add_parameter(graph, dora_scale_name(module), np.ones((n,), dtype), [n]) if branch.dora else None
    else:
        if branch.lora_a_t is None or branch.lora_b_t is None or (branch.dora and branch.dora_scale is None):
            raise ValueError(f"bake mode needs the LoRA values of {module}")
        lora_a = add_parameter(graph, lora_a_name(module), branch.lora_a_t.astype(dtype), None)
        lora_b = add_parameter(graph, lora_b_name(module), branch.lora_b_t.astype(dtype), None)
        factor = add_parameter(graph, dora_scale_name(module), branch.dora_scale.astype(dtype), None) if branch.dora else None

    y_base = _layer_output(graph, node, layer)
    uses = list(y_base.uses())
    was_output = y_base.is_graph_output()
    y_name = y_base.name
    y_base.name = f"{y_name}/lora_base"
    prefix = f"/{module}/lora"

    def op(op_type: str, inputs: list[ir.Value], label: str) -> ir.Node:
        return ir.node(op_type, inputs, name=f"{prefix}/{label}")

    new = [op("MatMul", [node.inputs[0], lora_a], "MatMul_A")]
    new.append(op("MatMul", [new[-1].outputs[0], lora_b], "MatMul_B"))
    up = new[-1].outputs[0]
    if factor is not None:
        one = add_parameter(graph, f"{prefix}/one", np.ones((), dtype), None)
        no_bias = y_base
        bias = layer.initializers.get("bias")
        if bias:
            if bias not in graph.initializers:
                raise HQExportError(f"the exported graph has no bias initializer {bias} for {module}")
            new.append(op("Sub", [y_base, _layer_bias(graph, graph.initializers[bias], layer, prefix)], "Sub_bias"))
            no_bias = new[-1].outputs[0]
        new.append(op("Sub", [factor, one], "Sub_one"))
        new.append(op("Mul", [new[-1].outputs[0], no_bias], "Mul_base"))
        rescaled = new[-1].outputs[0]
        new.append(op("Mul", [factor, up], "Mul_lora"))
        new.append(op("Add", [rescaled, new[-1].outputs[0]], "Add_dora"))
        up = new[-1].outputs[0]
    new.append(op("Add", [y_base, up], "Add"))
    y = new[-1].outputs[0]
    y.name, y.shape, y.type = y_name, y_base.shape, y_base.type
    for use in uses:
        use.node.replace_input_with(use.idx, y)
    if was_output:
        graph.outputs[graph.outputs.index(y_base)] = y
    graph.insert_after(y_base.producer(), new)


def _layer_output(graph: ir.Graph, node: ir.Node, layer: LayerNode) -> ir.Value:
    """The value holding this layer's output: the node's, or its named part of a packed node's."""
    if layer.output is None:
        return node.outputs[0]
    found = next((value for other in graph for value in other.outputs if value.name == layer.output), None)
    if found is None:
        raise HQExportError(f"the exported graph has no value {layer.output} for {layer.node}")
    return found


def _layer_bias(graph: ir.Graph, bias: ir.Value, layer: LayerNode, prefix: str) -> ir.Value:
    """The layer's bias: the initializer, or its rows of a packed node's bias (a constant of its own)."""
    rows = layer.rows
    if rows is None:
        return bias
    return add_parameter(graph, f"{prefix}/bias", bias.const_value.numpy()[rows[0] : rows[1]], None)

"""Each decoder block's output tensor in the exported graph, exposed as extra graph outputs.

convert names the residual stream after decoder layer i `block_output_name(i)` (export/graph.py): the sum
output of the Skip norm that follows the block. A block whose value is missing (a graph edited by hand, a
folder from another tool) is reported as not located.
"""

from __future__ import annotations

import onnx
from onnx import helper

from hqexport.export.graph import block_output_name


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    infos = list(model.graph.value_info) + list(model.graph.output) + list(model.graph.input)
    return {info.name: info.type.tensor_type.elem_type for info in infos if info.type.HasField("tensor_type")}


def find_block_outputs(model: onnx.ModelProto, count: int) -> list[str | None]:
    """The output value name of each of `count` blocks (None where the graph has no such value)."""
    produced = {name for node in model.graph.node for name in node.output}
    return [name if (name := block_output_name(index)) in produced else None for index in range(count)]


def with_extra_outputs(model: onnx.ModelProto, names: list[str], fallback_type: int) -> onnx.ModelProto:
    """A copy of `model` (external data references kept) that also outputs `names`."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    types = _elem_types(model)
    existing = {output.name for output in copy.graph.output}
    for name in names:
        if name not in existing:
            copy.graph.output.append(helper.make_tensor_value_info(name, types.get(name, fallback_type), None))
    return copy

"""Find each decoder block's output tensor in the exported graph, and expose them as extra graph outputs.

torch.onnx's dynamo exporter records, on every node, the module scopes it came from in the metadata entry
`pkg.torch.onnx.name_scopes` (a Python list literal such as ['', 'model', 'model.model', 'model.model.layers.3',
'model.model.layers.3.mlp', ...]; the wrapper's own prefixes vary). A node belongs to block i when one of its
scopes ends with `<blocks_path>.<i>` (blocks_path from the reference model, e.g. "model.layers").

A block's output is the value that block's nodes produce and nodes of *another* scope consume (the next block or
the final norm); the present key/value tensors are consumed only by graph outputs, so they do not qualify.
When several values qualify (e.g. a shape also crosses the boundary), the last float one produced wins: the
residual Add that ends a decoder layer comes after everything else in it.

hqexport's own export strips that metadata (it is mostly stack traces). Then the residual stream is followed
instead: it starts at the embedding Gather that reads `input_ids` (through single elementwise consumers such as
Gemma's scaling Mul) and each step is the Add that consumes the current stream value together with another
computed (non-constant) value. A pre-norm decoder block has two such residual Adds (after attention, after
the MLP), so block i ends at the stream's Add number 2i+1; the walk must find exactly 2 x blocks Adds or it
locates nothing (LoRA branch Adds and zero-point-correction Adds never consume the stream itself).
"""

from __future__ import annotations

import ast
import re

import onnx
from onnx import helper

SCOPES_KEY = "pkg.torch.onnx.name_scopes"
_FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}


def _scopes(node: onnx.NodeProto) -> list[str]:
    for prop in node.metadata_props:
        if prop.key == SCOPES_KEY:
            try:
                value = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return []
            return [str(s) for s in value] if isinstance(value, (list, tuple)) else []
    return []


def _block_index(scopes: list[str], pattern: re.Pattern) -> int | None:
    for scope in scopes:
        if match := pattern.search(scope):
            return int(match.group(1))
    return None


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    infos = list(model.graph.value_info) + list(model.graph.output) + list(model.graph.input)
    return {info.name: info.type.tensor_type.elem_type for info in infos if info.type.HasField("tensor_type")}


def find_block_outputs(model: onnx.ModelProto, blocks_path: str, count: int) -> list[str | None]:
    """The output value name of each of `count` blocks (None where it cannot be found)."""
    pattern = re.compile(rf"(?:^|\.){re.escape(blocks_path)}\.(\d+)$")
    block_of: dict[str, int | None] = {}  # value name -> block of its producer
    order: dict[str, int] = {}
    consumers: dict[str, set[int | None]] = {}
    for position, node in enumerate(model.graph.node):
        block = _block_index(_scopes(node), pattern)
        for name in node.input:
            consumers.setdefault(name, set()).add(block)
        for name in node.output:
            block_of[name] = block
            order[name] = position
    types = _elem_types(model)
    found: list[str | None] = []
    for index in range(count):
        crossing = [
            name
            for name, block in block_of.items()
            if block == index and any(other != index for other in consumers.get(name, ()))
            and types.get(name, onnx.TensorProto.FLOAT) in _FLOATS
        ]
        found.append(max(crossing, key=order.__getitem__) if crossing else None)
    return found


def find_residual_stream(model: onnx.ModelProto, count: int) -> list[str | None]:
    """Block outputs from the residual stream walk (see the module docstring); all None when it does not fit."""
    graph = model.graph
    constants = {t.name for t in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    starts = [n for n in graph.node if n.op_type == "Gather" and len(n.input) > 1 and n.input[1] == "input_ids"]
    if len(starts) != 1:
        return [None] * count
    value = starts[0].output[0]
    adds: list[str] = []
    while len(adds) <= 2 * count:
        users = consumers.get(value, [])
        residual = [
            n for n in users
            if n.op_type == "Add" and n.domain in ("", "ai.onnx") and list(n.input).count(value) == 1
            and all(other not in constants and other != "" for other in n.input if other != value)
        ]
        if len(residual) == 1:
            value = residual[0].output[0]
            adds.append(value)
        elif not adds and len(users) == 1 and users[0].op_type in ("Mul", "Cast"):
            value = users[0].output[0]  # e.g. Gemma's embedding scale before the stream starts
        else:
            break
    if len(adds) != 2 * count:
        return [None] * count
    return [adds[2 * index + 1] for index in range(count)]


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

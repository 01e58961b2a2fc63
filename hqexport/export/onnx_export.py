"""torch.onnx (dynamo) export of the decoder wrapper, with stable initializer and node names.

The exporter traces DecoderWithCache with dynamic batch / sequence / past length; each HQQMatMulLinear's op
call becomes one hqexport::HQQMatMul node through the ops package's translation table. Initializers are then
renamed to the transformers state-dict names ("model.layers.0.self_attn.q_proj.weight_packed") and each op
node is named after its layer ("model.layers.0.self_attn.q_proj/HQQMatMul").
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import onnx_ir as ir
import torch

from hqexport.errors import HQExportError
from hqexport.export.decoder import DecoderWithCache
from hqexport.export.quant_linear import BUFFER_NAMES, HQQMatMulLinear
from hqexport.ops.function import MAX_OPSET, MIN_OPSET
from hqexport.ops.schema import DOMAIN, OP_TYPE
from hqexport.ops.torch_op import translation_table

DEFAULT_OPSET = 20
_PREFIX = "causal_lm."


def check_opset(opset: int) -> None:
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise HQExportError(f"--opset {opset} is not supported; choose {MIN_OPSET}..{MAX_OPSET}")


def node_name(layer_path: str) -> str:
    return f"{layer_path}/{OP_TYPE}"


@dataclass(frozen=True)
class LayerNode:
    """Where one quantized layer ended up in the graph."""

    node: str
    initializers: dict[str, str | None]  # op input ("weight", "scale", "zero", "bias") -> initializer name


@dataclass
class ExportedGraph:
    model: ir.Model  # initializer data still backed by the torch tensors
    layers: dict[str, LayerNode]  # by module path


def export_decoder(wrapper: DecoderWithCache, opset: int = DEFAULT_OPSET) -> ExportedGraph:
    """The in-memory ONNX model (onnx_ir) of the wrapper and the op node of every quantized layer."""
    check_opset(opset)
    io = wrapper.io
    with _quiet(), torch.no_grad():
        program = torch.onnx.export(
            wrapper,
            io.example_inputs(),
            input_names=io.input_names,
            output_names=io.output_names,
            dynamic_shapes=io.dynamic_shapes(),
            opset_version=opset,
            custom_translation_table=translation_table(),
            dynamo=True,
            optimize=True,
            verbose=False,
        )
    model = program.model
    _strip_metadata(model)
    _rename_initializers(model)
    return ExportedGraph(model, _name_op_nodes(model, wrapper.causal_lm))


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporter's warnings and log lines (e.g. "torchvision is not installed")."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _strip_metadata(model: ir.Model) -> None:
    """Drop the exporter's per-node debug metadata (stack traces with local paths: most of the graph's bytes)."""
    for node in model.graph.all_nodes():
        node.metadata_props.clear()
        for value in node.outputs:
            value.metadata_props.clear()


def _rename_initializers(model: ir.Model) -> None:
    for value in list(model.graph.initializers.values()):
        if value.name.startswith(_PREFIX):
            model.graph.initializers.pop(value.name)
            value.name = value.name[len(_PREFIX) :]
            model.graph.initializers.add(value)


def _name_op_nodes(model: ir.Model, causal_lm: torch.nn.Module) -> dict[str, LayerNode]:
    """Name each HQQMatMul node after the layer whose packed weight it reads; every layer must have one.

    Initializer names are read from the node, not assumed: the exporter's optimizer merges identical
    initializers, so two layers may share e.g. one scale tensor.
    """
    by_weight = {
        f"{path}.{BUFFER_NAMES['weight']}": path
        for path, module in causal_lm.named_modules()
        if isinstance(module, HQQMatMulLinear)
    }
    found: dict[str, LayerNode] = {}
    for node in model.graph.all_nodes():
        if node.domain == DOMAIN and node.op_type == OP_TYPE:
            path = by_weight.get(node.inputs[1].name if node.inputs[1] is not None else "")
            if path is None or path in found:
                raise RuntimeError(f"HQQMatMul node {node.name} does not read one layer's packed weight")
            node.name = node_name(path)
            names = [value.name if value is not None else None for value in node.inputs[1:]]
            names += [None] * (4 - len(names))
            found[path] = LayerNode(node.name, dict(zip(("weight", "scale", "zero", "bias"), names)))
    missing = set(by_weight.values()) - set(found)
    if missing:
        raise RuntimeError(f"layers without an HQQMatMul node: {sorted(missing)[:5]}")
    return found

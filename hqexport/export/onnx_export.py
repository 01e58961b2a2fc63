"""torch.onnx (dynamo) export of the decoder wrapper, with stable initializer and node names.

The exporter traces DecoderWithCache with dynamic batch / sequence / past length; each HQQMatMulLinear's op
call becomes one hqexport::HQQMatMul node through the ops package's translation table. Initializers are then
renamed to the transformers state-dict names ("model.layers.0.self_attn.q_proj.weight_packed") and each op
node is named after its layer ("model.layers.0.self_attn.q_proj/HQQMatMul").

Weights traced without data (meta tensors and placeholders from export/rebuild.py `rebuild_deferred`) become
`ir.LazyTensor` initializers whose data their loader produces when it is needed — normally only when the file
is written, one at a time.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
import torch
from onnxscript.optimizer import fold_constants_ir

from hqexport.errors import HQExportError
from hqexport.export.decoder import DecoderWithCache
from hqexport.export.lazy import lazy_tensor
from hqexport.export.quant_linear import BUFFER_NAMES, HQQMatMulLinear
from hqexport.export.rebuild import is_placeholder
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


def export_decoder(
    wrapper: DecoderWithCache, opset: int = DEFAULT_OPSET, loaders: Mapping[str, Callable[[], np.ndarray]] | None = None
) -> ExportedGraph:
    """The in-memory ONNX model (onnx_ir) of the wrapper and the op node of every quantized layer.

    loaders: for each weight the wrapper holds without data (a meta tensor or a placeholder), by state-dict name,
    what produces its data.
    """
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
            optimize=False,  # below, once no initializer is a meta tensor
            verbose=False,
        )
        _rename_initializers(program.model)
        _defer_initializers(program.model, loaders or {})
        _fold_deferred_transposes(program.model)
        _optimize(program.model)
    model = program.model
    _strip_metadata(model)
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


def _optimize(model: ir.Model) -> None:
    """torch.onnx's default graph optimization (onnxscript's `optimize_ir`) without its pattern rewriter.

    The rewriter's rules (no-op removal, slice collapsing, ...) took half of a SmolLM2 export (~200 s with them,
    105 s without) for a graph that decoded no faster in onnxruntime (46.3 ms per step with them, 45.1 without;
    3,085 nodes with, 3,220 without): onnxruntime's own graph optimizer does such clean-ups at session creation.
    """
    common_passes.InlinePass()(model)
    for _ in range(2):  # as optimize_ir: fold, then remove what folding left unused, twice
        fold_constants_ir(model, onnx_shape_inference=True)
        common_passes.RemoveUnusedNodesPass()(model)
        common_passes.RemoveUnusedFunctionsPass()(model)
        common_passes.RemoveUnusedOpsetsPass()(model)
    ir.passes.Sequential(
        common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common_passes.LiftSubgraphInitializersToMainGraphPass(),
        common_passes.DeduplicateInitializersPass(),
        common_passes.CommonSubexpressionEliminationPass(),
        common_passes.OutputFixPass(),
        common_passes.NameFixPass(),
    )(model)


def _defer_initializers(model: ir.Model, loaders: Mapping[str, Callable[[], np.ndarray]]) -> None:
    """Replace each initializer that has a loader by a LazyTensor calling it (checked against its shape and dtype)."""
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is None:
            continue
        if value.name not in loaders:
            if isinstance(tensor.raw, torch.Tensor) and is_placeholder(tensor.raw):
                raise RuntimeError(f"initializer {value.name} has no data and no loader")  # never write zeros
            continue
        value.const_value = lazy_tensor(value.name, tensor.dtype, tuple(tensor.shape), loaders[value.name])


def _fold_deferred_transposes(model: ir.Model) -> None:
    """Fold Transpose(deferred weight), e.g. an untied lm_head's, into a deferred initializer of its own.

    The optimizer always folds a Transpose of an initializer; doing it here keeps the result deferred (the
    optimizer would hold the transposed copy in memory until the end, and write it from a strided view).
    """
    graph = model.graph
    for node in list(graph):
        if node.domain or node.op_type != "Transpose" or len(node.inputs) != 1:
            continue
        source = node.inputs[0]
        if source is None or not source.is_initializer() or len(source.uses()) != 1:
            continue
        lazy = source.const_value
        if not isinstance(lazy, ir.LazyTensor):
            continue
        perm = node.attributes.get_ints("perm", list(reversed(range(len(lazy.shape)))))
        name = f"{source.name}.transposed"
        shape = ir.Shape([lazy.shape[axis] for axis in perm])
        tensor = lazy_tensor(
            name, lazy.dtype, shape, lambda lazy=lazy, perm=perm: np.ascontiguousarray(lazy.numpy().transpose(perm))
        )
        folded = ir.Value(name=name, shape=shape, type=ir.TensorType(lazy.dtype), const_value=tensor)
        graph.register_initializer(folded)
        ir.convenience.replace_all_uses_with(node.outputs[0], folded)
        graph.remove(node, safe=True)
        graph.initializers.pop(source.name)


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

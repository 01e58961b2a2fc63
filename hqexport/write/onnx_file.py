"""model.onnx + model.onnx.data: save, attach the op's function body, cap the IR version, check."""

from __future__ import annotations

from pathlib import Path

import onnx
import onnx_ir as ir
from onnx_ir.passes.common import NameFixPass

from hqexport.files import DATA_FILE, MODEL_FILE
from hqexport.ops.function import attach_function
from hqexport.ops.schema import MS_DOMAIN, register_schema

#: optional outputs of the ops the graph builder writes, by position: left out of the file where nothing reads them,
#: so that onnxruntime neither allocates nor computes them (the norm's statistics: 0.6 us per node)
OPTIONAL_OUTPUTS = {(MS_DOMAIN, "SkipSimplifiedLayerNormalization"): (1, 2)}

#: onnx 1.23 writes IR 11+; onnxruntime 1.31 and onnxruntime-genai load IR <= 10 for the opsets we emit
MAX_IR_VERSION = 10


def write_onnx(model: ir.Model, folder: Path) -> Path:
    """Write `model` into `folder` with all large initializers in one external data file; return model.onnx.

    The function body is attached to the saved graph proto (loaded without its data), so the weights are
    written once and never copied into a protobuf in memory.
    """
    path = folder / MODEL_FILE
    NameFixPass()(model)  # names the values the passes left unnamed, from the graph alone (byte-identical outputs)
    _leave_out_unused_outputs(model.graph)
    ir.save(model, path, external_data=DATA_FILE)
    proto = onnx.load(str(path), load_external_data=False)
    attach_function(proto)
    proto.ir_version = min(proto.ir_version, MAX_IR_VERSION)
    onnx.save(proto, str(path))
    register_schema()
    onnx.checker.check_model(str(path), full_check=True)
    return path


def _leave_out_unused_outputs(graph: ir.Graph) -> None:
    """Unname the OPTIONAL_OUTPUTS no node and no graph output reads: an unnamed output is written as left out."""
    graph_outputs = set(graph.outputs)
    for node in graph:
        for index in OPTIONAL_OUTPUTS.get((node.domain, node.op_type), ()):
            value = node.outputs[index]
            if not value.uses() and value not in graph_outputs:
                value.name = ""

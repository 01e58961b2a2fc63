"""Which lowering pass each `--ops` choice runs, and what it makes of each layer's LayerNode.

convert asks `lower_layers` and never names a pass: a new lowering is one entry in LOWERINGS.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Mapping
from functools import partial

import onnx_ir as ir

from hqexport.export.graph import LayerNode
from hqexport.lower.matmulnbits import LayerDecision, LowerToMatMulNBits
from hqexport.ops.schema import HQQ_OP

#: makes a pass over the graph's hqexport.HQQMatMul nodes from (accuracy_level, nodes to fuse); the pass records a
#: LayerDecision per node name in `decisions`
MakePass = Callable[[int, Collection[str]], ir.passes.InPlacePass]

#: --ops (options.OPS) -> its lowering pass; None keeps every layer an hqexport.HQQMatMul node
LOWERINGS: dict[str, MakePass | None] = {
    "auto": partial(LowerToMatMulNBits, "auto"),
    "hqq": None,
    "ort": partial(LowerToMatMulNBits, "ort"),
}


def lower_layers(
    model: ir.Model, layers: Mapping[str, LayerNode], *, ops: str, accuracy_level: int = 0, fuse: Collection[str] = ()
) -> dict[str, LayerNode]:
    """Run `--ops`'s lowering on `model` in place; the layers, each with the node and op now computing it.

    fuse: nodes the pass turns into hqexport.HQQMatMulNBits even where no zero point needs correcting (the layers
    that the compiled kernel must run: the exact int8 head, LoRA targets).
    """
    make = LOWERINGS[ops]
    if make is None:
        return dict(layers)
    lowering = make(accuracy_level, fuse)
    lowering(model)
    decisions: dict[str, LayerDecision] = lowering.decisions
    return {path: _lowered(layer, decisions[layer.node]) for path, layer in layers.items()}


def _lowered(layer: LayerNode, decision: LayerDecision) -> LayerNode:
    if decision.op == HQQ_OP:  # kept
        return dataclasses.replace(layer, lowering=decision.record())
    return dataclasses.replace(
        layer, op=decision.op, node=decision.node, initializers=dict(decision.initializers or {}), lowering=decision.record()
    )

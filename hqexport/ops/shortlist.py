"""hqexport::GridShortlist: a lossy head's logits with their shortlist recomputed from the fp head's exact int8 grid.

A quantized head (`--lm-head int8 / int4`, lower/lm_head.py) draws a shortlist: per position, its k largest
logits are recomputed as x . row from the fp head's rows, so greedy decoding and top-k sampling see the fp head's
logits. Where those rows are an exact int8 grid (GatherBlockQuantized's layout), this op is that whole step in one
node: its ONNX function body is the stock form (TopK, GatherBlockQuantized, MatMul, ScatterElements), what a
session without the library runs; the library's kernel (kernels/src/shortlist.cpp) selects and rescores in one
pass, without the five nodes' dispatch and copies (about 4% of a SmolLM2 int4 decode step).

    logits       [..., V]          float   the quantized head's
    X            [..., H]          float   the head's input
    codes        [V, H]            uint8   the grid's codes
    scales       [V, H / block]    float   one per block of `block_size` inputs
    zero_points  [V, H / block]    uint8   row v = (codes[v] - zero_points[v]) * scales[v], blockwise
    Y            [..., V]          float   logits, its k largest per position replaced by X . row

Attributes k (at most V) and block_size. Which entries are the k largest follows TopK (ties to the lower index).
The rescored values are fp32 dot products; kernel and body sum them in different orders.
"""

from __future__ import annotations

from onnx import FunctionProto, helper
from onnx.defs import OpSchema

from hqexport.ops.body import attribute_reference, function
from hqexport.ops.schema import DOMAIN, MS_DOMAIN, SINCE_VERSION

OP_TYPE = "GridShortlist"
INPUTS = ("logits", "X", "codes", "scales", "zero_points")
ATTRIBUTES = ("k", "block_size")


def build_schema() -> OpSchema:
    parameter = OpSchema.FormalParameter
    return OpSchema(
        OP_TYPE,
        DOMAIN,
        SINCE_VERSION,
        doc="logits with each position's k largest entries recomputed as X . row of an int8 grid [V, H].",
        inputs=[
            parameter("logits", "T", "the quantized head's logits [..., V]"),
            parameter("X", "T", "the head's input [..., H]"),
            parameter("codes", "Q", "the grid's codes [V, H]"),
            parameter("scales", "T", "[V, H / block_size]"),
            parameter("zero_points", "Q", "[V, H / block_size]"),
        ],
        outputs=[parameter("Y", "T", "[..., V]")],
        type_constraints=[("T", ["tensor(float)"], "logits and activations"), ("Q", ["tensor(uint8)"], "codes")],
        attributes=[
            OpSchema.Attribute("k", OpSchema.AttrType.INT, "entries recomputed per position", required=True),
            OpSchema.Attribute("block_size", OpSchema.AttrType.INT, "inputs per scale", required=True),
        ],
    )


def grid_shortlist_function(opset: int) -> FunctionProto:
    """The body: TopK's tokens, their rows by GatherBlockQuantized, their dot products with X, scattered back."""
    count = helper.make_node("Constant", [], ["k_scalar"])
    count.attribute.append(attribute_reference("value_int", "k"))
    rows = helper.make_node("GatherBlockQuantized", ["codes", "tokens", "scales", "zero_points"], ["rows"], domain=MS_DOMAIN,
                            bits=8, quantize_axis=1, gather_axis=0)
    rows.attribute.append(attribute_reference("block_size", "block_size"))
    nodes = [
        count,
        helper.make_node("Constant", [], ["last_axis"], value_ints=[-1]),
        helper.make_node("Unsqueeze", ["k_scalar", "last_axis"], ["k_count"]),
        helper.make_node("TopK", ["logits", "k_count"], ["top_values", "tokens"], axis=-1),
        rows,  # [..., k, H]
        helper.make_node("Unsqueeze", ["X", "last_axis"], ["column"]),  # [..., H, 1]
        helper.make_node("MatMul", ["rows", "column"], ["products"]),
        helper.make_node("Squeeze", ["products", "last_axis"], ["rescored"]),
        helper.make_node("ScatterElements", ["logits", "tokens", "rescored"], ["Y"], axis=-1),
    ]
    doc = "hqexport::GridShortlist body: TopK, GatherBlockQuantized, MatMul, ScatterElements"
    return function(OP_TYPE, INPUTS, nodes, list(ATTRIBUTES), opset, doc)


SCHEMAS = {OP_TYPE: build_schema}
FUNCTIONS = {OP_TYPE: grid_shortlist_function}

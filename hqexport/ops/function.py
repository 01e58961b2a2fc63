"""The ONNX function body of hqexport::HQQMatMul: the CPU reference any onnxruntime inlines and runs.

Body, for inputs (A, W, scale, zero [, bias]) and int attributes N, K, bits, group_size, axis:
  codes   = (W[:, :, None] >> [0, bits, 2*bits, ...]) & (2**bits - 1), flattened per row, cut to K columns
  grouped = codes reshaped to [G, -1] (axis 1) or [-1, G] (axis 0), G = N * K / group_size
  w       = rnd(rnd(float(grouped) - zero) * scale)      rnd: Cast to scale's dtype and back
  Y       = A @ cast(w.reshape(N, K), A)^T (+ bias)
The arithmetic runs in float32 and each result is rounded to the compute dtype: float32 has more than
2p+2 significand bits for float16 (p=11) and bfloat16 (p=8), so rounding twice equals rounding once and the
result is the compute dtype's own correctly rounded Sub / Mul, which is what hqq computes in torch.
"""

from __future__ import annotations

import onnx
from onnx import AttributeProto, FunctionProto, ModelProto, TensorProto, helper

from hqexport.formats.canonical import LAYOUTS
from hqexport.ops import half, nbits, shortlist
from hqexport.ops.schema import DOMAIN, OP_TYPE, SINCE_VERSION

#: opsets the body is valid for (BitwiseAnd needs 18)
MIN_OPSET = 18
MAX_OPSET = 25

_ATTRIBUTES = ("N", "K", "bits", "group_size", "axis")

#: the layout whose words are wider than a byte (formats/canonical.py's LAYOUTS: bits 3, 10 codes per uint32). The
#: body takes its codes per word from it and 8 // bits for the others, all uint8 (tests/test_layout_record.py)
_WIDE = next(layout for layout in LAYOUTS.values() if layout.word_dtype.itemsize > 1)


def _ints(name: str, values: list[int]) -> onnx.NodeProto:
    tensor = helper.make_tensor(name, TensorProto.INT64, [len(values)], values)
    return helper.make_node("Constant", [], [name], value=tensor)


def _attr_scalar(name: str, attribute: str) -> onnx.NodeProto:
    """Constant holding an int attribute of the function call as an int64 scalar."""
    value = helper.make_attribute_ref("value_int", AttributeProto.INT)
    value.ref_attr_name = attribute
    node = helper.make_node("Constant", [], [name])
    node.attribute.append(value)
    return node


def _body() -> list[onnx.NodeProto]:
    n = helper.make_node
    return [
        # attributes as int64 values
        _attr_scalar("bits", "bits"),
        _attr_scalar("k", "K"),
        _attr_scalar("n", "N"),
        _attr_scalar("axis", "axis"),
        _attr_scalar("group_size", "group_size"),
        _ints("zero_i", [0]),
        _ints("one_i", [1]),
        _ints("minus1", [-1]),
        _ints("three", [_WIDE.bits]),
        _ints("eight", [8]),
        _ints("ten", [_WIDE.codes_per_word]),
        _ints("two", [2]),
        _ints("pair_index", [0, 1]),
        n("Unsqueeze", ["k", "zero_i"], ["k_1d"]),
        n("Unsqueeze", ["n", "zero_i"], ["n_1d"]),
        # codes per word (_WIDE): 10 in a uint32 word for bits 3, else 8 // bits in a uint8 word
        n("Div", ["eight", "bits"], ["per_byte"]),
        n("Equal", ["bits", "three"], ["is3"]),
        n("Where", ["is3", "ten", "per_byte"], ["per_word_1d"]),
        n("Squeeze", ["per_word_1d"], ["per_word"]),
        n("Squeeze", ["zero_i"], ["zero_s"]),
        n("Squeeze", ["one_i"], ["one_s"]),
        n("Range", ["zero_s", "per_word", "one_s"], ["lanes"]),
        n("Mul", ["lanes", "bits"], ["shifts_i"]),
        n("CastLike", ["shifts_i", "W"], ["shifts"]),
        n("Pow", ["two", "bits"], ["levels"]),
        n("Sub", ["levels", "one_i"], ["mask_i"]),
        n("CastLike", ["mask_i", "W"], ["mask"]),
        # unpack: [N, words, 1] >> [per_word] -> [N, words, per_word] -> [N, words * per_word] -> [:, :K]
        n("Unsqueeze", ["W", "minus1"], ["W3"]),
        n("BitShift", ["W3", "shifts"], ["shifted"], direction="RIGHT"),
        n("BitwiseAnd", ["shifted", "mask"], ["lanes_codes"]),
        n("Concat", ["n_1d", "minus1"], ["rows_shape"], axis=0),
        n("Reshape", ["lanes_codes", "rows_shape"], ["padded_codes"]),
        n("Slice", ["padded_codes", "zero_i", "k_1d", "one_i"], ["codes"]),
        # HQQ grouping: G = N * K / group_size at position 0 for axis 1, at 1 for axis 0; -1 at the other
        # (G == 1 safe). From the attributes: onnxruntime has no bfloat16 Size kernel.
        n("Mul", ["n", "k"], ["elements"]),
        n("Div", ["elements", "group_size"], ["groups"]),
        n("Sub", ["one_i", "axis"], ["g_pos"]),
        n("Equal", ["pair_index", "g_pos"], ["g_here"]),
        n("Where", ["g_here", "groups", "minus1"], ["grouped_shape"]),
        n("Reshape", ["codes", "grouped_shape"], ["grouped_codes"]),
        # dequant in float32, rounded to the compute dtype after each op
        n("Cast", ["grouped_codes"], ["grouped"], to=TensorProto.FLOAT),
        n("Cast", ["zero"], ["zero_f"], to=TensorProto.FLOAT),
        n("Cast", ["scale"], ["scale_f"], to=TensorProto.FLOAT),
        n("Sub", ["grouped", "zero_f"], ["centered_f"]),
        n("CastLike", ["centered_f", "scale"], ["centered_c"]),
        n("Cast", ["centered_c"], ["centered"], to=TensorProto.FLOAT),
        n("Mul", ["centered", "scale_f"], ["scaled_f"]),
        n("CastLike", ["scaled_f", "scale"], ["scaled_c"]),
        # cast to A's dtype BEFORE the reshape: for float16 A onnxruntime's CPU runs Gemm in float32 and
        # cancels a Cast(float16) directly followed by its own Cast(float32), which would skip this rounding
        n("CastLike", ["scaled_c", "A"], ["scaled_a"]),
        n("Concat", ["n_1d", "k_1d"], ["weight_shape"], axis=0),
        n("Reshape", ["scaled_a", "weight_shape"], ["weight"]),
        # Y = A @ weight^T (+ bias): Gemm takes the optional bias as its optional C, so a missing bias needs
        # no branch (onnxruntime rejects a missing input even in an If branch that never runs)
        n("Concat", ["minus1", "k_1d"], ["rows_k"], axis=0),
        n("Reshape", ["A", "rows_k"], ["A2"]),
        n("Gemm", ["A2", "weight", "bias"], ["Y2"], transB=1),
        n("Shape", ["A"], ["lead_shape"], end=-1),
        n("Concat", ["lead_shape", "n_1d"], ["out_shape"], axis=0),
        n("Reshape", ["Y2", "out_shape"], ["Y"]),
    ]


def hqq_matmul_function(opset: int) -> FunctionProto:
    """The model-local function for a model importing the default domain at `opset`."""
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(f"the HQQMatMul function body needs opset {MIN_OPSET}..{MAX_OPSET}, got {opset}")
    return helper.make_function(
        DOMAIN,
        OP_TYPE,
        inputs=["A", "W", "scale", "zero", "bias"],
        outputs=["Y"],
        nodes=_body(),
        opset_imports=[helper.make_opsetid("", opset)],
        attributes=list(_ATTRIBUTES),
        doc_string="hqexport::HQQMatMul reference body (docs/ops.md)",
    )


def _used_ops(graph: onnx.GraphProto) -> set[str]:
    """The hqexport op types that nodes of `graph` (and of its subgraphs) use."""
    used = set()
    for node in graph.node:
        if node.domain == DOMAIN:
            used.add(node.op_type)
        for attribute in node.attribute:
            subgraphs = [attribute.g] if attribute.type == AttributeProto.GRAPH else list(attribute.graphs)
            for subgraph in subgraphs:
                used |= _used_ops(subgraph)
    return used


def attach_function(model: ModelProto) -> None:
    """Add the function of each hqexport op that `model` uses, and the hqexport opset import.

    Replaces an existing function of the same op (e.g. a stub an exporter wrote) by hqexport's body.
    """
    bodies = {OP_TYPE: hqq_matmul_function, **nbits.FUNCTIONS, **half.FUNCTIONS, **shortlist.FUNCTIONS}
    used = _used_ops(model.graph)
    for function in model.functions:
        used |= {node.op_type for node in function.node if node.domain == DOMAIN}
    used &= bodies.keys()
    if not used:
        return
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None:
        raise ValueError("the model imports no default-domain opset")
    kept = [f for f in model.functions if not (f.domain == DOMAIN and f.name in used)]
    del model.functions[:]
    model.functions.extend(kept + [bodies[op_type](opset) for op_type in sorted(used)])
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, SINCE_VERSION))

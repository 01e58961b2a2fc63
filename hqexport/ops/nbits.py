"""hqexport::HQQMatMulNBits: an HQQ layer in MatMulNBits' layout, one node that runs fast with or without the library.

HQQ's zero points are fractional, and MatMulNBits is fast only with uint8 ones, so the exact lowering
(lower/matmulnbits.py) splits each zero z into zr = round(z) and a correction (zr - z) * s per group:

    Y = MatMulNBits(A; B, scales, zero_points = zr)  +  (A @ group_sum) @ zero_correction

This op holds that whole computation in one node. Its ONNX function body is exactly the expression above in
onnxruntime's own ops, so a session without hqexport's library inlines it into the stock fast form (nothing to
constant-fold into fp32 weights); a session with the library runs one compiled kernel per layer instead
(kernels/src/cpu_kernel.cpp, which reads the same initializers). Inputs, all but A initializers:

    A                [..., K]                  float
    B                [N, K / block_size, block_size * bits / 8] uint8   MatMulNBits' codes, LSB first along K
    scales           [N * K / block_size]      float
    zero_points      [N * ceil(K / block_size * bits / 8)] uint8        zr, packed like MatMulNBits'
    group_sum        [K, K / block_size]       float   1 where input k is in block j (shared by the layers)
    zero_correction  [K / block_size, N]       float   (zr - z) * s

Attributes K, N, bits (2, 4 or 8: the container), block_size, and the optional accuracy_level, as MatMulNBits':
absent or 0 is HQQ's exact layer; 1 computes the weights in fp32 (below); 4 (`--accuracy-level 4`) lets
MatMulNBits in the body and the library's kernel quantize A to int8 (lossy, docs/kernels.md). The optional
compute_dtype (10 float16, 16 bfloat16; absent: float) is the layer's in hqq: hqq rounds (q - z) and its product
with s to it, and so does the kernel at level 0. The body cannot: MatMulNBits computes each weight in float,
within one such rounding of hqq's.

hqexport::HQQMatMulNBitsLoRA is the same layer with a LoRA branch in the node (adapters/fused.py), so that an
adapter costs no extra nodes and an inactive one (rank 0) no work. Two more inputs, graph inputs an adapter file
overrides, stored [out, in] like B so that the kernel reads contiguous rows:

    lora_A           [S * r, K]                float or float16   the S segments' A factors, stacked
    lora_B           [sum of widths, r]        lora_A's dtype     their B factors (PEFT's scaling folded in), stacked

and attribute lora_columns = [start_0, stop_0, ..., start_S-1, stop_S-1]: segment s adds
(A @ lora_A[s r : (s + 1) r]^T) @ lora_B[its rows]^T to output columns [start_s, stop_s) (one segment per
adapted layer of a packed node).

hqexport::HQQMatMulNBitsSwiGLU and HQQMatMulNBitsLoRASwiGLU are those layers for a packed gate/up projection
(lower/swiglu.py) with the MLP's gating in the node: Y [..., N / 2] = silu(P[..., :N / 2]) * P[..., N / 2:] of
their product P, so that the Split, the activation and the product are no nodes (and no passes over memory) of
their own.
"""

from __future__ import annotations

import onnx
from onnx import FunctionProto, helper
from onnx.defs import OpSchema

from hqexport.ops.body import attribute_reference, function
from hqexport.ops.schema import DOMAIN, MS_DOMAIN, SINCE_VERSION

OP_TYPE = "HQQMatMulNBits"
INPUTS = ("A", "B", "scales", "zero_points", "group_sum", "zero_correction")
ATTRIBUTES = ("K", "N", "bits", "block_size")
#: optional, as MatMulNBits': 0 (absent) computes in fp32; 4 allows int8 activations (lossy)
ACCURACY_LEVEL = "accuracy_level"
#: optional: HQQ's compute dtype as an ONNX element type, 1 (absent: float), 10 (float16) or 16 (bfloat16)
COMPUTE_DTYPE = "compute_dtype"
LORA_OP_TYPE = "HQQMatMulNBitsLoRA"
LORA_INPUTS = (*INPUTS, "lora_A", "lora_B")
LORA_COLUMNS = "lora_columns"
SWIGLU_OP_TYPE = "HQQMatMulNBitsSwiGLU"
LORA_SWIGLU_OP_TYPE = "HQQMatMulNBitsLoRASwiGLU"
#: each op computing a packed gate/up product -> its form with the gating inside
SWIGLU_FORMS = {OP_TYPE: SWIGLU_OP_TYPE, LORA_OP_TYPE: LORA_SWIGLU_OP_TYPE}

_DOC = {
    "A": "activations [..., K]",
    "B": "MatMulNBits codes [N, K / block_size, block_size * bits / 8]",
    "scales": "per block [N * K / block_size]",
    "zero_points": "integer parts of HQQ's zeros, packed like MatMulNBits' uint8 zero points",
    "group_sum": "[K, K / block_size] 0/1: sums A over each block",
    "zero_correction": "[K / block_size, N]: (zero_points - zero) * scales",
    "lora_A": "[segments * rank, K]: the segments' LoRA A factors",
    "lora_B": "[sum of the segments' widths, rank]: their B factors, scaling folded in",
}
_TYPES = {"A": "T1", "B": "T2", "scales": "T1", "zero_points": "T2", "group_sum": "T1", "zero_correction": "T1", "lora_A": "T3", "lora_B": "T3"}


def _schema(op_type: str, inputs: tuple[str, ...], doc: str, lora: bool, swiglu: bool = False) -> OpSchema:
    attributes = [OpSchema.Attribute(name, OpSchema.AttrType.INT, f"MatMulNBits' {name}", required=True) for name in ATTRIBUTES]
    attributes.append(OpSchema.Attribute(ACCURACY_LEVEL, OpSchema.AttrType.INT, "MatMulNBits' accuracy_level (0: exact)", required=False))
    attributes.append(OpSchema.Attribute(COMPUTE_DTYPE, OpSchema.AttrType.INT, "HQQ's compute dtype (1 float, 10 float16, 16 bfloat16): "
                                         "the kernel rounds (q - zero) and its product with the scale to it, as hqq does", required=False))
    if lora:
        attributes.append(OpSchema.Attribute(LORA_COLUMNS, OpSchema.AttrType.INTS, "[start, stop) output columns per segment", required=True))
    return OpSchema(
        op_type,
        DOMAIN,
        SINCE_VERSION,
        doc=doc,
        inputs=[OpSchema.FormalParameter(name, _TYPES[name], _DOC[name]) for name in inputs],
        outputs=[OpSchema.FormalParameter("Y", "T1", "silu(gate) * up [..., N / 2]" if swiglu else "output [..., N]")],
        type_constraints=[("T1", ["tensor(float)"], "activation dtype"), ("T2", ["tensor(uint8)"], "packed codes")]
        + ([("T3", ["tensor(float)", "tensor(float16)"], "LoRA factors (fp16: convert --adapter-dtype fp16)")] if lora else []),
        attributes=attributes,
    )


def build_schema() -> OpSchema:
    return _schema(OP_TYPE, INPUTS, "Y = MatMulNBits(A; B, scales, zero_points) + (A @ group_sum) @ zero_correction: HQQ's exact layer.", lora=False)


def build_lora_schema() -> OpSchema:
    return _schema(LORA_OP_TYPE, LORA_INPUTS, "HQQMatMulNBits plus a LoRA branch per segment of output columns.", lora=True)


def build_swiglu_schema() -> OpSchema:
    return _schema(SWIGLU_OP_TYPE, INPUTS, "HQQMatMulNBits of a packed gate/up projection, gated: silu(gate) * up.", lora=False, swiglu=True)


def build_lora_swiglu_schema() -> OpSchema:
    return _schema(LORA_SWIGLU_OP_TYPE, LORA_INPUTS, "HQQMatMulNBitsLoRA of a packed gate/up projection, gated: silu(gate) * up.",
                   lora=True, swiglu=True)


#: op type -> its schema builder
SCHEMAS = {OP_TYPE: build_schema, LORA_OP_TYPE: build_lora_schema, SWIGLU_OP_TYPE: build_swiglu_schema,
           LORA_SWIGLU_OP_TYPE: build_lora_swiglu_schema}


def _layer_nodes(output: str) -> list[onnx.NodeProto]:
    """HQQMatMulNBits' expression (module docstring) in stock ops, written to `output`."""
    matmul_nbits = helper.make_node("MatMulNBits", ["A", "B", "scales", "zero_points"], ["quantized"], domain=MS_DOMAIN)
    matmul_nbits.attribute.extend(attribute_reference(name, name, helper.AttributeProto.INT) for name in (*ATTRIBUTES, ACCURACY_LEVEL))
    return [
        matmul_nbits,
        helper.make_node("MatMul", ["A", "group_sum"], ["block_sums"]),
        helper.make_node("MatMul", ["block_sums", "zero_correction"], ["correction"]),
        helper.make_node("Add", ["quantized", "correction"], [output]),
    ]


def _lora_nodes(base: str, output: str) -> list[onnx.NodeProto]:
    """`output` = `base` + the LoRA branch of HQQMatMulNBitsLoRA (module docstring) in stock ops.

    Each lora_B row c belongs to a segment seg[c] and lands in output column col[c]; both come from lora_columns
    (constants onnxruntime folds). Per row: v[..., c] = T[..., seg[c], :] . lora_B[c] with T = A @ lora_A^T viewed
    [..., S, r]; then v @ place scatters the rows into their columns (place[c, n] = 1 where n = col[c]).
    """
    def node(op_type: str, inputs: list[str], output: str, **attributes) -> onnx.NodeProto:
        return helper.make_node(op_type, inputs, [output], **attributes)

    columns = helper.make_node("Constant", [], ["lora.columns"])
    columns.attribute.append(attribute_reference("value_ints", LORA_COLUMNS, helper.AttributeProto.INTS))
    n_columns = helper.make_node("Constant", [], ["lora.n"])
    n_columns.attribute.append(attribute_reference("value_int", "N", helper.AttributeProto.INT))
    int64 = onnx.TensorProto.INT64
    return [
        node("Constant", [], "lora.0", value_int=0),
        node("Constant", [], "lora.1", value_int=1),
        node("Constant", [], "lora.axis0", value_ints=[0]),
        node("Constant", [], "lora.axis1", value_ints=[1]),
        node("Constant", [], "lora.last", value_ints=[-1]),
        node("Constant", [], "lora.pair", value_ints=[-1, 2]),
        columns,
        n_columns,
        node("Reshape", ["lora.columns", "lora.pair"], "lora.pairs"),
        node("Gather", ["lora.pairs", "lora.0"], "lora.starts", axis=1),
        node("Gather", ["lora.pairs", "lora.1"], "lora.stops", axis=1),
        node("Sub", ["lora.stops", "lora.starts"], "lora.widths"),
        node("CumSum", ["lora.widths", "lora.0"], "lora.ends"),
        node("Sub", ["lora.ends", "lora.widths"], "lora.firsts"),
        node("ReduceSum", ["lora.widths"], "lora.total", keepdims=0),
        node("Range", ["lora.0", "lora.total", "lora.1"], "lora.rows"),
        node("Unsqueeze", ["lora.rows", "lora.axis1"], "lora.rows_col"),
        node("Unsqueeze", ["lora.ends", "lora.axis0"], "lora.ends_row"),
        node("GreaterOrEqual", ["lora.rows_col", "lora.ends_row"], "lora.past"),
        node("Cast", ["lora.past"], "lora.past_count", to=int64),
        node("ReduceSum", ["lora.past_count", "lora.axis1"], "lora.seg", keepdims=0),
        node("Gather", ["lora.starts", "lora.seg"], "lora.row_start"),
        node("Gather", ["lora.firsts", "lora.seg"], "lora.row_first"),
        node("Sub", ["lora.rows", "lora.row_first"], "lora.row_offset"),
        node("Add", ["lora.row_start", "lora.row_offset"], "lora.col"),
        node("Range", ["lora.0", "lora.n", "lora.1"], "lora.outputs"),
        node("Unsqueeze", ["lora.col", "lora.axis1"], "lora.col_col"),
        node("Unsqueeze", ["lora.outputs", "lora.axis0"], "lora.outputs_row"),
        node("Equal", ["lora.col_col", "lora.outputs_row"], "lora.hit"),
        node("Cast", ["lora.hit"], "lora.place", to=onnx.TensorProto.FLOAT),
        node("Cast", ["lora_A"], "lora.a", to=onnx.TensorProto.FLOAT),
        node("Cast", ["lora_B"], "lora.b", to=onnx.TensorProto.FLOAT),
        node("Transpose", ["lora.a"], "lora.a_t"),
        node("MatMul", ["A", "lora.a_t"], "lora.t"),
        node("Shape", ["lora.t"], "lora.lead", end=-1),
        node("Shape", ["lora.starts"], "lora.segments"),
        node("Shape", ["lora.b"], "lora.rank", start=1),
        node("Concat", ["lora.lead", "lora.segments", "lora.rank"], "lora.t_shape", axis=0),
        node("Reshape", ["lora.t", "lora.t_shape"], "lora.t_segments", allowzero=1),  # rank 0 is a size, not "keep"
        node("Gather", ["lora.t_segments", "lora.seg"], "lora.t_rows", axis=-2),
        node("Mul", ["lora.t_rows", "lora.b"], "lora.products"),
        node("ReduceSum", ["lora.products", "lora.last"], "lora.v", keepdims=0),
        node("MatMul", ["lora.v", "lora.place"], "lora.update"),
        node("Add", [base, "lora.update"], output),
    ]


def _swiglu_nodes(product: str, output: str) -> list[onnx.NodeProto]:
    """`output` = silu(gate) * up of `product`'s two halves, as the decoder graph writes the MLP's gating."""
    return [
        helper.make_node("Split", [product], ["swiglu.gate", "swiglu.up"], axis=-1, num_outputs=2),
        helper.make_node("Sigmoid", ["swiglu.gate"], ["swiglu.sigmoid"]),
        helper.make_node("Mul", ["swiglu.gate", "swiglu.sigmoid"], ["swiglu.silu"]),
        helper.make_node("Mul", ["swiglu.silu", "swiglu.up"], [output]),
    ]


def hqq_matmul_nbits_function(opset: int) -> FunctionProto:
    """The model-local function: the stock-op expression of the module docstring."""
    doc = "hqexport::HQQMatMulNBits body: MatMulNBits with uint8 zero points plus the zero-point correction"
    return function(OP_TYPE, INPUTS, _layer_nodes("Y"), [*ATTRIBUTES, ACCURACY_LEVEL, COMPUTE_DTYPE], opset, doc)


def hqq_matmul_nbits_lora_function(opset: int) -> FunctionProto:
    """HQQMatMulNBitsLoRA's function: HQQMatMulNBits' body plus the LoRA branch (slow, but folds nothing to fp32)."""
    doc = "hqexport::HQQMatMulNBitsLoRA body: HQQMatMulNBits' plus a LoRA branch per segment of output columns"
    return function(LORA_OP_TYPE, LORA_INPUTS, _layer_nodes("base") + _lora_nodes("base", "Y"), [*ATTRIBUTES, ACCURACY_LEVEL, COMPUTE_DTYPE, LORA_COLUMNS], opset, doc)


def hqq_matmul_nbits_swiglu_function(opset: int) -> FunctionProto:
    """HQQMatMulNBitsSwiGLU's function: HQQMatMulNBits' body, then the gating."""
    doc = "hqexport::HQQMatMulNBitsSwiGLU body: HQQMatMulNBits' of a packed gate/up projection, then silu(gate) * up"
    return function(SWIGLU_OP_TYPE, INPUTS, _layer_nodes("product") + _swiglu_nodes("product", "Y"), [*ATTRIBUTES, ACCURACY_LEVEL, COMPUTE_DTYPE], opset, doc)


def hqq_matmul_nbits_lora_swiglu_function(opset: int) -> FunctionProto:
    """HQQMatMulNBitsLoRASwiGLU's function: HQQMatMulNBitsLoRA's body, then the gating."""
    doc = "hqexport::HQQMatMulNBitsLoRASwiGLU body: HQQMatMulNBitsLoRA's of a packed gate/up projection, then silu(gate) * up"
    nodes = _layer_nodes("base") + _lora_nodes("base", "product") + _swiglu_nodes("product", "Y")
    return function(LORA_SWIGLU_OP_TYPE, LORA_INPUTS, nodes, [*ATTRIBUTES, ACCURACY_LEVEL, COMPUTE_DTYPE, LORA_COLUMNS], opset, doc)


#: op type -> its function body builder (by opset)
FUNCTIONS = {
    OP_TYPE: hqq_matmul_nbits_function,
    LORA_OP_TYPE: hqq_matmul_nbits_lora_function,
    SWIGLU_OP_TYPE: hqq_matmul_nbits_swiglu_function,
    LORA_SWIGLU_OP_TYPE: hqq_matmul_nbits_lora_swiglu_function,
}

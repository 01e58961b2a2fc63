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

Attributes K, N, bits (2, 4 or 8: the container), block_size, as MatMulNBits' (accuracy level 0: exact).
"""

from __future__ import annotations

from onnx import FunctionProto, helper
from onnx.defs import OpSchema

from hqexport.ops.schema import DOMAIN, MS_DOMAIN, SINCE_VERSION

OP_TYPE = "HQQMatMulNBits"
INPUTS = ("A", "B", "scales", "zero_points", "group_sum", "zero_correction")
ATTRIBUTES = ("K", "N", "bits", "block_size")


def build_schema() -> OpSchema:
    doc = {
        "A": "activations [..., K]",
        "B": "MatMulNBits codes [N, K / block_size, block_size * bits / 8]",
        "scales": "per block [N * K / block_size]",
        "zero_points": "integer parts of HQQ's zeros, packed like MatMulNBits' uint8 zero points",
        "group_sum": "[K, K / block_size] 0/1: sums A over each block",
        "zero_correction": "[K / block_size, N]: (zero_points - zero) * scales",
    }
    types = {"A": "T1", "B": "T2", "scales": "T1", "zero_points": "T2", "group_sum": "T1", "zero_correction": "T1"}
    return OpSchema(
        OP_TYPE,
        DOMAIN,
        SINCE_VERSION,
        doc="Y = MatMulNBits(A; B, scales, zero_points) + (A @ group_sum) @ zero_correction: HQQ's exact layer.",
        inputs=[OpSchema.FormalParameter(name, types[name], doc[name]) for name in INPUTS],
        outputs=[OpSchema.FormalParameter("Y", "T1", "output [..., N]")],
        type_constraints=[("T1", ["tensor(float)"], "activation dtype"), ("T2", ["tensor(uint8)"], "packed codes")],
        attributes=[OpSchema.Attribute(name, OpSchema.AttrType.INT, f"MatMulNBits' {name}", required=True) for name in ATTRIBUTES],
    )


def hqq_matmul_nbits_function(opset: int) -> FunctionProto:
    """The model-local function: the stock-op expression of the module docstring."""
    matmul_nbits = helper.make_node("MatMulNBits", ["A", "B", "scales", "zero_points"], ["quantized"], domain=MS_DOMAIN)
    for name in ATTRIBUTES:
        reference = helper.make_attribute_ref(name, helper.AttributeProto.INT)
        reference.ref_attr_name = name
        matmul_nbits.attribute.append(reference)
    nodes = [
        matmul_nbits,
        helper.make_node("MatMul", ["A", "group_sum"], ["block_sums"]),
        helper.make_node("MatMul", ["block_sums", "zero_correction"], ["correction"]),
        helper.make_node("Add", ["quantized", "correction"], ["Y"]),
    ]
    return helper.make_function(
        DOMAIN,
        OP_TYPE,
        inputs=list(INPUTS),
        outputs=["Y"],
        nodes=nodes,
        opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS_DOMAIN, 1)],
        attributes=list(ATTRIBUTES),
        doc_string="hqexport::HQQMatMulNBits body: MatMulNBits with uint8 zero points plus the zero-point correction",
    )

"""hqexport::HalfMatMul: Y = A @ float(W)^T for a float16 or bfloat16 matrix W that holds an fp head exactly.

A head whose every value is a float16 (or bfloat16) number, as in a checkpoint trained or stored in that dtype,
loses nothing stored in that dtype, and a decode step then reads half the bytes of the fp32 MatMul (the head is
most of a small model's bytes). onnxruntime's MatMul does not mix dtypes, hence this op. The library's kernel
widens W as it reads it (kernels/src/cpu_kernel.cpp); the ONNX function body, Cast + Transpose + MatMul, is what
a session without the library runs: onnxruntime folds the Cast and the Transpose of the initializer into an fp32
one, so that session runs as fast as an fp32 head, in more memory.

    A  [..., K]  float
    W  [N, K]    float16 or bfloat16
    Y  [..., N]  float

Attributes N and K.
"""

from __future__ import annotations

from onnx import FunctionProto, TensorProto, helper
from onnx.defs import OpSchema

from hqexport.ops.schema import DOMAIN, SINCE_VERSION

OP_TYPE = "HalfMatMul"
INPUTS = ("A", "W")
ATTRIBUTES = ("N", "K")


def build_schema() -> OpSchema:
    return OpSchema(
        OP_TYPE,
        DOMAIN,
        SINCE_VERSION,
        doc="Y = A @ float(W)^T: a float16 or bfloat16 matrix W [N, K], widened exactly.",
        inputs=[OpSchema.FormalParameter("A", "T1", "activations [..., K]"), OpSchema.FormalParameter("W", "T2", "[N, K]")],
        outputs=[OpSchema.FormalParameter("Y", "T1", "output [..., N]")],
        type_constraints=[("T1", ["tensor(float)"], "activation dtype"), ("T2", ["tensor(float16)", "tensor(bfloat16)"], "W's dtype")],
        attributes=[OpSchema.Attribute(name, OpSchema.AttrType.INT, f"{name} of W [N, K]", required=True) for name in ATTRIBUTES],
    )


def half_matmul_function(opset: int) -> FunctionProto:
    """The body: W cast to float, transposed, multiplied."""
    return helper.make_function(
        DOMAIN,
        OP_TYPE,
        inputs=list(INPUTS),
        outputs=["Y"],
        nodes=[
            helper.make_node("Cast", ["W"], ["wide"], to=TensorProto.FLOAT),
            helper.make_node("Transpose", ["wide"], ["wide_t"], perm=[1, 0]),
            helper.make_node("MatMul", ["A", "wide_t"], ["Y"]),
        ],
        opset_imports=[helper.make_opsetid("", opset)],
        attributes=list(ATTRIBUTES),
        doc_string="hqexport::HalfMatMul body: W cast to float, then MatMul",
    )


SCHEMAS = {OP_TYPE: build_schema}
FUNCTIONS = {OP_TYPE: half_matmul_function}

"""hqexport's ops (docs/ops.md): HQQMatMul (schema, ONNX function body, numpy reference, a layer's inputs), HQQMatMulNBits (nbits.py), HalfMatMul (half.py) and GridShortlist (shortlist.py)."""

from hqexport.ops.function import attach_function, hqq_matmul_function
from hqexport.ops.inputs import canonical_weight, op_inputs, packed_inputs
from hqexport.ops.reference import HQQMatMulRun, dequantize_canonical, hqq_matmul_reference
from hqexport.ops.schema import DOMAIN, OP_TYPE, register_schema

__all__ = [
    "DOMAIN",
    "OP_TYPE",
    "HQQMatMulRun",
    "attach_function",
    "canonical_weight",
    "dequantize_canonical",
    "hqq_matmul_function",
    "hqq_matmul_reference",
    "op_inputs",
    "packed_inputs",
    "register_schema",
]

"""The hqexport op hqexport::HQQMatMul (docs/ops.md): schema, ONNX function body, numpy reference, torch op."""

from hqexport.ops.function import attach_function, hqq_matmul_function
from hqexport.ops.reference import HQQMatMulRun, dequantize_canonical, hqq_matmul_reference
from hqexport.ops.schema import DOMAIN, OP_TYPE, register_schema
from hqexport.ops.torch_op import op_inputs, translation_table

__all__ = [
    "DOMAIN",
    "OP_TYPE",
    "HQQMatMulRun",
    "attach_function",
    "dequantize_canonical",
    "hqq_matmul_function",
    "hqq_matmul_reference",
    "op_inputs",
    "register_schema",
    "translation_table",
]

"""Building blocks of the ONNX function bodies of hqexport's ops that run onnxruntime's com.microsoft ops
(the HQQMatMulNBits family, ops/nbits.py; GridShortlist, ops/shortlist.py)."""

from __future__ import annotations

import onnx
from onnx import FunctionProto, helper

from hqexport.ops.schema import DOMAIN, MS_DOMAIN


def attribute_reference(attribute: str, name: str, kind: int = helper.AttributeProto.INT) -> onnx.AttributeProto:
    """`attribute` of a node in a function body, taken from the function's attribute `name`."""
    reference = helper.make_attribute_ref(attribute, kind)
    reference.ref_attr_name = name
    return reference


def function(op_type: str, inputs: tuple[str, ...], nodes: list[onnx.NodeProto], attributes: list[str], opset: int, doc: str) -> FunctionProto:
    """The model-local function of hqexport's `op_type`: output Y, the default opset and com.microsoft imported."""
    return helper.make_function(
        DOMAIN,
        op_type,
        inputs=list(inputs),
        outputs=["Y"],
        nodes=nodes,
        opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS_DOMAIN, 1)],
        attributes=attributes,
        doc_string=doc,
    )

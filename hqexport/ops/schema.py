"""The onnx schema of hqexport::HQQMatMul (docs/ops.md); register_schema also registers the HQQMatMulNBits ops' (ops/nbits.py), HalfMatMul's (ops/half.py) and GridShortlist's (ops/shortlist.py).

onnx refuses to build, check or infer shapes for a node whose op it does not know, and onnxscript (hence
torch.onnx's custom translation) looks ops up by schema; `register_schema()` must run before either.
"""

from __future__ import annotations

import onnx
from onnx.defs import OpSchema

from hqexport.formats.canonical import LAYOUTS

DOMAIN = "hqexport"
OP_TYPE = "HQQMatMul"
SINCE_VERSION = 1
MS_DOMAIN = "com.microsoft"  # onnxruntime's contrib ops (MatMulNBits, GroupQueryAttention, ...)
HQQ_OP = f"{DOMAIN}.{OP_TYPE}"  # the op as the manifest names it

#: activation / output / bias dtypes the op accepts
ACT_TYPES = ("tensor(float)", "tensor(float16)")
#: word dtype of the canonical packed weight -> the storage bits it packs (formats/canonical.py's LAYOUTS)
WORD_BITS: dict[str, tuple[int, ...]] = {
    dtype.name: tuple(bits for bits, layout in LAYOUTS.items() if layout.word_dtype == dtype)
    for dtype in dict.fromkeys(layout.word_dtype for layout in LAYOUTS.values())
}
WORD_TYPES = tuple(f"tensor({name})" for name in WORD_BITS)
_WORD_DOC = "packed word dtype: " + "; ".join(f"{name} for bits {', '.join(map(str, bits))}" for name, bits in WORD_BITS.items())
#: dtypes of scale and zero: the layer's compute dtype
META_TYPES = ("tensor(float)", "tensor(float16)", "tensor(bfloat16)")

_INT = OpSchema.AttrType.INT


def _build_schema() -> OpSchema:
    return OpSchema(
        OP_TYPE,
        DOMAIN,
        SINCE_VERSION,
        doc="Y = A @ dequant(W)^T (+ bias), dequant exactly HQQ's: w = rnd(rnd(codes - zero) * scale) in scale's dtype.",
        inputs=[
            OpSchema.FormalParameter("A", "T1", "activations [..., K]"),
            OpSchema.FormalParameter("W", "T2", "canonical packed codes [N, ceil(K / codes_per_word)]"),
            OpSchema.FormalParameter("scale", "T3", "dequant multipliers, [G, 1] (axis 1) or [1, G] (axis 0)"),
            OpSchema.FormalParameter("zero", "T3", "zero points, same shape as scale (not integer in general)"),
            OpSchema.FormalParameter(
                "bias", "T1", "optional bias [N]", param_option=OpSchema.FormalParameterOption.Optional
            ),
        ],
        outputs=[OpSchema.FormalParameter("Y", "T1", "output [..., N]")],
        type_constraints=[
            ("T1", list(ACT_TYPES), "activation dtype"),
            ("T2", list(WORD_TYPES), _WORD_DOC),
            ("T3", list(META_TYPES), "compute dtype of the quantized layer"),
        ],
        attributes=[
            OpSchema.Attribute("N", _INT, "output features", required=True),
            OpSchema.Attribute("K", _INT, "input features", required=True),
            OpSchema.Attribute("bits", _INT, "storage bits per code: 1, 2, 3, 4 or 8", required=True),
            OpSchema.Attribute("group_size", _INT, "HQQ group size g; G = N * K / g groups", required=True),
            OpSchema.Attribute("axis", _INT, "HQQ grouping axis: 1 (along K) or 0 (see docs/ops.md)", required=True),
        ],
    )


def register_schema() -> None:
    """Register the schemas of hqexport's ops (HQQMatMul, the HQQMatMulNBits ops, HalfMatMul, GridShortlist) with onnx.defs once per process."""
    from hqexport.ops import half, nbits, shortlist  # they build on this module's constants

    for op_type, build in {OP_TYPE: _build_schema, **nbits.SCHEMAS, **half.SCHEMAS, **shortlist.SCHEMAS}.items():
        if not onnx.defs.has(op_type, DOMAIN):
            onnx.defs.register_schema(build())

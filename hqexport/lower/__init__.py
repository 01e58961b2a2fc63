"""Lowering passes: rewrite hqexport ops (and quantize the fp lm_head on request) into ops that stock onnxruntime runs fast."""

from hqexport.lower.lm_head import (
    EXACT_INT8_HEAD,
    HALF_HEAD_FORMATS,
    HEAD_PATH,
    HeadChoice,
    exact_half_head,
    exact_int8_head,
    head_choice,
    quantize_head,
    share_embedding,
)
from hqexport.lower.matmulnbits import LowerToMatMulNBits, matmulnbits_blocker
from hqexport.lower.registry import LOWERINGS, lower_layers
from hqexport.lower.swiglu import FuseSwiGLU, fuse_swiglu

__all__ = [
    "EXACT_INT8_HEAD", "HALF_HEAD_FORMATS", "HEAD_PATH", "LOWERINGS", "FuseSwiGLU", "HeadChoice", "LowerToMatMulNBits",
    "exact_half_head", "exact_int8_head",
    "fuse_swiglu", "head_choice", "lower_layers", "matmulnbits_blocker", "quantize_head", "share_embedding",
]

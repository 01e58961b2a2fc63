"""Lowering passes: rewrite hqexport ops (and quantize the fp lm_head on request) into ops that stock onnxruntime runs fast."""

from hqexport.lower.lm_head import EXACT_INT8_HEAD, HEAD_PATH, LM_HEADS, HeadChoice, exact_int8_head, head_choice, quantize_head, share_embedding
from hqexport.lower.matmulnbits import LowerToMatMulNBits, matmulnbits_blocker

__all__ = [
    "EXACT_INT8_HEAD", "HEAD_PATH", "LM_HEADS", "HeadChoice", "LowerToMatMulNBits", "exact_int8_head", "head_choice",
    "matmulnbits_blocker", "quantize_head", "share_embedding",
]

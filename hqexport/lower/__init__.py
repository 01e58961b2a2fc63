"""Lowering passes: rewrite hqexport ops into ops that stock onnxruntime runs fast."""

from hqexport.lower.matmulnbits import LowerToMatMulNBits, matmulnbits_blocker

__all__ = ["LowerToMatMulNBits", "matmulnbits_blocker"]

"""numpy reference of hqexport::HQQMatMul, and its onnx.reference kernel.

Compute-dtype arithmetic is numpy's own float32 / float16, or ml_dtypes.bfloat16 (each op rounded to bfloat16),
which is how hqq's torch dequantization rounds (hqexport.formats.dequant is checked bit-exact against hqq).
"""

from __future__ import annotations

import numpy as np
from onnx.reference.op_run import OpRun

from hqexport.formats import unpack_canonical
from hqexport.ops.schema import DOMAIN


def dequantize_canonical(
    W: np.ndarray, scale: np.ndarray, zero: np.ndarray, *, N: int, K: int, bits: int, group_size: int, axis: int
) -> np.ndarray:
    """The layer's weight [N, K] in scale's dtype (HQQ's dequant of the canonical codes)."""
    codes = unpack_canonical(np.asarray(W), K, bits)
    groups = N * K // group_size
    grouped = codes.reshape((groups, group_size) if axis == 1 else (group_size, groups)).astype(scale.dtype)
    return ((grouped - zero) * scale).reshape(N, K)


def hqq_matmul_reference(
    A: np.ndarray,
    W: np.ndarray,
    scale: np.ndarray,
    zero: np.ndarray,
    bias: np.ndarray | None = None,
    *,
    N: int,
    K: int,
    bits: int,
    group_size: int,
    axis: int,
) -> np.ndarray:
    """Y = A @ dequant(W)^T (+ bias) in A's dtype; float16 A is multiplied in float32 and rounded once."""
    if scale.dtype != zero.dtype:
        raise ValueError(f"scale ({scale.dtype}) and zero ({zero.dtype}) must share the compute dtype")
    weight = dequantize_canonical(W, scale, zero, N=N, K=K, bits=bits, group_size=group_size, axis=axis)
    weight = weight.astype(A.dtype).astype(np.float32)
    out = np.matmul(A.astype(np.float32), weight.T)
    if bias is not None:
        out = out + bias.astype(A.dtype).astype(np.float32)
    return out.astype(A.dtype)


class HQQMatMul(OpRun):
    """hqexport::HQQMatMul for onnx.reference.ReferenceEvaluator(model, new_ops=[HQQMatMulRun]).

    onnx.reference keys new_ops by (op_domain, class name), hence the class is named after the op. It takes
    precedence over a model-local function of the same name.
    """

    op_domain = DOMAIN

    def _run(self, A, W, scale, zero, bias=None, N=None, K=None, bits=None, group_size=None, axis=None):
        # onnx.reference passes the node's attributes by keyword, matched by these parameter names
        return (hqq_matmul_reference(A, W, scale, zero, bias, N=N, K=K, bits=bits, group_size=group_size, axis=axis),)


HQQMatMulRun = HQQMatMul

"""hqexport::hqq_matmul as a torch custom op, its ONNX translation, and a layer's canonical op inputs.

The exporter replaces each HQQ linear by a module calling `torch.ops.hqexport.hqq_matmul`; torch.onnx (dynamo)
keeps the call opaque thanks to the fake impl and `translation_table()` turns it into one
hqexport::HQQMatMul node whose inputs are the module's buffers (packed weight, scale, zero, bias).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from hqexport.formats import canonical_shape, codes_per_word, pack_canonical, storage_bits, unpack_codes
from hqexport.formats.canonical import word_dtype
from hqexport.formats.codes import grouped_shape, packed_as_numpy
from hqexport.model import QuantizedLinear
from hqexport.ops.schema import DOMAIN, OP_TYPE, SINCE_VERSION, register_schema


def unpack_canonical_torch(weight: torch.Tensor, K: int, bits: int) -> torch.Tensor:
    """Canonical packed [N, words] -> codes [N, K] (uint8), in torch."""
    per_word = codes_per_word(bits)
    # uint32 words (bits 3) use bits 0..29 only: as int32 they are non-negative, so shifts behave the same
    words = weight.view(torch.int32) if weight.dtype == torch.uint32 else weight
    shifts = torch.arange(per_word, dtype=words.dtype, device=words.device) * bits
    codes = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(weight.shape[0], -1)[:, :K].to(torch.uint8)


@torch.library.custom_op(f"{DOMAIN}::hqq_matmul", mutates_args=())
def hqq_matmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bias: torch.Tensor | None,
    N: int,
    K: int,
    bits: int,
    group_size: int,
    axis: int,
) -> torch.Tensor:
    """x @ dequant(weight)^T (+ bias) with HQQ's dequant in scale's dtype, the weight then cast to x's dtype."""
    codes = unpack_canonical_torch(weight, K, bits)
    groups = N * K // group_size
    grouped = codes.reshape((groups, group_size) if axis == 1 else (group_size, groups)).to(scale.dtype)
    dequant = ((grouped - zero) * scale).reshape(N, K).to(x.dtype)
    out = torch.matmul(x, dequant.t())
    if bias is not None:
        out += bias
    return out


@hqq_matmul.register_fake
def _hqq_matmul_fake(x, weight, scale, zero, bias, N, K, bits, group_size, axis):  # noqa: ANN001, ANN202
    return x.new_empty((*x.shape[:-1], N))


def translation_table() -> dict[Any, Any]:
    """custom_translation_table for torch.onnx.export(dynamo=True): one hqexport::HQQMatMul node per call."""
    register_schema()
    from onnxscript.values import Opset

    hqexport = Opset(DOMAIN, SINCE_VERSION)
    op = getattr(hqexport, OP_TYPE)

    def hqq_matmul_onnx(x, weight, scale, zero, bias, N: int, K: int, bits: int, group_size: int, axis: int):  # noqa: ANN001, ANN202
        inputs = (x, weight, scale, zero) if bias is None else (x, weight, scale, zero, bias)
        return op(*inputs, N=N, K=K, bits=bits, group_size=group_size, axis=axis)

    return {torch.ops.hqexport.hqq_matmul.default: hqq_matmul_onnx}


def canonical_weight(layer: QuantizedLinear) -> np.ndarray:
    """The layer's hqq-packed W_q as the op's canonical packed codes (uint8, or uint32 for bits 3)."""
    codes = unpack_codes(packed_as_numpy(layer.packed), layer.out_features, layer.in_features, layer.fmt)
    return pack_canonical(codes, storage_bits(layer.fmt))


def canonical_weight_meta(layer: QuantizedLinear) -> torch.Tensor:
    """An empty meta tensor with the shape and dtype `canonical_weight(layer)` will have."""
    bits = storage_bits(layer.fmt)
    dtype = torch.uint32 if word_dtype(bits) == np.uint32 else torch.uint8
    return torch.empty(canonical_shape(layer.out_features, layer.in_features, bits), dtype=dtype, device="meta")


def op_inputs(
    layer: QuantizedLinear, act_dtype: torch.dtype, *, defer_weight: bool = False
) -> tuple[dict[str, torch.Tensor | None], dict[str, int]]:
    """Tensors {"weight", "scale", "zero", "bias"} and int attributes {"N", "K", "bits", "group_size", "axis"}.

    scale and zero keep hqq's shape and the layer's compute dtype; bias (or None) is cast to `act_dtype`.
    With `defer_weight` the weight is `canonical_weight_meta(layer)` (no data).
    """
    # torch.uint8, or torch.uint32 for bits 3
    weight = canonical_weight_meta(layer) if defer_weight else torch.from_numpy(canonical_weight(layer))
    groups = grouped_shape(layer.out_features, layer.in_features, layer.fmt)
    scale_shape = (groups[0], 1) if layer.fmt.axis == 1 else (1, groups[1])
    tensors = {
        "weight": weight,
        "scale": layer.scale.detach().reshape(scale_shape).to(layer.compute_dtype),
        "zero": layer.zero.detach().reshape(scale_shape).to(layer.compute_dtype),
        "bias": None if layer.bias is None else layer.bias.detach().to(act_dtype),
    }
    attrs = {
        "N": layer.out_features,
        "K": layer.in_features,
        "bits": storage_bits(layer.fmt),
        "group_size": layer.fmt.group_size,
        "axis": layer.fmt.axis,
    }
    return tensors, attrs

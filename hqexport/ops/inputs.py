"""The hqexport op's inputs for one HQQ linear, or for several packed along N (numpy; the export computes them when written)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from hqexport.formats import canonical_shape, pack_canonical, storage_bits, unpack_codes
from hqexport.formats.canonical import word_dtype
from hqexport.formats.codes import grouped_shape, packed_as_numpy
from hqexport.formats.dequant import numpy_dtype, tensor_to_numpy
from hqexport.model import QuantizedLinear


@dataclass(frozen=True)
class TensorSpec:
    dtype: np.dtype
    shape: tuple[int, ...]
    load: Callable[[], np.ndarray]


@dataclass(frozen=True)
class OpInputs:
    tensors: dict[str, TensorSpec]  # "weight", "scale", "zero" and, when a layer has one, "bias"
    attributes: dict[str, int]  # N, K, bits, group_size, axis


def canonical_weight(layer: QuantizedLinear) -> np.ndarray:
    """The layer's hqq-packed W_q as the op's canonical packed codes (uint8, or uint32 for bits 3)."""
    codes = unpack_codes(packed_as_numpy(layer.packed), layer.out_features, layer.in_features, layer.fmt)
    return pack_canonical(codes, storage_bits(layer.fmt))


def _meta_shape(layer: QuantizedLinear) -> tuple[int, int]:
    """hqq's scale / zero shape: [G, 1] for axis 1, [1, G] for axis 0."""
    rows, cols = grouped_shape(layer.out_features, layer.in_features, layer.fmt)
    return (rows, 1) if layer.fmt.axis == 1 else (1, cols)


def packed_inputs(layers: Sequence[QuantizedLinear], act_dtype: np.dtype) -> OpInputs:
    """The inputs of one op computing `layers` (same format and K; axis 1 when more than one) side by side.

    Concatenating canonical rows, and the [G, 1] scales and zeros of axis-1 groups, along N is exact: a group
    of hqq's axis-1 grouping never spans two layers. A layer without bias contributes zeros to a packed bias.
    """
    first = layers[0]
    if len(layers) > 1 and first.fmt.axis != 1:
        raise ValueError("only axis-1 layers can be packed")
    bits, meta = storage_bits(first.fmt), numpy_dtype(first.compute_dtype)
    n = sum(layer.out_features for layer in layers)
    shapes = [_meta_shape(layer) for layer in layers]
    meta_shape = (sum(shape[0] for shape in shapes), 1) if len(layers) > 1 else shapes[0]

    def meta_tensor(attribute: str) -> np.ndarray:
        parts = [tensor_to_numpy(getattr(layer, attribute)).astype(meta).reshape(shape) for layer, shape in zip(layers, shapes)]
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def bias() -> np.ndarray:
        return np.concatenate([
            tensor_to_numpy(layer.bias).astype(act_dtype) if layer.bias is not None else np.zeros(layer.out_features, act_dtype)
            for layer in layers
        ])

    tensors = {
        "weight": TensorSpec(word_dtype(bits), canonical_shape(n, first.in_features, bits),
                             lambda: np.concatenate([canonical_weight(layer) for layer in layers])),
        "scale": TensorSpec(meta, meta_shape, lambda: meta_tensor("scale")),
        "zero": TensorSpec(meta, meta_shape, lambda: meta_tensor("zero")),
    }
    if any(layer.bias is not None for layer in layers):
        tensors["bias"] = TensorSpec(np.dtype(act_dtype), (n,), bias)
    attributes = {"N": n, "K": first.in_features, "bits": bits, "group_size": first.fmt.group_size, "axis": first.fmt.axis}
    return OpInputs(tensors, attributes)


def op_inputs(layer: QuantizedLinear, act_dtype: np.dtype) -> tuple[dict[str, np.ndarray | None], dict[str, int]]:
    """One layer's op inputs as arrays {"weight", "scale", "zero", "bias" (or None)} and int attributes."""
    inputs = packed_inputs([layer], np.dtype(act_dtype))
    tensors = {key: spec.load() for key, spec in inputs.tensors.items()}
    return {**tensors, "bias": tensors.get("bias")}, inputs.attributes

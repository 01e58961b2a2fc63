"""HQQ dequantization, bit-identical to `HQQLinear.dequantize()`, in numpy and in torch.

hqq computes W = ((codes - zero) * scale).reshape(shape) in the layer's compute dtype, one rounding per op.
numpy has no bfloat16: we use ml_dtypes' bfloat16, whose arithmetic rounds each op like torch's CPU kernels do.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import torch

from hqexport.formats.codes import grouped_shape, packed_as_numpy, unpack_codes
from hqexport.model import QuantizedLinear

_NUMPY_DTYPE = {
    torch.float32: np.dtype(np.float32),
    torch.float16: np.dtype(np.float16),
    torch.bfloat16: np.dtype(ml_dtypes.bfloat16),
}


def numpy_dtype(dtype: torch.dtype) -> np.dtype:
    try:
        return _NUMPY_DTYPE[dtype]
    except KeyError:
        raise ValueError(f"unsupported compute dtype {dtype}") from None


def tensor_to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """Any CPU tensor to numpy, bfloat16 included (bit-exact)."""
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def dequantize_numpy(layer: QuantizedLinear) -> np.ndarray:
    """The layer's weight [out, in] in its compute dtype, as numpy."""
    dtype = numpy_dtype(layer.compute_dtype)
    codes = unpack_codes(packed_as_numpy(layer.packed), layer.out_features, layer.in_features, layer.fmt)
    grouped = codes.reshape(grouped_shape(layer.out_features, layer.in_features, layer.fmt)).astype(dtype)
    scale = tensor_to_numpy(layer.scale).astype(dtype)
    zero = tensor_to_numpy(layer.zero).astype(dtype)
    return ((grouped - zero) * scale).reshape(layer.shape)


def dequantize_torch(layer: QuantizedLinear) -> torch.Tensor:
    """The layer's weight [out, in] in its compute dtype, as a torch tensor."""
    codes = unpack_codes(packed_as_numpy(layer.packed), layer.out_features, layer.in_features, layer.fmt)
    grouped = torch.from_numpy(codes.reshape(grouped_shape(layer.out_features, layer.in_features, layer.fmt)))
    grouped = grouped.to(layer.compute_dtype)
    scale = layer.scale.to(layer.compute_dtype)
    zero = layer.zero.to(layer.compute_dtype)
    return ((grouped - zero) * scale).reshape(layer.shape)

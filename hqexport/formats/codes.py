"""From a QuantizedLinear's packed W_q to its code matrix and back, in numpy."""

from __future__ import annotations

import numpy as np
import torch

from hqexport.formats.packing import get_packing
from hqexport.model import HQQFormat


def grouped_shape(out_features: int, in_features: int, fmt: HQQFormat) -> tuple[int, int]:
    """The 2-D shape hqq reshapes W to before quantizing: [G, g] for axis 1, [g, G] for axis 0."""
    groups = out_features * in_features // fmt.group_size
    return (groups, fmt.group_size) if fmt.axis == 1 else (fmt.group_size, groups)


def unpack_codes(packed: np.ndarray, out_features: int, in_features: int, fmt: HQQFormat) -> np.ndarray:
    """hqq's packed W_q -> codes [out, in] (uint8), codes[n, k] being the code of W[n, k]."""
    rows, cols = grouped_shape(out_features, in_features, fmt)
    codes = get_packing(fmt.packing).unpack(packed)
    if codes.shape[1] != cols or codes.shape[0] < rows:
        raise ValueError(
            f"packed W_q of shape {list(packed.shape)} does not hold a {fmt.packing} [{rows}, {cols}] code matrix"
        )
    return codes[:rows].reshape(out_features, in_features)


def pack_codes(codes: np.ndarray, fmt: HQQFormat) -> np.ndarray:
    """Codes [out, in] -> hqq's packed W_q (exact inverse of `unpack_codes`)."""
    out_features, in_features = codes.shape
    grouped = codes.reshape(grouped_shape(out_features, in_features, fmt))
    return get_packing(fmt.packing).pack(grouped)


def packed_as_numpy(packed: torch.Tensor) -> np.ndarray:
    """W_q as numpy with its integer storage dtype (undoes hqq's view_as_float)."""
    if packed.dtype.is_floating_point:
        raise ValueError("W_q is still a float view; readers must undo view_as_float first")
    return packed.detach().cpu().numpy()

"""Initializers whose data is computed only when it is needed (normally: when the ONNX file is written).

convert never holds the whole model's weights: each deferred tensor is produced by a function, written, and
dropped. The declared shape and dtype are part of the graph, so a function that returns anything else is an
error here rather than a corrupt file.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import onnx_ir as ir


def lazy_tensor(
    name: str, dtype: ir.DataType | np.dtype | type, shape: Sequence[int], load: Callable[[], np.ndarray]
) -> ir.LazyTensor:
    """An ir.LazyTensor named `name` whose data is `load()`, checked against `dtype` and `shape`."""
    dtype = dtype if isinstance(dtype, ir.DataType) else ir.DataType.from_numpy(np.dtype(dtype))
    shape = tuple(int(dim) for dim in shape)

    def evaluate() -> ir.Tensor:
        array = load()
        if array.shape != shape or ir.DataType.from_numpy(array.dtype) != dtype:
            raise RuntimeError(f"initializer {name}: computed {array.dtype} {array.shape}, the graph declares {dtype} {shape}")
        return ir.tensor(array, name=name)

    return ir.LazyTensor(evaluate, dtype=dtype, shape=ir.Shape(shape), name=name)

"""The module that stands in for one HQQ linear during export: canonical buffers + one hqexport op call."""

from __future__ import annotations

import torch

import hqexport.ops.torch_op  # noqa: F401  (registers torch.ops.hqexport.hqq_matmul)
from hqexport.model import QuantizedLinear
from hqexport.ops.torch_op import op_inputs

#: buffer suffixes, by op input; the ONNX initializers are named "<module path>.<suffix>"
BUFFER_NAMES = {"weight": "weight_packed", "scale": "scale", "zero": "zero", "bias": "bias"}


class HQQMatMulLinear(torch.nn.Module):
    """y = x @ dequant(W)^T (+ bias) through torch.ops.hqexport.hqq_matmul.

    The packed codes, scale, zero and bias are buffers (not parameters), so torch.onnx keeps them as
    initializers named after the module path and never materializes the fp weight. With `defer_weight`
    the packed codes are an empty meta tensor of the right shape: enough to export the graph, whose
    initializer is then filled from the source layer when it is written (see `canonical_weight`).
    """

    def __init__(self, layer: QuantizedLinear, act_dtype: torch.dtype, *, defer_weight: bool = False) -> None:
        super().__init__()
        tensors, attrs = op_inputs(layer, act_dtype, defer_weight=defer_weight)
        self.attrs = attrs
        self.in_features, self.out_features = layer.in_features, layer.out_features
        for key, suffix in BUFFER_NAMES.items():
            self.register_buffer(suffix, tensors[key])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.hqexport.hqq_matmul(
            x, self.weight_packed, self.scale, self.zero, self.bias, **self.attrs
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value}" for key, value in self.attrs.items())

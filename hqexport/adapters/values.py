"""The numbers that go into the graph or an adapter file for one module, computed as PEFT computes them."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from hqexport.adapters.spec import LoraModuleWeights
from hqexport.formats.dequant import dequantize_torch
from hqexport.model import QuantizedLinear


def lora_matmul_weights(weights: LoraModuleWeights, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """(lora_A^T [in, r], (scaling * lora_B)^T [r, out]) for MatMul, in the model's activation dtype."""
    a_t = weights.lora_A.float().T.contiguous()
    b_t = (weights.lora_B.float() * weights.scaling).T.contiguous()
    return a_t.numpy().astype(dtype), b_t.numpy().astype(dtype)


def dora_factor(layer: QuantizedLinear, weights: LoraModuleWeights, act_dtype: torch.dtype) -> np.ndarray:
    """m / ||W + scaling * B A||_row as DoraLinearLayer.forward computes it (eval mode), in the activation dtype.

    W is hqq's dequantized weight; PEFT forms B A by running the LoRA layers on an identity matrix.
    """
    assert weights.magnitude is not None
    eye = torch.eye(weights.lora_A.shape[1], dtype=weights.lora_A.dtype)
    lora_weight = F.linear(F.linear(eye, weights.lora_A), weights.lora_B).T.to(act_dtype)
    weight = dequantize_torch(layer).to(act_dtype)
    norm = torch.linalg.norm(weight + weights.scaling * lora_weight, dim=1).to(weight.dtype)
    factor = weights.magnitude.to(act_dtype) / norm
    return factor.detach().numpy()

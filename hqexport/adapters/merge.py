"""`--adapters merge`: fold an adapter into the HQQ weights the way PEFT's HqqLoraLinear.merge does.

Per target layer: W = dequantize(layer) (compute dtype) + (B @ A) * scaling (LoRA dtype), or for DoRA
m/||W + ΔW||_row * (W + ΔW); then hqq's own `Quantizer.quantize` with the layer's original settings. Because
the result is re-quantized, most of a small adapter's delta can vanish: `retained` measures how much survived,
the projection <W_merged − W_base, ΔW> / ||ΔW||² (1 = all of it, 0 = none), per layer and over the model.

Unlike PEFT (whose merge builds the new HQQLinear without the old bias), the layer's bias is kept.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from hqq.core.quantize import Quantizer, hqq_base_quant_config

from hqexport.adapters.spec import AdapterSpec, LoraModuleWeights
from hqexport.errors import HQExportError
from hqexport.formats.dequant import dequantize_torch
from hqexport.model import QuantizedLinear, QuantizedModel
from hqexport.read.meta import layer_from_meta


def weight_quant_params(layer: QuantizedLinear, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """hqq's weight_quant_params for re-quantizing `layer`.

    nbits, group_size and axis come from the layer; optimize / round_zero / channel_wise are not stored in the
    packed weights, so they default to hqq's BaseQuantizeConfig (optimize=True, round_zero at 4 bits) unless the
    reader knows them (`overrides`, e.g. the `.optimize` / `.round_zero` keys of an HQQ safetensors file).
    """
    params = hqq_base_quant_config(
        nbits=layer.fmt.nbits, group_size=layer.fmt.group_size, axis=layer.fmt.axis, view_as_float=False
    )["weight_quant_params"]
    params.update(overrides or {})
    params["view_as_float"] = False
    return params


def merged_weight(layer: QuantizedLinear, weights: LoraModuleWeights) -> torch.Tensor:
    """The fp weight PEFT hands to hqq's quantizer for this layer."""
    base = dequantize_torch(layer)
    delta = weights.delta()
    if weights.magnitude is None:
        return base + delta
    # DoraLinearVariant.merge_safe: norm of W + ΔW (scaling already in ΔW), factor m / norm, per output row.
    norm = torch.linalg.norm(base + delta, dim=1).to(base.dtype)
    factor = (weights.magnitude / norm).view(-1, 1)
    return (factor * (base + delta)).to(base.dtype)


def requantize(layer: QuantizedLinear, weight: torch.Tensor, overrides: Mapping[str, Any] | None = None) -> QuantizedLinear:
    """hqq's Quantizer.quantize on CPU with the layer's settings, checked into a QuantizedLinear."""
    packed, meta = Quantizer.quantize(
        weight, device="cpu", compute_dtype=layer.compute_dtype, **weight_quant_params(layer, overrides)
    )
    meta["compute_dtype"] = layer.compute_dtype
    return layer_from_meta(layer.name, packed, meta, layer.bias)


@dataclasses.dataclass(frozen=True)
class RetainedDelta:
    """How much of ΔW survived re-quantization in one layer."""

    delta_norm: float  # ||ΔW|| (Frobenius) intended by the adapter
    inner: float  # <W_merged - W_base, ΔW>
    error_norm: float  # ||(W_merged - W_base) - ΔW||

    @property
    def retained(self) -> float:
        return self.inner / self.delta_norm**2 if self.delta_norm else 1.0

    @property
    def relative_error(self) -> float:
        return self.error_norm / self.delta_norm if self.delta_norm else 0.0


def retained_delta(base: QuantizedLinear, merged: QuantizedLinear, intended: torch.Tensor) -> RetainedDelta:
    delta = intended.double()
    actual = dequantize_torch(merged).double() - dequantize_torch(base).double()
    return RetainedDelta(
        delta_norm=float(delta.norm()),
        inner=float((actual * delta).sum()),
        error_norm=float((actual - delta).norm()),
    )


def merge_adapter(
    model: QuantizedModel,
    adapter: AdapterSpec,
    quant_overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> tuple[QuantizedModel, dict[str, Any]]:
    """A new QuantizedModel with `adapter` merged, and the manifest entry with the retained-delta figures."""
    linears = dict(model.linears)
    layers: dict[str, dict[str, float]] = {}
    inner = norm_sq = 0.0
    for name, weights in adapter.modules.items():
        if name not in model.linears:
            raise HQExportError(f"adapter {adapter.name} targets {name}, which is not an HQQ linear of the source")
        base = model.linears[name]
        weight = merged_weight(base, weights)
        merged = requantize(base, weight, (quant_overrides or {}).get(name))
        linears[name] = merged
        figure = retained_delta(base, merged, weight.double() - dequantize_torch(base).double())
        layers[name] = {"retained": figure.retained, "relative_error": figure.relative_error, "delta_norm": figure.delta_norm}
        inner += figure.inner
        norm_sq += figure.delta_norm**2
    entry = {
        **adapter.summary(),
        "mode": "merge",
        "retained": inner / norm_sq if norm_sq else 1.0,
        "layers": layers,
    }
    return dataclasses.replace(model, linears=linears), entry


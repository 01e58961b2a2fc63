"""Turn hqq's per-layer metadata (decoded to Python values) into a checked QuantizedLinear.

All readers end here, so every source gets the same checks: known packing, bit width, grouping, and a W_q
whose shape matches shape/nbits/group_size. Errors name the layer; readers add the file.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from hqexport.errors import HQExportError
from hqexport.formats.codes import grouped_shape
from hqexport.formats.packing import PACKINGS
from hqexport.model import HQQ_BIT_TO_PACKING, HQQFormat, QuantizedLinear

_COMPUTE_DTYPES = {torch.float32, torch.float16, torch.bfloat16}


def nominal_bits(nbits: float, packing: str) -> float:
    """hqq stores 1.58 as int(1.58) == 1 in encoded state dicts; the 2bit packing tells them apart."""
    if packing == "2bit_u8" and round(float(nbits)) == 1:
        return 1.58
    return float(nbits) if float(nbits) == 1.58 else int(round(float(nbits)))


def layer_from_meta(name: str, packed: torch.Tensor, meta: Mapping[str, Any], bias: torch.Tensor | None) -> QuantizedLinear:
    """Build a QuantizedLinear from hqq's `meta` dict (keys as in HQQLinear.meta)."""
    if meta.get("quant_scale") or meta.get("quant_zero"):
        raise HQExportError(
            f"layer {name} uses hqq's deprecated meta-quantized scale/zero (quant_scale/quant_zero); "
            "re-quantize it with a current hqq"
        )
    packing = meta.get("packing")
    if packing not in PACKINGS:
        raise HQExportError(f"layer {name} has unknown packing {packing!r} (known: {', '.join(PACKINGS)})")
    nbits = nominal_bits(meta["nbits"], packing)
    if nbits not in HQQ_BIT_TO_PACKING:
        raise HQExportError(f"layer {name} has nbits={meta['nbits']}, not one of hqq's {sorted(HQQ_BIT_TO_PACKING)}")
    if HQQ_BIT_TO_PACKING[nbits] != packing:
        raise HQExportError(f"layer {name}: nbits={nbits:g} is not stored with packing {packing!r}")
    axis = int(meta["axis"])
    if axis not in (0, 1):
        raise HQExportError(f"layer {name} has axis={axis}; hqq uses 0 or 1")
    out_features, in_features = (int(d) for d in meta["shape"])
    if out_features <= 0 or in_features <= 0:
        raise HQExportError(f"layer {name} has shape [{out_features}, {in_features}]; both sizes must be positive")
    group_size = int(meta["group_size"])
    if group_size <= 0 or (out_features * in_features) % group_size:
        raise HQExportError(f"layer {name}: group_size {group_size} does not divide its {out_features}x{in_features} weight")
    compute_dtype = meta.get("compute_dtype", torch.float16)
    if compute_dtype not in _COMPUTE_DTYPES:
        raise HQExportError(f"layer {name} has compute dtype {compute_dtype}; expected float32, float16 or bfloat16")

    fmt = HQQFormat(nbits=nbits, group_size=group_size, axis=axis, packing=packing)
    view_as_float = bool(meta.get("view_as_float", False))
    if not isinstance(packed, torch.Tensor) or packed.dim() != 2:
        what = list(packed.shape) if isinstance(packed, torch.Tensor) else type(packed).__name__
        raise HQExportError(f"layer {name}: W_q must be a 2-D tensor, got {what}")
    if packed.dtype.is_floating_point:
        try:
            packed = packed.view(_TORCH_STORAGE[packing])
        except RuntimeError:
            raise HQExportError(f"layer {name}: W_q {packed.dtype} {list(packed.shape)} cannot be viewed as {packing} codes") from None
        view_as_float = True
    if packed.dtype != _TORCH_STORAGE[packing]:
        raise HQExportError(f"layer {name}: W_q has dtype {packed.dtype}, {packing} stores {_TORCH_STORAGE[packing]}")

    rows, cols = grouped_shape(out_features, in_features, fmt)
    expected = (PACKINGS[packing].packed_rows(rows), cols)
    if tuple(packed.shape) != expected:
        raise HQExportError(
            f"layer {name}: W_q shape {list(packed.shape)} does not match shape [{out_features}, {in_features}], "
            f"nbits {nbits:g}, group_size {group_size}, axis {axis} (expected {list(expected)})"
        )
    scale, zero = meta["scale"], meta["zero"]
    groups = out_features * in_features // group_size
    for label, tensor in (("scale", scale), ("zero", zero)):
        if not isinstance(tensor, torch.Tensor) or tensor.numel() != groups:
            raise HQExportError(f"layer {name}: {label} must hold {groups} values (one per group)")
        if not tensor.is_floating_point():
            raise HQExportError(f"layer {name}: {label} has dtype {tensor.dtype}; hqq stores it in the compute dtype")
        if not torch.isfinite(tensor.float()).all():
            raise HQExportError(f"layer {name}: {label} contains NaN or Inf")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (out_features,) or not bias.is_floating_point():
            what = f"{bias.dtype} {list(bias.shape)}" if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise HQExportError(f"layer {name}: bias is {what}; expected a float vector of {out_features} values")
        if not torch.isfinite(bias.float()).all():
            raise HQExportError(f"layer {name}: bias contains NaN or Inf")
    group_shape = (groups, 1) if axis == 1 else (1, groups)
    return QuantizedLinear(
        name=name,
        out_features=out_features,
        in_features=in_features,
        fmt=fmt,
        packed=packed.detach().cpu().contiguous(),
        scale=scale.detach().cpu().reshape(group_shape),
        zero=zero.detach().cpu().reshape(group_shape),
        bias=None if bias is None else bias.detach().cpu(),
        compute_dtype=compute_dtype,
        view_as_float=view_as_float,
    )


_TORCH_STORAGE = {"3bit_32": torch.int32, **{name: torch.uint8 for name in PACKINGS if name != "3bit_32"}}

"""The typed values passed between pipeline stages.

`QuantizedModel` is what every reader produces and what convert/inspect/validate consume. It holds HQQ's
packed codes exactly as hqq stored them (never re-quantized) plus everything needed to rebuild the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

#: hqq's nominal bit widths and the packing each one is stored with (hqq.core.quantize.Quantizer.bit_to_packing).
HQQ_BIT_TO_PACKING: dict[float, str] = {
    8: "8bit_u8",
    6: "8bit_u8",
    5: "8bit_u8",
    4: "4bit_u8",
    3: "3bit_32",
    2: "2bit_u8",
    1.58: "2bit_u8",
    1: "1bit_u8",
}


@dataclass(frozen=True)
class HQQFormat:
    """How one HQQ linear is quantized: W = (codes - zero) * scale, grouped along `axis`."""

    nbits: float  # nominal width: 8, 6, 5, 4, 3, 2, 1.58 or 1
    group_size: int
    axis: int  # 1: a group is `group_size` consecutive inputs of one output; 0: see docs/ops.md
    packing: str  # hqq packing name, e.g. "4bit_u8"

    @property
    def label(self) -> str:
        return f"{self.nbits:g}bit g{self.group_size} axis{self.axis}"


@dataclass
class QuantizedLinear:
    """One HQQ linear layer, exactly as stored by hqq (float views of W_q undone)."""

    name: str  # module path, e.g. "model.layers.0.self_attn.q_proj"
    out_features: int
    in_features: int
    fmt: HQQFormat
    packed: torch.Tensor  # hqq's W_q: uint8 (or int32 for 3bit_32), hqq's slab packing
    scale: torch.Tensor  # dequant multiplier, [G, 1] for axis 1, [1, G] for axis 0, compute dtype
    zero: torch.Tensor  # same shape and dtype as scale; not integer in general
    bias: torch.Tensor | None
    compute_dtype: torch.dtype
    view_as_float: bool = False  # how W_q was stored; provenance only

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def packed_bytes(self) -> int:
        return self.packed.numel() * self.packed.element_size()

    @property
    def meta_bytes(self) -> int:
        """Bytes of scale, zero and bias: the fp side of the packed layer."""
        tensors = [self.scale, self.zero] + ([self.bias] if self.bias is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclass(frozen=True)
class Provenance:
    """Where a QuantizedModel came from."""

    kind: str  # "hqq-pickle", "hqq-safetensors" or "live"
    path: Path | None
    files: dict[str, str] = field(default_factory=dict)  # relative file name -> sha256


@dataclass
class QuantizedModel:
    """A whole HQQ model: config, quantized linears, remaining fp tensors, tokenizer files."""

    config: dict[str, Any]  # the Hugging Face config.json content
    linears: dict[str, QuantizedLinear]  # by module path
    tensors: dict[str, torch.Tensor]  # every other tensor, by state-dict key (e.g. "model.norm.weight")
    tokenizer_files: list[Path]
    provenance: Provenance
    skipped_modules: list[str] = field(default_factory=list)  # linears left in fp (e.g. lm_head)

    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or []
        return archs[0] if archs else self.config.get("model_type", "unknown")

    @property
    def packed_bytes(self) -> int:
        return sum(layer.packed_bytes for layer in self.linears.values())

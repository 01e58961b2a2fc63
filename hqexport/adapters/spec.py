"""The typed values of a loaded adapter: its config and the LoRA factors of every module it targets."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class LoraModuleWeights:
    """The LoRA factors of one target module, as PEFT stores them (lora_A [r, in], lora_B [out, r])."""

    module: str
    rank: int
    alpha: float
    scaling: float
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    magnitude: torch.Tensor | None = None  # DoRA's lora_magnitude_vector [out]

    def delta(self) -> torch.Tensor:
        """ΔW = (B @ A) * scaling, computed as PEFT's HqqLoraLinear.get_delta_weight does."""
        return (self.lora_B @ self.lora_A) * self.scaling


@dataclass
class AdapterSpec:
    """One LoRA adapter bound to a base model: its config and the weights of every module it targets."""

    name: str
    path: Path
    config: dict[str, Any]
    modules: dict[str, LoraModuleWeights] = field(default_factory=dict)

    @property
    def use_dora(self) -> bool:
        return bool(self.config.get("use_dora"))

    @property
    def base_model_name_or_path(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    def summary(self) -> dict[str, Any]:
        """What the manifest and `inspect` show."""
        return {
            "source": str(self.path),
            "peft_type": self.config.get("peft_type", "LORA"),
            "r": self.config.get("r"),
            "lora_alpha": self.config.get("lora_alpha"),
            "use_rslora": bool(self.config.get("use_rslora")),
            "use_dora": self.use_dora,
            "base_model_name_or_path": self.base_model_name_or_path,
            "targets": {
                name: {"r": m.rank, "alpha": m.alpha, "scaling": m.scaling, "shape": [m.lora_B.shape[0], m.lora_A.shape[1]]}
                for name, m in sorted(self.modules.items())
            },
        }

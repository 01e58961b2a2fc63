"""The reference side of each comparison: forward steps of the rebuilt PyTorch model with its own KV cache."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from hqexport.validation.reference import Reference


def returned_cache(output: Any) -> Any:
    """The KV cache of a transformers output (`cache` in transformers 5, `past_key_values` before)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


class TorchDecoder:
    """Same step interface as OnnxDecoder, on the reference model (float32 activations, transformers' cache)."""

    def __init__(self, reference: Reference) -> None:
        self.reference = reference

    @property
    def model(self) -> torch.nn.Module:
        return self.reference.model  # adapters may wrap or replace it

    @torch.inference_mode()
    def step(self, input_ids: np.ndarray, cache: Any | None) -> tuple[np.ndarray, Any]:
        ids = torch.from_numpy(np.asarray(input_ids, dtype=np.int64))
        out = self.model(input_ids=ids, cache=cache, use_cache=True)
        return out.logits.float().numpy(), returned_cache(out)

    @torch.inference_mode()
    def block_outputs(self, input_ids: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """Logits and each decoder block's output hidden states for one forward pass without cache."""
        captured: list[np.ndarray] = []

        def hook(_module: torch.nn.Module, _args: Any, output: Any) -> None:
            hidden = output[0] if isinstance(output, (tuple, list)) else output
            captured.append(hidden.float().numpy().copy())

        handles = [block.register_forward_hook(hook) for block in self.reference.blocks]
        try:
            ids = torch.from_numpy(np.asarray(input_ids, dtype=np.int64))
            logits = self.model(input_ids=ids, use_cache=False).logits.float().numpy()
        finally:
            for handle in handles:
                handle.remove()
        return logits, captured

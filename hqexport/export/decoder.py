"""The generation graph's signature: a causal LM taking and returning its KV cache as flat tensors.

Names follow onnxruntime-genai's defaults and optimum's ORTModelForCausalLM: input_ids, attention_mask,
position_ids, past_key_values.{i}.key/value in; logits, present.{i}.key/value out. One graph serves prefill
(past length 0) and decode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import transformers
from transformers import DynamicCache

#: example sizes for tracing; all > 1 so torch.export does not specialize a dimension to 0 or 1
_EXAMPLE_BATCH, _EXAMPLE_SEQUENCE, _EXAMPLE_PAST = 2, 3, 4


@dataclass(frozen=True)
class DecoderIO:
    """Shapes and names of the KV cache of one architecture instance."""

    num_layers: int
    num_key_value_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def past_names(self) -> list[str]:
        return [f"past_key_values.{i}.{kind}" for i in range(self.num_layers) for kind in ("key", "value")]

    @property
    def present_names(self) -> list[str]:
        return [f"present.{i}.{kind}" for i in range(self.num_layers) for kind in ("key", "value")]

    @property
    def input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "position_ids", *self.past_names]

    @property
    def output_names(self) -> list[str]:
        return ["logits", *self.present_names]

    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        batch, sequence, past = _EXAMPLE_BATCH, _EXAMPLE_SEQUENCE, _EXAMPLE_PAST
        input_ids = torch.zeros((batch, sequence), dtype=torch.int64)
        attention_mask = torch.ones((batch, past + sequence), dtype=torch.int64)
        position_ids = torch.arange(past, past + sequence, dtype=torch.int64).expand(batch, sequence)
        cache_shape = (batch, self.num_key_value_heads, past, self.head_dim)
        cache = tuple(torch.zeros(cache_shape, dtype=self.dtype) for _ in self.past_names)
        return (input_ids, attention_mask, position_ids, *cache)

    def dynamic_shapes(self) -> tuple:
        """torch.export dynamic_shapes matching DecoderWithCache.forward's (input_ids, mask, positions, *past)."""
        tokens = {0: "batch", 1: "sequence"}
        cache = {0: "batch", 2: "past_sequence"}
        return (tokens, {0: "batch", 1: "total_sequence"}, tokens, tuple(cache for _ in self.past_names))


def decoder_io(config: transformers.PretrainedConfig, dtype: torch.dtype) -> DecoderIO:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return DecoderIO(config.num_hidden_layers, kv_heads, head_dim, dtype)


class DecoderWithCache(torch.nn.Module):
    """Wraps a transformers causal LM: flat past tensors -> DynamicCache -> logits and flat present tensors."""

    def __init__(self, causal_lm: torch.nn.Module, io: DecoderIO) -> None:
        super().__init__()
        self.causal_lm = causal_lm
        self.io = io

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        *past: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        cache = DynamicCache(ddp_cache_data=list(zip(past[0::2], past[1::2])))
        out = self.causal_lm(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
        )
        present = [tensor for layer in out.cache.layers for tensor in (layer.keys, layer.values)]
        return (out.logits, *present)

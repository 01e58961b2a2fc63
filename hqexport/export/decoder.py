"""The generation graph's signature: a causal LM taking and returning its KV cache as flat tensors.

Names follow onnxruntime-genai's defaults and optimum's ORTModelForCausalLM: input_ids, attention_mask,
position_ids, past_key_values.{i}.key/value in; logits, present.{i}.key/value out. One graph serves prefill
(past length 0) and decode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import transformers

from hqexport.export.architectures import head_dim


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


def decoder_io(config: transformers.PretrainedConfig, dtype: torch.dtype) -> DecoderIO:
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return DecoderIO(config.num_hidden_layers, kv_heads, head_dim(config), dtype)

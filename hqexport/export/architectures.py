"""One entry per supported decoder family: where its weights live and what its blocks do differently.

The graph builder (export/graph.py) reads only this table, never `model_type` itself, so a family's quirks
live in one place: Gemma scales its embeddings and stores RMSNorm weights as offsets from 1 and uses a tanh
GELU; Qwen3 normalizes each query and key head before the rotary embedding; Phi-3 stores q/k/v and gate/up
already packed; Mistral (and Qwen2 with `use_sliding_window`) attends within a sliding window.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass

import transformers

from hqexport.errors import UnsupportedModelError

#: rotary embeddings whose frequencies do not depend on the sequence length (a cos/sin table is exact for them)
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass(frozen=True)
class Architecture:
    """How one family's decoder computes; module paths are relative to `model.layers.{i}`."""

    causal_lm: str  # the transformers class, e.g. "LlamaForCausalLM"
    attention: tuple[str, ...]  # the projections feeding attention, in q, k, v order (one for a packed qkv)
    mlp_in: tuple[str, ...]  # the projections of the MLP's input, gate first (one for a packed gate_up)
    activation: str = "silu"  # of the gate: "silu" or "gelu_tanh"
    norm_offset: float = 0.0  # RMSNorm multiplies by (offset + weight)
    scale_embeddings: bool = False  # embeddings times sqrt(hidden_size)
    qk_norm: bool = False  # RMSNorm over each query / key head (self_attn.q_norm, self_attn.k_norm)

    @property
    def attention_out(self) -> str:
        return "self_attn.o_proj"

    @property
    def mlp_out(self) -> str:
        return "mlp.down_proj"


_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_GATE_UP = ("mlp.gate_proj", "mlp.up_proj")

ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("LlamaForCausalLM", _QKV, _GATE_UP),
    "mistral": Architecture("MistralForCausalLM", _QKV, _GATE_UP),
    "qwen2": Architecture("Qwen2ForCausalLM", _QKV, _GATE_UP),
    "qwen3": Architecture("Qwen3ForCausalLM", _QKV, _GATE_UP, qk_norm=True),
    "phi3": Architecture("Phi3ForCausalLM", ("self_attn.qkv_proj",), ("mlp.gate_up_proj",)),
    "gemma": Architecture("GemmaForCausalLM", _QKV, _GATE_UP, activation="gelu_tanh", norm_offset=1.0, scale_embeddings=True),
}

_ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}


def architecture(config: transformers.PretrainedConfig) -> Architecture:
    """The table entry for `config`, checked against what the graph builder can express exactly."""
    arch = ARCHITECTURES[config.model_type]
    activation = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", "silu")
    if _ACTIVATIONS.get(activation) != arch.activation:
        raise UnsupportedModelError(f"{arch.causal_lm} with activation {activation!r} is not supported (expected {arch.activation})")
    rope = rope_type(config)
    if rope not in STATIC_ROPE_TYPES:
        raise UnsupportedModelError(
            f"{arch.causal_lm} with rope type {rope!r} is not supported: its frequencies change with the sequence "
            f"length; supported: {', '.join(STATIC_ROPE_TYPES)}"
        )
    return arch


def rope_type(config: transformers.PretrainedConfig) -> str:
    parameters = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return str(parameters.get("rope_type") or parameters.get("type") or "default")


def head_dim(config: transformers.PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def sliding_window(config: transformers.PretrainedConfig, layer: int) -> int | None:
    """Layer `layer`'s attention window (tokens), or None for full causal attention.

    `layer_types` (Qwen2 with use_sliding_window: full attention below max_window_layers) decides per layer where
    the config has it; otherwise `sliding_window` applies to every layer (Mistral).
    """
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and layer_types[layer] != "sliding_attention":
        return None
    if config.model_type == "qwen2" and not getattr(config, "use_sliding_window", False):
        return None
    return int(window) if window else None


def embedding_scale(config: transformers.PretrainedConfig) -> float:
    return math.sqrt(config.hidden_size)


def rotary_class(config: transformers.PretrainedConfig) -> type:
    """The family's rotary embedding module class (e.g. LlamaRotaryEmbedding), next to its causal LM class."""
    causal_lm = ARCHITECTURES[config.model_type].causal_lm
    module = importlib.import_module(getattr(transformers, causal_lm).__module__)
    return getattr(module, causal_lm.removesuffix("ForCausalLM") + "RotaryEmbedding")

"""genai_config.json: what onnxruntime-genai needs to run the exported decoder."""

from __future__ import annotations

from typing import Any

import transformers

from hqexport.export.decoder import DecoderIO
from hqexport.files import MODEL_FILE

#: search defaults: greedy decoding, like the validation and the demo
_SEARCH = {
    "do_sample": False,
    "num_beams": 1,
    "num_return_sequences": 1,
    "top_k": 50,
    "top_p": 1.0,
    "temperature": 1.0,
    "repetition_penalty": 1.0,
    "length_penalty": 1.0,
    "diversity_penalty": 0.0,
    "no_repeat_ngram_size": 0,
    "min_length": 0,
    "early_stopping": True,
    # every graph's attention is GroupQueryAttention, which then writes each step's keys and values into
    # onnxruntime-genai's max_length cache in place instead of copying the whole cache into a new present output:
    # SmolLM2 decoded 1.06x faster in onnxruntime-genai 0.18, the same tokens (docs/performance.md)
    "past_present_share_buffer": True,
}


def genai_config(config: transformers.PretrainedConfig, io: DecoderIO, custom_ops_library: str | None = None) -> dict[str, Any]:
    """custom_ops_library: a library file in the folder that onnxruntime-genai registers with the session."""
    eos = config.eos_token_id
    pad = config.pad_token_id if config.pad_token_id is not None else (eos[0] if isinstance(eos, list) else eos)
    context_length = int(config.max_position_embeddings)
    return {
        "model": {
            "type": config.model_type,
            "bos_token_id": config.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": pad,
            "vocab_size": config.vocab_size,
            "context_length": context_length,
            "decoder": {
                "session_options": {
                    "log_id": "onnxruntime-genai", "provider_options": [],
                    # 0: onnxruntime's own default (one thread per physical core). Left unset, onnxruntime-genai 0.18
                    # decoded SmolLM2 at 0.6x of a plain onnxruntime session (18.4-20.3 vs 11.5 ms per token, 2 cores)
                    "intra_op_num_threads": 0,
                    **({"custom_ops_library": custom_ops_library} if custom_ops_library else {}),
                },
                "filename": MODEL_FILE,
                "head_size": io.head_dim,
                "hidden_size": config.hidden_size,
                "num_attention_heads": config.num_attention_heads,
                "num_key_value_heads": io.num_key_value_heads,
                "num_hidden_layers": io.num_layers,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
            },
        },
        "search": {**_SEARCH, "max_length": min(context_length, 2048)},
    }

"""The bundled sample: tiny transformers models quantized with hqq on CPU, made deterministically in seconds.

Used by `hqexport demo`, the README's first command and the tests. Nothing is downloaded: the config is a
random tiny instance of a real architecture and the tokenizer is a byte-level BPE trained on `data/corpus.txt`.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import transformers
from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
from hqq.models.hf.base import AutoHQQHFModel

SAMPLE_ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral", "phi3", "gemma")

_TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


def corpus_text() -> str:
    """A few paragraphs of public-domain English, bundled with the package."""
    return resources.files("hqexport.data").joinpath("corpus.txt").read_text(encoding="utf-8")


def build_tokenizer(vocab_size: int = 320) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on the bundled corpus (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus_text().splitlines(), trainer=trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>"
    )


def tiny_config(arch: str, vocab_size: int, **overrides: Any) -> transformers.PretrainedConfig:
    """A small random config of a real transformers architecture."""
    if arch not in SAMPLE_ARCHITECTURES:
        raise ValueError(f"unknown sample architecture {arch!r}; choose from {', '.join(SAMPLE_ARCHITECTURES)}")
    kwargs: dict[str, Any] = {**_TINY, "vocab_size": vocab_size, "bos_token_id": 0, "eos_token_id": 0, **overrides}
    if arch in ("qwen3", "gemma"):
        kwargs.setdefault("head_dim", kwargs["hidden_size"] // kwargs["num_attention_heads"])
    if arch == "phi3":
        kwargs.setdefault("pad_token_id", 0)
    config = transformers.AutoConfig.for_model(arch, **kwargs)
    return config


def quantize_config(nbits: float = 4, group_size: int = 32, axis: int = 1, view_as_float: bool = False) -> dict:
    return BaseQuantizeConfig(nbits=nbits, group_size=group_size, axis=axis, view_as_float=view_as_float)


def build_sample_model(
    arch: str = "llama",
    *,
    nbits: float = 4,
    group_size: int = 32,
    axis: int = 1,
    compute_dtype: torch.dtype = torch.float32,
    quant_config: dict | None = None,
    vocab_size: int | None = None,
    seed: int = 0,
    **config_overrides: Any,
) -> torch.nn.Module:
    """A tiny random `arch` causal LM with every decoder linear replaced by hqq's HQQLinear (on CPU).

    `quant_config` may map linear tags (e.g. "mlp.down_proj") to configs, as hqq's quantize_model accepts.
    """
    torch.manual_seed(seed)
    config = tiny_config(arch, vocab_size or build_tokenizer().vocab_size, **config_overrides)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    config_for_hqq = quant_config or quantize_config(nbits, group_size, axis)
    AutoHQQHFModel.quantize_model(model, quant_config=config_for_hqq, compute_dtype=compute_dtype, device="cpu")
    return model


def save_hqq_pickle(model: torch.nn.Module, folder: Path, tokenizer: Any | None = None) -> Path:
    """Save with hqq's own `save_quantized` (config.json + qmodel.pt)."""
    folder.mkdir(parents=True, exist_ok=True)
    AutoHQQHFModel.save_quantized(model, str(folder))
    for module in model.modules():  # save_quantized switches encoding off; later safetensors saves need it
        if isinstance(module, HQQLinear):
            module.encoded_state_dict = True
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def save_hqq_safetensors(model: torch.nn.Module, folder: Path, tokenizer: Any | None = None, *, shards: int = 1) -> Path:
    """Save hqq's encoded state dict (the transformers 4.x / `save_to_safetensors` key layout).

    hqq's own `save_to_safetensors` cannot save tied embeddings, so the file is written here from
    `model.state_dict()`, which HQQLinear encodes itself; tied weights are stored once, as transformers does.
    `shards > 1` writes `model-0000i-of-0000n.safetensors` files plus `model.safetensors.index.json`.
    """
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    keys = sorted(state)
    if shards == 1:
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map: dict[str, str] = {}
        for index in range(shards):
            name = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
            part = {key: state[key] for key in keys[index::shards]}
            save_file(part, str(folder / name), metadata={"format": "pt"})
            weight_map.update({key: name for key in part})
        total = sum(t.numel() * t.element_size() for t in state.values())
        index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2))
    config = model.config.to_dict()
    config["architectures"] = [type(model).__name__]
    config["quantization_config"] = {"quant_method": "hqq", "skip_modules": ["lm_head"]}
    (folder / "config.json").write_text(json.dumps(config, indent=2, default=str))
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder

"""Reader for a live PyTorch model whose linears are hqq `HQQLinear` (also inside PEFT wrappers).

This is the notebook path right after training: nothing is saved, the modules are read where they are.
"""

from __future__ import annotations

import torch
from hqq.core.quantize import HQQLinear

from hqexport.errors import HQExportError
from hqexport.model import Provenance, QuantizedLinear, QuantizedModel
from hqexport.read.meta import layer_from_meta

_PEFT_PREFIX = "base_model.model."


def _unwrap_peft(model: torch.nn.Module) -> torch.nn.Module:
    """PeftModel -> the transformers model it wraps, LoRA layers still in place."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _module_name(name: str) -> str:
    """Strip PEFT's wrapper names so paths match the saved checkpoint (".base_layer" of a LoRA layer)."""
    if name.startswith(_PEFT_PREFIX):
        name = name[len(_PEFT_PREFIX) :]
    return name.replace(".base_layer", "")


def read_live_model(model: torch.nn.Module) -> QuantizedModel:
    """Read an in-memory model quantized with hqq into a QuantizedModel."""
    model = _unwrap_peft(model)
    config = getattr(model, "config", None)
    if config is None:
        raise HQExportError("the live model has no Hugging Face `config`; pass a transformers model")
    linears: dict[str, QuantizedLinear] = {}
    quantized_prefixes: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, HQQLinear):
            path = _module_name(name)
            if not module.ready:
                raise HQExportError(f"HQQLinear {path} is not quantized yet")
            linears[path] = layer_from_meta(path, module.W_q.data, module.meta, module.bias)
            quantized_prefixes.append(name + ".")
    if not linears:
        raise HQExportError("the live model has no hqq HQQLinear layers")

    tensors: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict(keep_vars=False).items():
        if any(key.startswith(prefix) for prefix in quantized_prefixes) or "lora_" in key:
            continue
        tensors[_module_name(key)] = value.detach()
    config_dict = config.to_dict()
    if not config_dict.get("architectures"):  # set by save_pretrained; a model built from a config lacks it
        config_dict["architectures"] = [type(model).__name__]
    return QuantizedModel(
        config=config_dict,
        linears=linears,
        tensors=tensors,
        tokenizer_files=[],
        provenance=Provenance(kind="live", path=None),
        skipped_modules=_fp_linears(model, set(linears)),
    )


def _fp_linears(model: torch.nn.Module, quantized: set[str]) -> list[str]:
    """nn.Linear modules left in floating point, in model order (as the on-disk readers list them)."""
    return [
        _module_name(name)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and _module_name(name) not in quantized and "lora_" not in name
    ]

"""QuantizedModel -> the transformers causal LM it came from, fp parts loaded, HQQ linears as hqexport op modules.

The model skeleton is built with empty (meta) parameters, so no full-size fp weight of a quantized layer is ever
allocated; buffers such as rotary frequencies are computed for real by the model's own constructor.

`rebuild_deferred` goes further for convert: the packed codes stay on the meta device and the large fp tensors
are one broadcast zero (torch.onnx only needs their shapes; the traced embedding lookup needs a CPU tensor), and a
loader per state-dict name produces each one's data when the ONNX file is written, one tensor at a time, so the
whole model is never held in memory twice.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from accelerate import init_empty_weights

from hqexport.errors import HQExportError, UnsupportedModelError
from hqexport.export.quant_linear import HQQMatMulLinear
from hqexport.model import QuantizedModel
from hqexport.ops.torch_op import canonical_weight

#: transformers model_type -> causal LM class, the architectures convert is tested on
SUPPORTED_MODEL_TYPES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "gemma": "GemmaForCausalLM",
}

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16}

#: config keys that describe the checkpoint, not the architecture
_CHECKPOINT_KEYS = ("quantization_config", "torch_dtype", "dtype", "_name_or_path", "transformers_version")
#: a deferred rebuild leaves fp tensors of at least this many elements without data (smaller ones cost less than a loader)
DEFER_MIN_ELEMENTS = 1024

#: state-dict name -> a function producing that tensor's data (as written to the ONNX file)
Loaders = dict[str, Callable[[], np.ndarray]]


def supported_list() -> str:
    return ", ".join(f"{cls} ({key})" for key, cls in SUPPORTED_MODEL_TYPES.items())


def model_config(qmodel: QuantizedModel) -> transformers.PretrainedConfig:
    """The transformers config of a supported architecture, without the checkpoint's quantization settings."""
    config_file = _config_file(qmodel)
    if qmodel.config.get("auto_map"):
        raise UnsupportedModelError(
            f"asks for custom model code (auto_map {json.dumps(qmodel.config['auto_map'], default=str)[:200]}); "
            "hqexport never runs code from a model folder (trust_remote_code) and has no option to allow it: "
            f"only transformers' built-in architectures are converted ({supported_list()})",
            config_file,
        )
    model_type = qmodel.config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"architecture {qmodel.architecture} (model_type {model_type!r}) is not supported; "
            f"supported: {supported_list()}",
            config_file,
        )
    values: dict[str, Any] = {k: v for k, v in qmodel.config.items() if k not in _CHECKPOINT_KEYS}
    try:
        config = transformers.AutoConfig.for_model(**values)
    except Exception as error:  # noqa: BLE001 - transformers and huggingface_hub raise many types for bad values
        raise _invalid_config(qmodel, error) from None
    if "lm_head" in qmodel.linears:  # a quantized head cannot share the fp embedding matrix
        config.tie_word_embeddings = False
    return config


def _config_file(qmodel: QuantizedModel) -> Path | None:
    """The source's config.json, named in errors (None for a live model)."""
    return qmodel.provenance.path / "config.json" if qmodel.provenance.path is not None else None


def _invalid_config(qmodel: QuantizedModel, error: Exception) -> HQExportError:
    reason = " ".join(f"{type(error).__name__}: {error}".split())  # one line, whatever transformers wrote
    return HQExportError(f"transformers cannot build {qmodel.architecture} from it ({reason[:300]})", _config_file(qmodel))


def _install_linears(model: torch.nn.Module, qmodel: QuantizedModel, act_dtype: torch.dtype, defer: bool) -> None:
    for path, layer in qmodel.linears.items():
        parent_path, _, child = path.rpartition(".")
        try:
            parent = model.get_submodule(parent_path)
            current = getattr(parent, child)
        except AttributeError:
            raise HQExportError(f"quantized layer {path} is not a module of {qmodel.architecture}", _config_file(qmodel)) from None
        if not isinstance(current, torch.nn.Linear) or (current.out_features, current.in_features) != layer.shape:
            raise HQExportError(
                f"quantized layer {path} has shape {list(layer.shape)}, but {qmodel.architecture} has "
                f"{type(current).__name__} {list(getattr(current, 'weight', torch.empty(0)).shape)} there",
                _config_file(qmodel),
            )
        setattr(parent, child, HQQMatMulLinear(layer, act_dtype, defer_weight=defer))


def _fp_state(qmodel: QuantizedModel, dtype: torch.dtype, defer: bool) -> dict[str, torch.Tensor]:
    """The fp tensors in `dtype`; with `defer`, the large ones as placeholders (`_placeholder`)."""
    state = {}
    for key, value in qmodel.tensors.items():
        if value.is_floating_point() and defer and value.numel() >= DEFER_MIN_ELEMENTS:
            state[key] = _placeholder(value.shape, dtype)
        else:
            state[key] = value.to(dtype) if value.is_floating_point() else value
    return state


def _placeholder(shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """A tensor of `shape` that holds one element (all strides 0): traceable on CPU, no memory, no data."""
    return torch.zeros((), dtype=dtype).expand(shape)


def is_placeholder(tensor: torch.Tensor) -> bool:
    """A meta tensor, or a `_placeholder`: a weight without data."""
    return tensor.is_meta or (tensor.numel() > 1 and not any(tensor.stride()))


def _load_fp_tensors(model: torch.nn.Module, qmodel: QuantizedModel, state: dict[str, torch.Tensor]) -> None:
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        raise HQExportError(
            f"the weights hold tensors {qmodel.architecture} does not have: {', '.join(result.unexpected_keys[:5])}",
            _config_file(qmodel),
        )
    if model.config.tie_word_embeddings:
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    missing = [name for name, param in model.named_parameters() if param.is_meta]
    if missing:
        raise HQExportError(f"the weights lack fp tensors {', '.join(missing[:5])} of {qmodel.architecture}", _config_file(qmodel))


def rebuild_model(qmodel: QuantizedModel, dtype: str = "fp32", attn_implementation: str = "sdpa") -> torch.nn.Module:
    """The causal LM with fp parts in `dtype` and every quantized linear an HQQMatMulLinear."""
    return _rebuild(qmodel, dtype, attn_implementation, defer=False)


def rebuild_deferred(qmodel: QuantizedModel, dtype: str = "fp32") -> tuple[torch.nn.Module, Loaders]:
    """The model for export only: packed codes and large fp tensors without data, plus their loaders.

    The loaders read `qmodel` when called, so it must stay alive (and unchanged) until the model is written.
    """
    model = _rebuild(qmodel, dtype, "sdpa", defer=True)
    torch_dtype = DTYPES[dtype]
    by_tensor: dict[int, Callable[[], np.ndarray]] = {}
    for path, layer in qmodel.linears.items():
        by_tensor[id(model.get_submodule(path).weight_packed)] = lambda layer=layer: canonical_weight(layer)
    named = model.state_dict(keep_vars=True)
    for key, value in qmodel.tensors.items():
        if key in named and is_placeholder(named[key]):
            by_tensor[id(named[key])] = lambda value=value: value.to(torch_dtype).numpy()
    loaders: Loaders = {}
    for name, tensor in named.items():  # a tied lm_head shares the embedding's tensor, and so its loader
        if id(tensor) in by_tensor:
            loaders[name] = by_tensor[id(tensor)]
    return model, loaders


def _rebuild(qmodel: QuantizedModel, dtype: str, attn_implementation: str, *, defer: bool) -> torch.nn.Module:
    torch_dtype = DTYPES[dtype]
    config = model_config(qmodel)
    try:
        with init_empty_weights(include_buffers=False):
            model = transformers.AutoModelForCausalLM.from_config(
                config, dtype=torch_dtype, attn_implementation=attn_implementation
            )
    except Exception as error:  # noqa: BLE001 - a config transformers accepted but cannot build a model from
        raise _invalid_config(qmodel, error) from None
    _install_linears(model, qmodel, torch_dtype, defer)
    _load_fp_tensors(model, qmodel, _fp_state(qmodel, torch_dtype, defer))
    return model.eval()

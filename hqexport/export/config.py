"""The transformers config of a source (checked: a supported family, no custom code) and the export's settings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import transformers

from hqexport.errors import HQExportError, UnsupportedModelError
from hqexport.export.architectures import ARCHITECTURES
from hqexport.model import QuantizedModel
from hqexport.ops.function import MAX_OPSET, MIN_OPSET

DEFAULT_OPSET = 20
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16}

#: config keys that describe the checkpoint, not the architecture
_CHECKPOINT_KEYS = ("quantization_config", "torch_dtype", "dtype", "_name_or_path", "transformers_version")


def check_opset(opset: int) -> None:
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise HQExportError(f"--opset {opset} is not supported; choose {MIN_OPSET}..{MAX_OPSET}")


def supported_list() -> str:
    return ", ".join(f"{arch.causal_lm} ({key})" for key, arch in ARCHITECTURES.items())


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
    if model_type not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"architecture {qmodel.architecture} (model_type {model_type!r}) is not supported; supported: {supported_list()}",
            config_file,
        )
    values: dict[str, Any] = {k: v for k, v in qmodel.config.items() if k not in _CHECKPOINT_KEYS}
    try:
        config = transformers.AutoConfig.for_model(**values)
    except Exception as error:  # transformers and huggingface_hub raise many types for bad values
        reason = " ".join(f"{type(error).__name__}: {error}".split())  # one line, whatever transformers wrote
        raise HQExportError(f"transformers cannot build {qmodel.architecture} from it ({reason[:300]})", config_file) from None
    if "lm_head" in qmodel.linears:  # a quantized head cannot share the fp embedding matrix
        config.tie_word_embeddings = False
    if not config.architectures:
        config.architectures = [ARCHITECTURES[model_type].causal_lm]
    return config


def check_weights(qmodel: QuantizedModel, config: transformers.PretrainedConfig) -> None:
    """Every tensor and quantized layer of the source is one the architecture has, with its shape, and none lacks.

    The shapes come from the transformers model built on the meta device (no memory, no data).
    """
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    modules = dict(model.named_modules())
    arch = qmodel.architecture
    for path, layer in qmodel.linears.items():
        shape = expected.get(f"{path}.weight")
        if shape != layer.shape:
            module = modules.get(path)
            there = f"{type(module).__name__} {list(shape)}" if module is not None and shape is not None else "no linear"
            raise HQExportError(
                f"quantized layer {path} has shape {list(layer.shape)}, but {arch} has {there} there", _config_file(qmodel)
            )
    unexpected = [key for key, tensor in qmodel.tensors.items() if expected.get(key) != tuple(tensor.shape)]
    if unexpected:
        raise HQExportError(f"the weights hold tensors {arch} does not have: {', '.join(unexpected[:5])}", _config_file(qmodel))
    provided = set(qmodel.tensors) | {f"{path}.{kind}" for path, layer in qmodel.linears.items() for kind in ("weight", "bias")}
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing = [name for name, _ in model.named_parameters() if name not in provided and name not in tied]
    if missing:
        raise HQExportError(f"the weights lack fp tensors {', '.join(missing[:5])} of {arch}", _config_file(qmodel))


def _config_file(qmodel: QuantizedModel) -> Path | None:
    """The source's config.json, named in errors (None for a live model)."""
    return qmodel.provenance.path / "config.json" if qmodel.provenance.path is not None else None

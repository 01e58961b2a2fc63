"""adapter_model.safetensors (never a pickle): reading the LoRA factors and binding them to the base's HQQ layers."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from hqexport.adapters.arguments import check_adapter_name, find_adapter_folders, parse_adapter_argument
from hqexport.adapters.peft_config import check_base_model, module_scaling, read_adapter_config, targeted_modules
from hqexport.adapters.spec import AdapterSpec, LoraModuleWeights
from hqexport.errors import HQExportError

WEIGHTS_FILE = "adapter_model.safetensors"
_KEY_PREFIX = "base_model.model."


def _load_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = Path(folder) / WEIGHTS_FILE
    if not file.is_file():
        if (Path(folder) / "adapter_model.bin").is_file():
            raise HQExportError(f"adapter_model.bin is a pickle; save the adapter as {WEIGHTS_FILE}", folder)
        raise HQExportError(f"missing {WEIGHTS_FILE}", folder)
    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as err:
        raise HQExportError(f"cannot read: {err}", file) from None


def split_weight_key(key: str, file: Path) -> tuple[str, str]:
    """'base_model.model.X.lora_A.weight' -> ('X', 'lora_A'); refuses embedding LoRA and other trained tensors."""
    body = key[len(_KEY_PREFIX) :] if key.startswith(_KEY_PREFIX) else key
    for suffix, kind in (
        (".lora_A.weight", "lora_A"),
        (".lora_B.weight", "lora_B"),
        (".lora_magnitude_vector.weight", "magnitude"),
        (".lora_magnitude_vector", "magnitude"),
    ):
        if body.endswith(suffix):
            return body[: -len(suffix)], kind
    if "lora_embedding_" in body:
        raise HQExportError(f"embedding LoRA ({key}) is not supported", file)
    raise HQExportError(f"tensor {key} is not a LoRA factor (modules_to_save / trained bias?): not supported", file)


def load_adapter(
    folder: Path, name: str, base_layers: Mapping[str, Sequence[int]], other_modules: Iterable[str] = ()
) -> AdapterSpec:
    """Read one adapter folder and bind it to the base: `base_layers` maps HQQ linear paths to [out, in].

    `other_modules` are the base's non-HQQ module paths (fp linears such as lm_head, embeddings): LoRA on them is
    refused with a message that says so, rather than as an unknown module.
    """
    folder = Path(folder)
    check_adapter_name(name, folder)
    config = read_adapter_config(folder)
    file = folder / WEIGHTS_FILE
    tensors = _load_weights(folder)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        module, kind = split_weight_key(key, file)
        parts.setdefault(module, {})[kind] = tensor
    other = set(other_modules)
    for module in sorted(parts):
        if module not in base_layers:
            if "embed" in module.rsplit(".", 1)[-1]:
                raise HQExportError(f"embedding LoRA ({module}) is not supported", file)
            if module in other:
                raise HQExportError(f"LoRA on {module}, which is not an HQQ-quantized linear, is not supported", file)
            raise HQExportError(f"unknown target module {module}: the base model has no HQQ linear of that name", file)
    expected = targeted_modules(config, base_layers)
    missing = sorted(expected - set(parts))
    if missing:
        raise HQExportError(f"no weights for targeted module {missing[0]} ({len(missing)} missing)", file)
    if not parts:
        raise HQExportError("holds no LoRA weights", file)
    spec = AdapterSpec(name=name, path=folder.resolve(), config=config)
    for module in sorted(parts):
        spec.modules[module] = _module_weights(config, module, parts[module], tuple(base_layers[module]), file)
    return spec


def _module_weights(
    config: Mapping[str, Any], module: str, part: Mapping[str, torch.Tensor], shape: tuple[int, ...], file: Path
) -> LoraModuleWeights:
    if "lora_A" not in part or "lora_B" not in part:
        raise HQExportError(f"module {module} lacks {'lora_A' if 'lora_A' not in part else 'lora_B'}", file)
    lora_A, lora_B = part["lora_A"], part["lora_B"]
    out_features, in_features = (int(d) for d in shape)
    rank, alpha, scaling = module_scaling(config, module)
    if lora_A.ndim != 2 or lora_B.ndim != 2:
        raise HQExportError(f"module {module}: LoRA factors must be matrices", file)
    if tuple(lora_A.shape) != (rank, in_features) or tuple(lora_B.shape) != (out_features, rank):
        raise HQExportError(
            f"module {module}: lora_A {list(lora_A.shape)} / lora_B {list(lora_B.shape)} do not fit the base layer "
            f"[{out_features}, {in_features}] at rank {rank}: adapter trained on another base model?",
            file,
        )
    magnitude = part.get("magnitude")
    if bool(config.get("use_dora")) != (magnitude is not None):
        raise HQExportError(
            f"module {module}: use_dora={bool(config.get('use_dora'))} but the magnitude vector is "
            f"{'present' if magnitude is not None else 'missing'}",
            file,
        )
    if magnitude is not None and tuple(magnitude.shape) != (out_features,):
        raise HQExportError(f"module {module}: DoRA magnitude {list(magnitude.shape)} does not fit {out_features} outputs", file)
    for label, tensor in (("lora_A", lora_A), ("lora_B", lora_B), ("magnitude", magnitude)):
        if tensor is not None and not torch.isfinite(tensor.float()).all():
            raise HQExportError(f"module {module}: {label} contains NaN or Inf", file)
    return LoraModuleWeights(module, rank, alpha, scaling, lora_A, lora_B, magnitude)


def load_adapters(
    arguments: Sequence[str],
    base_layers: Mapping[str, Sequence[int]],
    other_modules: Iterable[str] = (),
    source_config: Mapping[str, Any] | None = None,
) -> list[AdapterSpec]:
    """All `--adapter [NAME=]PATH` arguments, bound to the base; adapter names must be unique.

    With `source_config` (the source's config.json), each adapter's base_model_name_or_path is checked too.
    """
    specs: list[AdapterSpec] = []
    seen: dict[str, Path] = {}
    for argument in arguments:
        name, path = parse_adapter_argument(argument)
        for adapter_name, folder in find_adapter_folders(path, name):
            if adapter_name in seen:
                raise HQExportError(
                    f"adapter name {adapter_name!r} is used twice ({seen[adapter_name]} and {folder}); "
                    "name them with --adapter NAME=PATH"
                )
            seen[adapter_name] = folder
            spec = load_adapter(folder, adapter_name, base_layers, other_modules)
            if source_config is not None:
                check_base_model(spec, source_config)
            specs.append(spec)
    return specs

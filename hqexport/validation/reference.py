"""The PyTorch reference: the source checkpoint rebuilt with transformers and hqq's own `HQQLinear` layers.

Deliberately independent of hqexport's readers and export modules, so that a bug there cannot hide on both
sides of a comparison. Only hqq and transformers decode the checkpoint:

- the transformers model is built from `config.json` in float32 (its rotary buffers computed from the config);
- every module with `W_q` becomes `HQQLinear(None, None, compute_dtype, device="cpu", initialize=False)` and
  receives its state through hqq's `HQQLinear.load_state_dict` (raw meta for hqq pickles, hqq's encoded form
  for safetensors); every other tensor is loaded into the model and upcast to float32.

hqq's `AutoHQQHFModel.from_quantized` is not used because it forces one compute dtype on every layer and casts
every other module *and the rotary buffers* to it, which would not be the model the export computes.

Activations run in float32. A layer whose compute dtype is fp16/bf16 dequantizes in that dtype exactly as hqq
does (`HQQLinear.dequantize()`), then the weight is cast to the activation dtype before the matmul — the same
`Wd = w.astype(A.dtype)` step as the hqexport op. For float32 layers this equals hqq's own forward.
"""

from __future__ import annotations

import json
import types
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from hqq.core.quantize import HQQLinear

from hqexport.errors import HQExportError

PICKLE_FILE = "qmodel.pt"
_SAFETENSORS_INDEX = "model.safetensors.index.json"
#: dtype names hqq may store as strings; anything else is refused before hqq's decoder (which eval()s them) sees it
_DTYPE_NAMES = {
    "torch.float32": torch.float32,
    "torch.float16": torch.float16,
    "torch.bfloat16": torch.bfloat16,
    "torch.uint8": torch.uint8,
    "torch.int32": torch.int32,
    "torch.int8": torch.int8,
}


@dataclass
class Reference:
    """The rebuilt model and what the checks need to know about it."""

    model: torch.nn.Module  # transformers *ForCausalLM, eval mode, float32 activations
    hqq_layers: dict[str, HQQLinear]  # module path -> hqq layer
    blocks: list[torch.nn.Module]  # the decoder layers, in order
    blocks_path: str  # module path of the decoder layer list, e.g. "model.layers"
    source: Path
    kind: str  # "hqq-pickle" or "hqq-safetensors"


def source_kind(folder: Path) -> str:
    """'hqq-pickle' or 'hqq-safetensors'; HQExportError for anything else."""
    if not folder.is_dir():
        raise HQExportError("reference source folder not found", folder)
    if not (folder / "config.json").is_file():
        raise HQExportError("reference source has no config.json", folder)
    if (folder / PICKLE_FILE).is_file():
        return "hqq-pickle"
    if list(folder.glob("*.safetensors")):
        return "hqq-safetensors"
    raise HQExportError("reference source holds neither qmodel.pt nor .safetensors files", folder)


def load_reference(folder: Path) -> Reference:
    """Rebuild the source model at `folder` (hqq pickle or HQQ safetensors) on CPU."""
    folder = Path(folder)
    kind = source_kind(folder)
    modules = _pickle_modules(folder) if kind == "hqq-pickle" else _safetensors_modules(folder)
    model = _skeleton(folder)
    hqq_states = {name: state for name, state in modules.items() if "W_q" in state}
    if not hqq_states:
        raise HQExportError("the reference source has no HQQ layers (no W_q)", folder)
    fp_state = {
        f"{name}.{key}": value for name, state in modules.items() if name not in hqq_states for key, value in state.items()
    }
    _load_fp_tensors(model, fp_state, set(hqq_states), folder)
    hqq_layers = {name: _install_hqq_layer(model, name, state, folder) for name, state in hqq_states.items()}
    model.eval()
    blocks_path, blocks = _decoder_blocks(model, folder)
    return Reference(model, hqq_layers, blocks, blocks_path, folder, kind)


def _skeleton(folder: Path) -> torch.nn.Module:
    config_dict = json.loads((folder / "config.json").read_text())
    config_dict.pop("quantization_config", None)  # transformers 5 would build random weights for it anyway
    model_type = config_dict.pop("model_type", None)
    if model_type is None:
        raise HQExportError("config.json has no model_type", folder / "config.json")
    try:
        config = transformers.AutoConfig.for_model(model_type, **config_dict)
        return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except (ValueError, KeyError) as error:
        raise HQExportError(f"transformers cannot build this model: {error}", folder / "config.json") from None


def _pickle_modules(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    """hqq's save_quantized file: {module path: state dict}; loaded without unpickling code."""
    try:
        weights = torch.load(folder / PICKLE_FILE, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many kinds for a bad file
        raise HQExportError(f"cannot load hqq weights: {error}", folder / PICKLE_FILE) from None
    if not isinstance(weights, dict):
        raise HQExportError("is not an hqq save_quantized file (expected a dict of modules)", folder / PICKLE_FILE)
    return weights


def _safetensors_modules(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Flat safetensors keys grouped per module: HQQ layers get all their keys, others their parameters."""
    from safetensors.torch import load_file

    index = folder / _SAFETENSORS_INDEX
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    flat: dict[str, torch.Tensor] = {}
    for name in files:
        flat.update(load_file(str(folder / name), device="cpu"))
    hqq_prefixes = {key[: -len(".W_q")] for key in flat if key.endswith(".W_q")}
    modules: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, value in flat.items():
        owner = next((p for p in _prefixes(key) if p in hqq_prefixes), None)
        if owner is None:
            owner, _, leaf = key.rpartition(".")
        else:
            leaf = key[len(owner) + 1 :]
        modules[owner][leaf] = value
    return dict(modules)


def _prefixes(key: str) -> list[str]:
    parts = key.split(".")
    return [".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]


def _stored_dtype(value: object, what: str, folder: Path) -> torch.dtype:
    """A dtype hqq stored as a torch.dtype (pickle) or ASCII bytes (safetensors), checked against a whitelist."""
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.dim() == 1:
        name = bytes(value.tolist()).decode("ascii", errors="replace")
        if name in _DTYPE_NAMES:
            return _DTYPE_NAMES[name]
    raise HQExportError(f"{what} is not a torch dtype name hqq writes", folder)


def _install_hqq_layer(model: torch.nn.Module, name: str, state: dict, folder: Path) -> HQQLinear:
    state = dict(state)
    if "compute_dtype" not in state:
        raise HQExportError(f"HQQ layer {name} stores no compute_dtype", folder)
    compute_dtype = _stored_dtype(state["compute_dtype"], f"layer {name} compute_dtype", folder)
    if "unpack_view_dtype" in state:
        _stored_dtype(state["unpack_view_dtype"], f"layer {name} unpack_view_dtype", folder)
    layer = HQQLinear(None, None, compute_dtype=compute_dtype, device="cpu", initialize=False)
    try:
        layer.load_state_dict(state)
    except Exception as error:  # hqq raises bare exceptions for bad states
        raise HQExportError(f"hqq cannot load layer {name}: {error}", folder) from None
    use_activation_dtype(layer)
    parent_name, _, child = name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name)
    except AttributeError:
        raise HQExportError(f"HQQ layer {name} has no place in the {type(model).__name__} built from config.json", folder) from None
    if not isinstance(getattr(parent, child, None), torch.nn.Linear):
        raise HQExportError(f"HQQ layer {name} does not replace an nn.Linear of {type(model).__name__}", folder)
    setattr(parent, child, layer)
    return layer


def use_activation_dtype(layer: HQQLinear) -> None:
    """Make `layer` compute as the hqexport op does: hqq's dequantize(), cast to the input's dtype, matmul."""
    layer.forward = types.MethodType(_forward_in_activation_dtype, layer)


def _forward_in_activation_dtype(self: HQQLinear, x: torch.Tensor) -> torch.Tensor:
    """hqq's dequantize() in the layer's compute dtype, cast to the activation dtype, then the matmul."""
    out = torch.matmul(x, self.dequantize().to(x.dtype).t())
    if self.bias is not None:
        out = out + self.bias.to(x.dtype)
    return out


def _load_fp_tensors(model: torch.nn.Module, state: dict[str, torch.Tensor], hqq_names: set[str], folder: Path) -> None:
    expected = model.state_dict()
    unknown = sorted(key for key in state if key not in expected)
    if unknown:
        raise HQExportError(f"tensors {', '.join(unknown[:5])} do not belong to the model built from config.json", folder)
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise HQExportError(f"tensor {key} has shape {list(value.shape)}, the model expects {list(expected[key].shape)}", folder)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False, assign=False)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    missing = sorted(
        key
        for key in expected
        if key not in state and key not in tied and not any(key.startswith(name + ".") for name in hqq_names)
    )
    if missing:
        raise HQExportError(f"the source lacks tensors {', '.join(missing[:5])}", folder)


def _decoder_blocks(model: torch.nn.Module, folder: Path) -> tuple[str, list[torch.nn.Module]]:
    """The ModuleList of decoder layers (the largest ModuleList whose path ends in 'layers')."""
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.ModuleList) and name.split(".")[-1] in ("layers", "h", "blocks")
    ]
    if not candidates:
        raise HQExportError(f"cannot find the decoder layers of {type(model).__name__}", folder)
    name, blocks = max(candidates, key=lambda item: len(item[1]))
    return name, list(blocks)

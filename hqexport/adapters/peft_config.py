"""PEFT LoRA adapter folders -> typed AdapterSpec, with PEFT's own targeting and scaling rules (peft 0.21).

What is read: `adapter_config.json` + `adapter_model.safetensors` (never a pickle). What PEFT does and we copy:
- target_modules: a str is `re.fullmatch`ed against the module path; a list matches a path equal to an entry or
  ending in ".entry"; `layers_to_transform` (+ `layers_pattern`) then keeps only the listed layer indices;
  `exclude_modules` removes matches. PEFT's "all-linear" finds no hqq layer (HQQLinear is not an nn.Linear), so
  here it means every HQQ linear of the base (the lm_head excluded, as PEFT does).
- rank_pattern / alpha_pattern: the first key k (in file order) with re.match(rf"(.*\\.)?({k})$", path) wins.
- scaling = alpha / r, or alpha / sqrt(r) with use_rslora.
Everything else that changes the math is refused by name.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hqexport.errors import HQExportError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_KEY_PREFIX = "base_model.model."
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")

#: Config entries that change what the adapter computes and that we do not implement: refused when set.
_REFUSED_OPTIONS = {
    "modules_to_save": "modules_to_save (fully trained copies of modules)",
    "target_parameters": "target_parameters (LoRA on raw parameters)",
    "trainable_token_indices": "trainable_token_indices (trained embedding rows)",
    "layer_replication": "layer_replication",
    "lora_bias": "lora_bias (a bias on lora_B)",
    "use_qalora": "use_qalora (QALoRA)",
    "use_bdlora": "use_bdlora (block-diagonal LoRA)",
    "alora_invocation_tokens": "alora_invocation_tokens (activated LoRA)",
    "arrow_config": "arrow_config (Arrow routing)",
    "velora_config": "velora_config (VeLoRA)",
    "megatron_config": "megatron_config",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D weights; HQQ layers are Linear)",
}
#: init_lora_weights values that leave the base weights untouched (others, e.g. PiSSA or LoftQ, rewrite the base).
_BASE_PRESERVING_INITS = {"true", "false", "gaussian", "eva", "orthogonal"}


@dataclass(frozen=True)
class LoraModuleWeights:
    """The LoRA factors of one target module, as PEFT stores them (lora_A [r, in], lora_B [out, r])."""

    module: str
    rank: int
    alpha: float
    scaling: float
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    magnitude: torch.Tensor | None = None  # DoRA's lora_magnitude_vector [out]

    def delta(self) -> torch.Tensor:
        """ΔW = (B @ A) * scaling, computed as PEFT's HqqLoraLinear.get_delta_weight does."""
        return (self.lora_B @ self.lora_A) * self.scaling


@dataclass
class AdapterSpec:
    """One LoRA adapter bound to a base model: its config and the weights of every module it targets."""

    name: str
    path: Path
    config: dict[str, Any]
    modules: dict[str, LoraModuleWeights] = field(default_factory=dict)

    @property
    def use_dora(self) -> bool:
        return bool(self.config.get("use_dora"))

    @property
    def base_model_name_or_path(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    def summary(self) -> dict[str, Any]:
        """What the manifest and `inspect` show."""
        return {
            "source": str(self.path),
            "peft_type": self.config.get("peft_type", "LORA"),
            "r": self.config.get("r"),
            "lora_alpha": self.config.get("lora_alpha"),
            "use_rslora": bool(self.config.get("use_rslora")),
            "use_dora": self.use_dora,
            "base_model_name_or_path": self.base_model_name_or_path,
            "targets": {
                name: {"r": m.rank, "alpha": m.alpha, "scaling": m.scaling, "shape": [m.lora_B.shape[0], m.lora_A.shape[1]]}
                for name, m in sorted(self.modules.items())
            },
        }


def check_adapter_name(name: str, where: str | Path | None = None) -> str:
    """Adapter names become file names (adapters/NAME.onnx_adapter): no separators, no '..', no leading dot."""
    if not _NAME_RE.fullmatch(name) or ".." in name:
        raise HQExportError(
            f"adapter name {name!r} is not allowed: use letters, digits, '_', '-' and '.', not starting with '.', "
            "without '..' or path separators",
            where,
        )
    return name


def parse_adapter_argument(value: str) -> tuple[str | None, Path]:
    """`--adapter [NAME=]PATH` -> (NAME or None, PATH)."""
    name, sep, path = value.partition("=")
    if not sep:
        return None, Path(value)
    if not path:
        raise HQExportError(f"--adapter {value!r}: nothing after '='; expected NAME=PATH")
    return check_adapter_name(name), Path(path)


def find_adapter_folders(path: Path, name: str | None = None) -> list[tuple[str, Path]]:
    """The adapters under PATH: PATH itself and/or its sub-folders (PEFT saves non-default adapters there)."""
    path = Path(path)
    if not path.is_dir():
        raise HQExportError("adapter folder not found", path)
    found: list[tuple[str, Path]] = []
    if (path / CONFIG_FILE).is_file():
        found.append((name or path.resolve().name, path))
    for sub in sorted(p for p in path.iterdir() if p.is_dir() and (p / CONFIG_FILE).is_file()):
        found.append((sub.name, sub))
    if not found:
        raise HQExportError(f"no {CONFIG_FILE} here or in a sub-folder: not a PEFT adapter folder", path)
    if name is not None and len(found) > 1:
        listed = ", ".join(n for n, _ in found)
        raise HQExportError(f"holds several adapters ({listed}); drop NAME= and they keep these names", path)
    for adapter_name, folder in found:
        check_adapter_name(adapter_name, folder)
    return found


def read_adapter_config(folder: Path) -> dict[str, Any]:
    """adapter_config.json, with every unsupported feature refused by name."""
    file = Path(folder) / CONFIG_FILE
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HQExportError(f"missing {CONFIG_FILE}", folder) from None
    except (OSError, ValueError) as err:
        raise HQExportError(f"cannot read: {err}", file) from None
    if not isinstance(config, dict):
        raise HQExportError("is not a JSON object", file)
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise HQExportError(f"peft_type {peft_type} is not supported (only LORA)", file)
    for key, label in _REFUSED_OPTIONS.items():
        if config.get(key):
            raise HQExportError(f"{label} is not supported", file)
    if config.get("bias", "none") != "none":
        raise HQExportError(f"bias={config['bias']!r} (trained base biases) is not supported; only bias='none'", file)
    init = str(config.get("init_lora_weights", True)).lower()
    if init not in _BASE_PRESERVING_INITS:
        raise HQExportError(
            f"init_lora_weights={config['init_lora_weights']!r} rewrites the base weights; convert the adapter to "
            "plain LoRA first (PEFT's path_initial_model_for_weight_conversion)",
            file,
        )
    if config.get("target_modules") is None:
        raise HQExportError("target_modules is missing", file)
    _check_values(config, file)
    return config


def _positive(value: Any, *, integer: bool) -> bool:
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        return False
    return math.isfinite(value) and value > 0


def _compiles(pattern: str) -> bool:
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError):
        return False
    return True


def _names(value: Any, *, regex: bool) -> bool:
    """A string (a regular expression if `regex`) or a list of strings."""
    if isinstance(value, str):
        return not regex or _compiles(value)
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _check_values(config: Mapping[str, Any], file: Path) -> None:
    """The types and ranges PEFT's LoraConfig expects for the entries that decide targets and scaling."""
    problems = {
        "r": _positive(config.get("r"), integer=True) or "a positive integer",
        "lora_alpha": _positive(config.get("lora_alpha"), integer=False) or "a positive number",
        "target_modules": _names(config["target_modules"], regex=True) or "a regular expression or a list of names",
        "exclude_modules": config.get("exclude_modules") is None
        or _names(config["exclude_modules"], regex=True)
        or "a regular expression or a list of names",
        "layers_to_transform": config.get("layers_to_transform") is None
        or _index_list(config["layers_to_transform"])
        or "a layer index or a list of them",
        "layers_pattern": config.get("layers_pattern") is None
        or (_names(config["layers_pattern"], regex=False) and _patterns_compile(config["layers_pattern"]))
        or "a name or a list of names",
        "use_rslora": config.get("use_rslora") is None or isinstance(config["use_rslora"], bool) or "true or false",
        "use_dora": config.get("use_dora") is None or isinstance(config["use_dora"], bool) or "true or false",
    }
    for key, integer in (("rank_pattern", True), ("alpha_pattern", False)):
        patterns = config.get(key) or {}
        valid = isinstance(patterns, dict) and all(
            _compiles(rf"(.*\.)?({k})$") and _positive(v, integer=integer) for k, v in patterns.items()
        )
        problems[key] = valid or f"an object of module patterns -> positive {'integers' if integer else 'numbers'}"
    for key, verdict in problems.items():
        if verdict is not True:
            raise HQExportError(f"{key} must be {verdict}, got {json.dumps(config.get(key))[:80]}", file)


def _index_list(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


def _patterns_compile(patterns: str | list[str]) -> bool:
    """layers_pattern entries are pasted into a regular expression."""
    return all(_compiles(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.") for p in ([patterns] if isinstance(patterns, str) else patterns))


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


def matches_target(config: Mapping[str, Any], module: str) -> bool:
    """PEFT's check_target_module_exists for one module path (exclude_modules, list/regex, layers_to_transform)."""
    exclude = config.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, module):
                return False
        elif module in exclude or any(module.endswith(f".{e}") for e in exclude):
            return False
    targets = config["target_modules"]
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    if module in targets:
        return True
    if not any(module.endswith(f".{t}") for t in targets):
        return False
    layers = config.get("layers_to_transform")
    if layers is None or (isinstance(layers, list) and not layers):
        return True
    patterns = config.get("layers_pattern")
    match = None
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
    else:
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", module)
            if match:
                break
    if match is None:
        return False
    index = int(match.group("idx"))
    return index == layers if isinstance(layers, int) else index in layers


def pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's get_pattern_key: the first key that matches a dotted suffix of the module path."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return default


def module_scaling(config: Mapping[str, Any], module: str) -> tuple[int, float, float]:
    """(r, alpha, scaling) of one module."""
    rank = int(pattern_value(config.get("rank_pattern") or {}, module, config["r"]))
    alpha = float(pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"]))
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return rank, alpha, scaling


def targeted_modules(config: Mapping[str, Any], base_layers: Iterable[str]) -> set[str]:
    targets = config["target_modules"]
    if isinstance(targets, str) and targets.lower() == "all-linear":
        return {m for m in base_layers if m != "lm_head"}
    return {m for m in base_layers if matches_target(config, m)}


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


_BASE_CONFIG_KEYS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
)


def check_base_model(spec: AdapterSpec, source_config: Mapping[str, Any]) -> None:
    """When base_model_name_or_path names a local folder with a config.json, its shape must match the source's.

    (Adapters are often trained against a copy or the fp original of the model: the path may differ, the shape
    may not. A hub id that does not resolve locally cannot be checked; the per-layer shapes still are.)
    """
    base = spec.base_model_name_or_path
    if not base:
        return
    candidates = [Path(base)] if Path(base).is_absolute() else [Path(base), spec.path / base]
    config_file = next((c / "config.json" for c in candidates if (c / "config.json").is_file()), None)
    if config_file is None:
        return
    try:
        base_config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    for key in _BASE_CONFIG_KEYS:
        if key in base_config and key in source_config and base_config[key] != source_config[key]:
            raise HQExportError(
                f"adapter {spec.name} was trained on {base} whose {key}={base_config[key]!r} differs from the "
                f"source's {source_config[key]!r}",
                spec.path / CONFIG_FILE,
            )

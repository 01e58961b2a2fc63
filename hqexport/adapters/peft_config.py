"""adapter_config.json: reading and checking it, with PEFT's own targeting and scaling rules (peft 0.21).

What PEFT does and we copy:
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
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from hqexport.adapters.spec import AdapterSpec
from hqexport.errors import HQExportError

CONFIG_FILE = "adapter_config.json"

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

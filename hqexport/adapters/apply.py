"""The adapter stage of `convert` for an exported graph: `separate` and `bake` (merge happens before export).

apply_adapters(model, layers, adapters, mode, ...) -> AdapterExport: the graph with LoRA
branches (graph.py) or with LoRA inside the layers' nodes (fused.py), the parameters of each
adapters/NAME.onnx_adapter (separate), and the manifest's "adapters" section.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import torch

from hqexport.adapters.fused import FuseLora, fused_groups, group_parameters, rank0_parameters
from hqexport.adapters.graph import Branch, InsertLoraBranches, dora_scale_name, lora_a_name, lora_b_name
from hqexport.adapters.onnx_adapter import check_adapter_fits, write_adapter_file
from hqexport.adapters.spec import AdapterSpec
from hqexport.adapters.values import dora_factor, lora_matmul_weights
from hqexport.errors import HQExportError
from hqexport.export.graph import LayerNode
from hqexport.files import ADAPTERS_DIR, adapter_file
from hqexport.model import QuantizedLinear

_DTYPES = {"fp32": (np.dtype(np.float32), torch.float32), "fp16": (np.dtype(np.float16), torch.float16)}


@dataclass
class AdapterExport:
    model: ir.Model
    manifest: dict[str, dict[str, Any]]
    files: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # separate: adapter -> parameters

    def write_files(self, folder: Path) -> dict[str, Path]:
        """Write adapters/NAME.onnx_adapter under `folder` (the output folder being assembled)."""
        target = Path(folder) / ADAPTERS_DIR
        if self.files:
            target.mkdir(parents=True, exist_ok=True)
        return {name: write_adapter_file(Path(folder) / adapter_file(name), params) for name, params in self.files.items()}


def rounded_in_fp16(spec: AdapterSpec) -> bool:
    """Whether storing the adapter's factors (as the nodes take them: lora_matmul_weights) in float16 changes any."""
    for weights in spec.modules.values():
        for factor in lora_matmul_weights(weights, np.dtype(np.float32)):
            if not np.array_equal(factor.astype(np.float16).astype(np.float32), factor):
                return True
    return False


def _check_targets(adapters: Sequence[AdapterSpec], layers: Mapping[str, LayerNode]) -> None:
    for spec in adapters:
        for module, weights in spec.modules.items():
            layer = layers.get(module)
            if layer is None:
                raise HQExportError(f"adapter {spec.name} targets {module}, which the exported model has no layer for")
            expected = [weights.lora_B.shape[0], weights.lora_A.shape[1]]
            if list(layer.shape) != expected:
                raise HQExportError(f"adapter {spec.name}: {module} is {list(layer.shape)} in the model, {expected} in the adapter")


def _module_values(
    spec: AdapterSpec, module: str, dora: bool, dtype: np.dtype, act_dtype: torch.dtype, base: Mapping[str, QuantizedLinear] | None
) -> dict[str, np.ndarray]:
    weights = spec.modules[module]
    a_t, b_t = lora_matmul_weights(weights, dtype)
    values = {lora_a_name(module): a_t, lora_b_name(module): b_t}
    if dora:
        if weights.magnitude is None:
            values[dora_scale_name(module)] = np.ones(weights.lora_B.shape[0], dtype)
        else:
            if base is None or module not in base:
                raise ValueError(f"DoRA needs the base layer {module} (pass base_linears)")
            values[dora_scale_name(module)] = dora_factor(base[module], weights, act_dtype).astype(dtype)
    return values


def apply_adapters(
    model: ir.Model,
    layers: Mapping[str, LayerNode],
    adapters: Sequence[AdapterSpec],
    mode: str,
    *,
    dtype: str = "fp32",
    base_linears: Mapping[str, QuantizedLinear] | None = None,
    fill_untouched: bool = True,
    fused: bool = False,
    factor_dtype: str = "fp32",
) -> AdapterExport:
    """Add LoRA branches to `model` for `separate` or `bake` (`model` is changed in place).

    layers: where each source layer is in `model` (export/graph.py), by module path; dtype: the activation dtype.
    base_linears: the source's HQQ layers, needed only for DoRA (its factor uses the dequantized weight).
    fill_untouched: in separate mode each adapter file also holds rank-0 factors for the branches it does not
    use, so activating it alone always means exactly that adapter (at the price of never combining adapters).
    fused: LoRA inside the targets' HQQMatMulNBits nodes (fused.py); otherwise a branch beside each target node (graph.py).
    factor_dtype: the factors' dtype inside the nodes (fused only; branches are fp32): fp32, fp16, or auto (fp16 when
    no adapter's factors round in it, else fp32). Each adapter's manifest entry records factor_dtype and
    factors_rounded; validate judges an adapter whose factors were rounded as lossy.
    """
    if mode not in ("separate", "bake"):
        raise HQExportError(f"--adapters {mode}: apply_adapters handles separate and bake (merge comes before export)")
    if not adapters:
        return AdapterExport(model=model, manifest={})
    if mode == "bake" and len(adapters) != 1:
        raise HQExportError(f"--adapters bake builds one model per adapter; got {len(adapters)} adapters")
    np_dtype, act_dtype = _DTYPES[dtype]
    _check_targets(adapters, layers)
    if factor_dtype == "fp16" and not fused:
        raise HQExportError(f"--adapter-dtype {factor_dtype} applies to LoRA inside the layers' nodes; these adapters need branches")

    dora_modules = {m for spec in adapters if spec.use_dora for m in spec.modules}
    modules = sorted({m for spec in adapters for m in spec.modules})
    if fused:
        if dora_modules:
            raise HQExportError("DoRA adapters need LoRA branches; they do not fuse into the layers' nodes")
        rounded = {spec.name: factor_dtype != "fp32" and rounded_in_fp16(spec) for spec in adapters}
        if factor_dtype == "auto":
            factor_dtype = "fp32" if any(rounded.values()) else "fp16"
        export = _apply_fused(model, layers, adapters, mode, modules, _DTYPES[factor_dtype][0], fill_untouched)
        for name, entry in export.manifest.items():
            entry["factor_dtype"] = factor_dtype
            entry["factors_rounded"] = factor_dtype == "fp16" and rounded[name]
        return export
    branches: dict[str, Branch] = {}
    for module in modules:
        n, k = layers[module].shape
        branch = Branch(module, in_features=k, out_features=n, dora=module in dora_modules)
        if mode == "bake":
            values = _module_values(adapters[0], module, branch.dora, np_dtype, act_dtype, base_linears)
            branch = Branch(
                module, k, n, branch.dora,
                lora_a_t=values[lora_a_name(module)],
                lora_b_t=values[lora_b_name(module)],
                dora_scale=values.get(dora_scale_name(module)),
            )
        branches[module] = branch
    InsertLoraBranches(layers, branches, dtype=np_dtype, overridable=mode == "separate")(model)

    def parameters(spec: AdapterSpec) -> dict[str, np.ndarray]:
        params: dict[str, np.ndarray] = {}
        for module, branch in branches.items():
            if module in spec.modules:
                params.update(_module_values(spec, module, branch.dora, np_dtype, act_dtype, base_linears))
            elif fill_untouched:
                params[lora_a_name(module)] = np.zeros((branch.in_features, 0), np_dtype)
                params[lora_b_name(module)] = np.zeros((0, branch.out_features), np_dtype)
        return params

    return _export(model, adapters, mode, parameters)


def _export(
    model: ir.Model, adapters: Sequence[AdapterSpec], mode: str, parameters: Callable[[AdapterSpec], dict[str, np.ndarray]]
) -> AdapterExport:
    """The AdapterExport of `model`: per adapter its manifest entry and, in separate mode, its file's parameters."""
    result = AdapterExport(model=model, manifest={})
    for spec in adapters:
        entry = {**spec.summary(), "mode": mode}
        if mode == "separate":
            params = parameters(spec)
            check_adapter_fits(model, params, adapter_file(spec.name))
            result.files[spec.name] = params
            entry["file"] = adapter_file(spec.name)
            entry["parameters"] = sorted(params)
        result.manifest[spec.name] = entry
    return result


def _apply_fused(
    model: ir.Model,
    layers: Mapping[str, LayerNode],
    adapters: Sequence[AdapterSpec],
    mode: str,
    modules: Sequence[str],
    dtype: np.dtype,
    fill_untouched: bool,
) -> AdapterExport:
    """apply_adapters with LoRA inside the nodes: one pair of parameters per adapted node (fused.py), of `dtype`."""
    groups = fused_groups(layers, modules)
    baked = None
    if mode == "bake":
        baked = {name: value for group in groups.values() for name, value in group_parameters(group, adapters[0], dtype).items()}
    FuseLora(groups, dtype=dtype, baked=baked)(model)

    def parameters(spec: AdapterSpec) -> dict[str, np.ndarray]:
        params: dict[str, np.ndarray] = {}
        for group in groups.values():
            values = group_parameters(group, spec, dtype)
            params.update(values if values is not None else rank0_parameters(group, dtype) if fill_untouched else {})
        return params

    return _export(model, adapters, mode, parameters)

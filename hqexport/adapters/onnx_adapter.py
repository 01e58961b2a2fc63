"""adapters/NAME.onnx_adapter files (onnxruntime's AdapterFormat) and the checks onnxruntime does not make.

onnxruntime applies an active adapter by name: a parameter the model lacks fails only at run time, and when two
active adapters carry the same name the first wins silently. `check_adapter_fits` and `check_no_overlap` catch
both before anything runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import helper

from hqexport.errors import HQExportError


def write_adapter_file(path: Path, params: Mapping[str, np.ndarray], *, adapter_version: int = 1, model_version: int = 1) -> Path:
    adapter = ort.AdapterFormat()
    adapter.set_adapter_version(adapter_version)
    adapter.set_model_version(model_version)
    adapter.set_parameters({name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for name, v in params.items()})
    adapter.export_adapter(str(path))
    return Path(path)


def read_adapter_file(path: Path) -> dict[str, np.ndarray]:
    """The parameters of an .onnx_adapter file, as numpy arrays."""
    if not Path(path).is_file():
        raise HQExportError("adapter file not found", path)
    try:
        adapter = ort.AdapterFormat.read_adapter(str(path))
    except Exception as err:  # onnxruntime raises its own untyped errors for a corrupt file
        raise HQExportError(f"not an onnxruntime adapter file: {err}", path) from None
    # copies: the arrays onnxruntime hands out may view the adapter's buffer, which goes with `adapter`
    return {name: np.array(value.numpy(), copy=True) for name, value in adapter.get_parameters().items()}


def overridable_inputs(model: onnx.ModelProto | ir.Model) -> dict[str, tuple[int, list[int | str]]]:
    """Graph inputs that also have an initializer: name -> (element type, shape with dim_params as str)."""
    if isinstance(model, ir.Model):
        return {
            v.name: (int(v.dtype), [d if isinstance(d, int) else str(d) for d in v.shape])
            for v in model.graph.inputs
            if v.is_initializer()
        }
    initializers = {t.name for t in model.graph.initializer}
    result = {}
    for value in model.graph.input:
        if value.name in initializers:
            dims = value.type.tensor_type.shape.dim
            shape = [d.dim_param if d.HasField("dim_param") else d.dim_value for d in dims]
            result[value.name] = (value.type.tensor_type.elem_type, shape)
    return result


def check_adapter_fits(model: onnx.ModelProto | ir.Model, params: Mapping[str, np.ndarray], where: str | Path) -> None:
    """Every parameter names an overridable initializer of the model, with its dtype and fixed dimensions."""
    inputs = overridable_inputs(model)
    for name, value in params.items():
        if name not in inputs:
            raise HQExportError(f"parameter {name} is not an overridable input of the model", where)
        elem_type, shape = inputs[name]
        if helper.np_dtype_to_tensor_dtype(value.dtype) != elem_type:
            expected = helper.tensor_dtype_to_np_dtype(elem_type)
            raise HQExportError(f"parameter {name} has dtype {value.dtype}, the model expects {expected}", where)
        if len(shape) != value.ndim or any(isinstance(d, int) and d and d != v for d, v in zip(shape, value.shape)):
            raise HQExportError(f"parameter {name} has shape {list(value.shape)}, the model expects {shape}", where)


def check_no_overlap(adapters: Mapping[str, Mapping[str, np.ndarray]]) -> None:
    """Adapters meant to be active together must not share a parameter name (onnxruntime keeps the first)."""
    owner: dict[str, str] = {}
    for adapter, params in adapters.items():
        for name in params:
            if name in owner:
                raise HQExportError(
                    f"adapters {owner[name]} and {adapter} both set {name}: onnxruntime would silently use only "
                    f"{owner[name]}'s; they cannot be active together"
                )
            owner[name] = adapter

"""The exported folder as validate sees it: manifest, graph structure, safe external data, adapters, source.

Every user mistake here (missing folder, no manifest, an external-data path leaving the folder, unknown adapter,
no reference source) is an HQExportError naming the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from hqexport.errors import HQExportError
from hqexport.files import MANIFEST_FILE, MODEL_FILE
from hqexport.manifest import LayerEntry, Manifest, read_manifest


@dataclass
class Exported:
    folder: Path
    manifest: Manifest
    graph: onnx.ModelProto  # structure only: external tensors are not loaded (read them with `initializer`)

    @property
    def model_path(self) -> Path:
        return self.folder / MODEL_FILE

    @property
    def dtype(self) -> str:
        return self.manifest.model.dtype

    @property
    def layers(self) -> dict[str, LayerEntry]:
        return self.manifest.layers

    @property
    def adapters(self) -> dict[str, dict[str, Any]]:
        return self.manifest.adapters

    def initializer(self, name: str) -> np.ndarray:
        """One initializer as numpy, reading only its bytes from external data."""
        tensor = self._initializers.get(name)
        if tensor is None:
            raise KeyError(name)
        return numpy_helper.to_array(tensor, base_dir=str(self.folder))

    def has_initializer(self, name: str) -> bool:
        return name in self._initializers

    def __post_init__(self) -> None:
        self._initializers = {tensor.name: tensor for tensor in self.graph.graph.initializer}


def open_exported(folder: Path) -> Exported:
    folder = Path(folder)
    if not folder.is_dir():
        raise HQExportError("exported folder not found", folder)
    manifest = read_manifest(folder)
    model_path = folder / MODEL_FILE
    if not model_path.is_file():
        raise HQExportError(f"has no {MODEL_FILE}", folder)
    try:
        graph = onnx.load(str(model_path), load_external_data=False)
    except Exception as error:  # protobuf raises DecodeError and others
        raise HQExportError(f"cannot be parsed as ONNX: {error}", model_path) from None
    check_external_data(graph, folder)
    return Exported(folder, manifest, graph)


def check_external_data(model: onnx.ModelProto, folder: Path) -> None:
    """Refuse external-data locations that are absolute or resolve outside `folder`."""
    root = folder.resolve()
    for tensor in _all_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((entry.value for entry in tensor.external_data if entry.key == "location"), None)
        if not location:
            raise HQExportError(f"tensor {tensor.name} has external data without a location", folder / MODEL_FILE)
        target = (root / location).resolve()
        if Path(location).is_absolute() or (target != root and root not in target.parents):
            raise HQExportError(
                f"tensor {tensor.name} points at external data {location!r} outside the model folder; refusing it",
                folder / MODEL_FILE,
            )


def _all_tensors(model: onnx.ModelProto):
    yield from model.graph.initializer
    for node in model.graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.TENSOR:
                yield attribute.t


def reference_source(exported: Exported, override: Path | None) -> Path:
    """--reference if given, else the source path recorded in the manifest (which must still exist)."""
    if override is not None:
        return Path(override)
    source = exported.manifest.source
    path = source.path
    if not path:
        raise HQExportError(
            f"the manifest records no source folder (kind {source.kind!r}); pass --reference SOURCE",
            exported.folder / MANIFEST_FILE,
        )
    if not Path(path).is_dir():
        raise HQExportError(
            f"the source folder {path} recorded in the manifest no longer exists; pass --reference SOURCE",
            exported.folder / MANIFEST_FILE,
        )
    return Path(path)


def selected_adapters(exported: Exported, adapter: str | None) -> list[str]:
    """Adapter names to check: none, one (must exist) or all."""
    if adapter is None:
        return []
    names = sorted(exported.adapters)
    if adapter == "all":
        return names
    if adapter not in exported.adapters:
        known = ", ".join(names) if names else "none"
        raise HQExportError(f"has no adapter {adapter!r} (adapters: {known})", exported.folder / MANIFEST_FILE)
    return [adapter]

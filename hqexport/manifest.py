"""hqexport.json as typed values: what convert writes and what validate, inspect and demo read back.

`Manifest.to_json()` is the file's content (its key order is the file's); `read_manifest(folder)` parses a folder's
file and turns any missing or malformed part into one HQExportError naming the file. The format is documented in
docs/concepts.md ("The manifest").
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

from hqexport.errors import HQExportError
from hqexport.files import MANIFEST_FILE

FORMAT_VERSION = 1
T = TypeVar("T")


def _without_none(record: Any) -> dict[str, Any]:
    return {item.name: getattr(record, item.name) for item in fields(record) if getattr(record, item.name) is not None}


@dataclass(frozen=True)
class Lowering:
    """What the lowering pass did with a layer: `kept` says why it stayed an hqexport op, else the MatMulNBits form."""

    kept: str | None = None
    container_bits: int | None = None
    accuracy_level: int | None = None
    zero_correction: bool | None = None  # False when every zero point was already an integer in range

    def to_json(self) -> dict[str, Any]:
        return _without_none(self)


@dataclass(frozen=True)
class LayerEntry:
    """One quantized layer of the source: its HQQ format and the node (and initializers) computing it."""

    nbits: float
    group_size: int
    axis: int
    shape: tuple[int, int]  # [out_features, in_features]
    compute_dtype: str
    op: str  # "hqexport.HQQMatMul", "com.microsoft.MatMulNBits" or one of the hqexport.HQQMatMulNBits ops (ops/nbits.py)
    node: str
    initializers: dict[str, str | None]  # op input role -> initializer name
    rows: tuple[int, int] | None = None  # its output columns in a node packed with other layers, [start, stop)
    lowering: Lowering | None = None

    @property
    def format_label(self) -> str:
        return f"{self.nbits:g}bit g{self.group_size} axis{self.axis}"

    def to_json(self) -> dict[str, Any]:
        data = _without_none(self)
        data["shape"] = list(self.shape)
        if self.rows is not None:
            data["rows"] = list(self.rows)
        if self.lowering is not None:
            data["lowering"] = self.lowering.to_json()
        return data

    @classmethod
    def from_json(cls, data: Any, where: str) -> LayerEntry:
        entry = _record(cls, data, where)
        lowering = None if entry.lowering is None else _record(Lowering, entry.lowering, f"{where}.lowering")
        rows = None if entry.rows is None else _pair(entry.rows, f"{where}.rows")
        return dataclasses.replace(entry, shape=_pair(entry.shape, f"{where}.shape"), rows=rows, lowering=lowering)


@dataclass(frozen=True)
class SourceInfo:
    path: str | None  # the source folder, absolute (None for a live model)
    kind: str
    files: dict[str, str]  # file name -> sha256


@dataclass(frozen=True)
class ModelInfo:
    architecture: str
    model_type: str
    num_hidden_layers: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    dtype: str  # activation dtype: fp32 or fp16
    opset: int
    uses_position_ids: bool
    lm_head: dict[str, Any]  # how the head is stored (lower/lm_head.py HeadChoice.to_json)
    lossy: list[str]  # every choice that departs from the source's exact result


@dataclass(frozen=True)
class Manifest:
    tool: dict[str, str]  # package -> version
    source: SourceInfo
    model: ModelInfo
    layers: dict[str, LayerEntry]  # by module path
    adapters: dict[str, dict[str, Any]]  # by adapter name: its PEFT summary and mode (adapters/apply.py, merge.py)
    outputs: dict[str, str]  # each written file (relative path) -> sha256
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "tool": self.tool,
            "source": vars(self.source),
            "model": vars(self.model),
            "layers": {path: entry.to_json() for path, entry in self.layers.items()},
            "adapters": self.adapters,
            "outputs": self.outputs,
        }

    def write(self, folder: Path) -> None:
        (folder / MANIFEST_FILE).write_text(json.dumps(self.to_json(), indent=2))

    @classmethod
    def from_json(cls, data: Any) -> Manifest:
        """The manifest in `data` (a parsed hqexport.json); ValueError naming the part that is missing or malformed."""
        manifest = _record(cls, data, "the file")
        if manifest.format_version != FORMAT_VERSION:
            raise ValueError(f"format_version {manifest.format_version!r}: this hqexport reads format {FORMAT_VERSION}")
        return dataclasses.replace(
            manifest,
            source=_record(SourceInfo, manifest.source, "source"),
            model=_record(ModelInfo, manifest.model, "model"),
            layers={path: LayerEntry.from_json(entry, f"layers.{path}") for path, entry in _object(manifest.layers, "layers").items()},
            adapters=_object(manifest.adapters, "adapters"),
            outputs=_object(manifest.outputs, "outputs"),
        )


def read_manifest(folder: Path) -> Manifest:
    """The manifest of an exported folder; a missing, unparsable or incomplete file is an HQExportError naming it."""
    file = Path(folder) / MANIFEST_FILE
    if not file.is_file():
        raise HQExportError(f"has no {MANIFEST_FILE}; is it a folder written by `hqexport convert`?", folder)
    try:
        return Manifest.from_json(json.loads(file.read_text(encoding="utf-8")))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise HQExportError(f"is not valid JSON: {error}", file) from None
    except ValueError as error:
        raise HQExportError(f"is not a valid hqexport manifest: {error}", file) from None


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{where} is not a JSON object")
    return value


def _record(cls: type[T], data: Any, where: str) -> T:
    """cls from the JSON object `data`, whose keys must be cls's fields (all those without a default)."""
    keys = set(_object(data, where))
    required = {item.name for item in fields(cls) if item.default is MISSING and item.default_factory is MISSING}
    if missing := sorted(required - keys):
        raise ValueError(f"{where} has no {', '.join(missing)}")
    if unknown := sorted(keys - {item.name for item in fields(cls)}):
        raise ValueError(f"{where} has unknown keys {', '.join(unknown)}")
    return cls(**data)


def _pair(value: Any, where: str) -> tuple[int, int]:
    if not (isinstance(value, list) and len(value) == 2 and all(isinstance(item, int) for item in value)):
        raise ValueError(f"{where} is not a pair of integers")
    return value[0], value[1]

"""`hqexport inspect PATH`: what a source folder or an exported folder holds.

`inspect_path` builds a JSON-ready report; `render_inspect` prints the same content as rich tables.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from hqexport.errors import HQExportError
from hqexport.files import MANIFEST_FILE, MODEL_FILE
from hqexport.manifest import read_manifest
from hqexport.model import QuantizedModel
from hqexport.read.source import read_source

_LAYER_INDEX = re.compile(r"\.\d+\.")


def inspect_path(path: Path) -> dict[str, Any]:
    """A report on `path`: an exported folder (hqexport.json + model.onnx) or an HQQ source folder."""
    path = Path(path)
    if (path / MANIFEST_FILE).is_file():
        return inspect_export(path)
    return inspect_source(path)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _unique_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """Bytes of distinct storages: a tied lm_head shares the embedding's."""
    seen: dict[tuple[int, int], int] = {}
    for tensor in tensors.values():
        seen[(tensor.untyped_storage().data_ptr(), tensor.storage_offset())] = tensor.numel() * tensor.element_size()
    return sum(seen.values())


def inspect_source(path: Path) -> dict[str, Any]:
    model = read_source(path)
    return source_report(model, path)


def source_report(model: QuantizedModel, path: Path) -> dict[str, Any]:
    layers = [
        {
            "name": layer.name,
            "shape": [layer.out_features, layer.in_features],
            "format": layer.fmt.label,
            "compute_dtype": _dtype_name(layer.compute_dtype),
            "packed_bytes": layer.packed_bytes,
            "meta_bytes": layer.meta_bytes,
        }
        for layer in model.linears.values()
    ]
    formats = Counter((layer.fmt, _dtype_name(layer.compute_dtype)) for layer in model.linears.values())
    packed = model.packed_bytes
    meta = sum(layer.meta_bytes for layer in model.linears.values())
    fp16 = sum(2 * layer.out_features * layer.in_features for layer in model.linears.values())
    return {
        "kind": "source",
        "path": str(Path(path).resolve()),
        "source_kind": model.provenance.kind,
        "architecture": model.architecture,
        "model_type": model.config.get("model_type"),
        "num_hidden_layers": model.config.get("num_hidden_layers"),
        "quantized_linears": len(model.linears),
        "formats": [
            {
                "format": fmt.label,
                "nbits": fmt.nbits,
                "group_size": fmt.group_size,
                "axis": fmt.axis,
                "packing": fmt.packing,
                "compute_dtype": dtype,
                "count": count,
            }
            for (fmt, dtype), count in sorted(formats.items(), key=lambda item: (-item[1], item[0][0].label))
        ],
        "bytes": {
            "packed_weights": packed,
            "scale_zero_bias": meta,
            "fp16_equivalent": fp16,
            "ratio_fp16_to_quantized": round(fp16 / (packed + meta), 3) if packed + meta else None,
        },
        "layers": layers,
        "skipped_modules": list(model.skipped_modules),
        "fp_tensors": {
            "count": len(model.tensors),
            "bytes": _unique_bytes(model.tensors),
            "tensors": [
                {"name": name, "shape": list(tensor.shape), "dtype": _dtype_name(tensor.dtype)}
                for name, tensor in model.tensors.items()
            ],
        },
        "tokenizer_files": [file.name for file in model.tokenizer_files],
        "files": dict(model.provenance.files),
        "adapters": find_adapters(Path(path)),
    }


def find_adapters(path: Path) -> list[dict[str, Any]]:
    """PEFT adapter folders inside `path` or next to it (any folder with adapter_config.json)."""
    candidates = [child for child in sorted(path.iterdir()) if child.is_dir()]
    if path.resolve().parent != path.resolve():
        candidates += [s for s in sorted(path.resolve().parent.iterdir()) if s.is_dir() and s.resolve() != path.resolve()]
    adapters = []
    for folder in candidates:
        config_file = folder / "adapter_config.json"
        if not config_file.is_file():
            continue
        entry: dict[str, Any] = {"path": str(folder.resolve())}
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
            if not isinstance(config, dict):
                raise ValueError("not a JSON object")
        except (UnicodeDecodeError, ValueError) as error:
            entry["error"] = f"{config_file}: unreadable adapter_config.json ({error})"
        else:
            for key in ("peft_type", "r", "lora_alpha", "target_modules", "base_model_name_or_path"):
                entry[key] = sorted(config[key]) if isinstance(config.get(key), list) else config.get(key)
        adapters.append(entry)
    return adapters


def inspect_export(path: Path) -> dict[str, Any]:
    if not (path / MODEL_FILE).is_file():
        raise HQExportError(f"has {MANIFEST_FILE} but no {MODEL_FILE}: not a complete hqexport output folder", path)
    manifest = read_manifest(path)
    layers = manifest.layers
    ops = Counter(entry.op for entry in layers.values())
    formats = Counter(entry.format_label for entry in layers.values())
    files = {
        str(file.relative_to(path)): file.stat().st_size for file in sorted(path.rglob("*")) if file.is_file()
    }
    data = manifest.to_json()
    return {
        "kind": "export",
        "path": str(path.resolve()),
        "format_version": manifest.format_version,
        "tool": manifest.tool,
        "source": {key: value for key, value in data["source"].items() if key != "files"},
        "model": data["model"],
        "quantized_linears": len(layers),
        "ops": dict(sorted(ops.items())),
        "formats": [{"format": label, "count": count} for label, count in formats.most_common()],
        "layers": data["layers"],
        "adapters": manifest.adapters,
        "files": files,
        "total_bytes": sum(files.values()),
    }


def _size(count: float) -> str:
    unit = "B"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            break
        count /= 1024
    return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"


def render_inspect(report: dict[str, Any]) -> None:
    """Print the report as rich tables on stdout."""
    from rich.console import Console

    console = Console()
    tables = _export_tables(report) if report["kind"] == "export" else _source_tables(report)
    for table in tables:
        console.print(table)


def _kv_table(title: str, rows: list[tuple[str, Any]]):
    from rich.table import Table

    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, str(value))
    return table


def _table(title: str, columns: list[str], rows: list[list[Any]]):
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(str(cell) for cell in row))
    return table


def _source_tables(report: dict[str, Any]) -> list:
    sizes = report["bytes"]
    summary = _kv_table(
        "HQQ source",
        [
            ("path", report["path"]),
            ("kind", report["source_kind"]),
            ("architecture", report["architecture"]),
            ("decoder layers", report["num_hidden_layers"]),
            ("quantized linears", report["quantized_linears"]),
            ("packed weights", _size(sizes["packed_weights"])),
            ("scale / zero / bias", _size(sizes["scale_zero_bias"])),
            ("fp16 equivalent", f"{_size(sizes['fp16_equivalent'])} ({sizes['ratio_fp16_to_quantized']}x)"),
            ("fp tensors", f"{report['fp_tensors']['count']} ({_size(report['fp_tensors']['bytes'])})"),
            ("skipped (fp) linears", ", ".join(report["skipped_modules"]) or "none"),
            ("tokenizer files", ", ".join(report["tokenizer_files"]) or "none"),
            ("adapters next to it", len(report["adapters"]) or "none"),
        ],
    )
    formats = _table(
        "Formats",
        ["format", "packing", "compute dtype", "layers"],
        [[f["format"], f["packing"], f["compute_dtype"], f["count"]] for f in report["formats"]],
    )
    grouped: dict[tuple[str, str, str], int] = Counter(
        (_LAYER_INDEX.sub(".*.", layer["name"]), "x".join(map(str, layer["shape"])), layer["format"])
        for layer in report["layers"]
    )
    layers = _table(
        "Quantized linears (numbered blocks folded into *)",
        ["module", "shape [out x in]", "format", "count"],
        [[name, shape, fmt, count] for (name, shape, fmt), count in grouped.items()],
    )
    return [summary, formats, layers] + ([_adapters_table(report["adapters"])] if report["adapters"] else [])


def _adapters_table(adapters: list[dict[str, Any]] | dict[str, Any]):
    if isinstance(adapters, dict):  # from a manifest: whatever the exporter recorded per adapter
        rows = [[name, json.dumps(entry, sort_keys=True)] for name, entry in adapters.items()]
        return _table("Adapters", ["name", "details"], rows)
    rows = [
        [a["path"], a.get("r", ""), a.get("lora_alpha", ""), a.get("target_modules", a.get("error", ""))]
        for a in adapters
    ]
    return _table("Adapters found next to it", ["folder", "r", "lora_alpha", "target_modules"], rows)


def _head_text(head: dict[str, Any]) -> str:
    """The manifest's model.lm_head in a few words: its format, the op computing it, whether the embedding shares it,
    a lossy head's shortlist."""
    details = [head["op"]] if head.get("op") else []
    details += ["the embedding reads it too"] if head.get("shared_with_embedding") else []
    details += [f"{head['shortlist']} logits rescored from {head.get('rows', 'fp32')} rows"] if head.get("shortlist") else []
    return head.get("format", "") + (f" ({', '.join(details)})" if details else "")


def _export_tables(report: dict[str, Any]) -> list:
    model = report["model"]
    summary = _kv_table(
        "hqexport output",
        [
            ("path", report["path"]),
            ("source", report["source"].get("path", "")),
            ("architecture", model.get("architecture", "")),
            ("decoder layers", model.get("num_hidden_layers", "")),
            ("dtype / opset", f"{model.get('dtype', '')} / {model.get('opset', '')}"),
            ("quantized linears", report["quantized_linears"]),
            ("lm_head", _head_text(model.get("lm_head", {}))),
            ("lossy choices", ", ".join(model.get("lossy", [])) or "none (HQQ's exact result)"),
            ("total size", _size(report["total_bytes"])),
        ],
    )
    ops = _table("Ops", ["op", "layers"], [[op, count] for op, count in report["ops"].items()])
    formats = _table("Formats", ["format", "layers"], [[f["format"], f["count"]] for f in report["formats"]])
    files = _table("Files", ["file", "size"], [[name, _size(size)] for name, size in report["files"].items()])
    return [summary, ops, formats, _adapters_table(report["adapters"]), files]

"""`read_source(path)`: find out which kind of HQQ folder `path` is and read it."""

from __future__ import annotations

from pathlib import Path

from hqexport.errors import HQExportError
from hqexport.model import QuantizedModel
from hqexport.read.folder import read_config
from hqexport.read.hqq_pickle import WEIGHTS_FILE, read_hqq_pickle
from hqexport.read.hqq_safetensors import has_hqq_layers, read_hqq_safetensors, weight_files


def read_source(path: Path) -> QuantizedModel:
    """Read an hqq `save_quantized` folder (qmodel.pt wins if both are present) or an HQQ safetensors folder."""
    path = Path(path)
    if not path.exists():
        raise HQExportError("no such folder", path)
    if not path.is_dir():
        raise HQExportError("is not a folder; pass the model folder that holds config.json", path)
    read_config(path)
    if (path / WEIGHTS_FILE).is_file():
        return read_hqq_pickle(path)
    files = weight_files(path)
    if files and has_hqq_layers(files):
        return read_hqq_safetensors(path)
    found = "its safetensors have no .W_q keys" if files else "no qmodel.pt and no .safetensors files"
    raise HQExportError(f"holds no HQQ weights ({found}); quantize the model with hqq first", path)

"""The names of the files in an exported folder: every module that writes or reads one takes its name from here."""

from __future__ import annotations

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"  # external data of MODEL_FILE
MANIFEST_FILE = "hqexport.json"
GENAI_CONFIG_FILE = "genai_config.json"  # onnxruntime-genai
ADAPTERS_DIR = "adapters"  # ADAPTERS_DIR/NAME + ADAPTER_SUFFIX, one file per separate adapter
ADAPTER_SUFFIX = ".onnx_adapter"


def adapter_file(name: str) -> str:
    """The path of adapter `name`'s file, relative to the exported folder."""
    return f"{ADAPTERS_DIR}/{name}{ADAPTER_SUFFIX}"

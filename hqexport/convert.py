"""`convert`: an HQQ source folder (or an already-read QuantizedModel) -> an ONNX output folder.

read -> rebuild (transformers model, HQQ linears as hqexport op modules) -> export (torch.onnx dynamo) ->
write (model.onnx + data, tokenizer files, genai_config.json, hqexport.json) into a staging folder that
becomes OUT only when complete.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from hqexport.errors import HQExportError
from hqexport.export.decoder import DecoderWithCache, decoder_io
from hqexport.export.onnx_export import DEFAULT_OPSET, check_opset, export_decoder
from hqexport.export.quant_linear import HQQMatMulLinear
from hqexport.export.rebuild import DTYPES, rebuild_model
from hqexport.model import QuantizedModel
from hqexport.read.folder import sha256
from hqexport.read.source import read_source
from hqexport.write.folder import MANIFEST_FILE, staged_output
from hqexport.write.genai_config import genai_config
from hqexport.write.manifest import build_manifest
from hqexport.write.onnx_file import write_onnx

GENAI_CONFIG_FILE = "genai_config.json"


@dataclass(frozen=True)
class ConvertSummary:
    out: Path
    architecture: str
    model_type: str
    quantized_layers: int
    dtype: str
    opset: int
    onnx_bytes: int  # model.onnx + model.onnx.data
    packed_bytes: int  # packed codes + scale + zero + bias of the quantized layers, as exported
    fp_bytes: int  # the other parameters (embeddings, norms, fp lm_head), each stored once
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "out": str(self.out)}


def convert(
    source: Path | QuantizedModel,
    out: Path,
    *,
    dtype: str = "fp32",
    opset: int | None = None,
    force: bool = False,
    progress: bool = True,
) -> ConvertSummary:
    """Export `source` to the folder `out`; see the module docstring. User mistakes raise HQExportError."""
    started = time.perf_counter()
    out = Path(out)
    if dtype not in DTYPES:
        raise HQExportError(f"dtype {dtype!r} is not supported; choose {', '.join(DTYPES)}")
    opset = DEFAULT_OPSET if opset is None else opset
    check_opset(opset)
    source_path = source.provenance.path if isinstance(source, QuantizedModel) else Path(source)
    steps = _Steps(progress)

    with staged_output(out, force=force, source=source_path) as staging:
        if isinstance(source, QuantizedModel):
            qmodel = source
        else:
            with steps(f"Reading {source}"):
                qmodel = read_source(Path(source))
        with steps("Rebuilding the model with hqexport ops"):
            causal_lm = rebuild_model(qmodel, dtype)
            io = decoder_io(causal_lm.config, DTYPES[dtype])
        with steps(f"Exporting to ONNX (torch.onnx dynamo, opset {opset})"):
            graph = export_decoder(DecoderWithCache(causal_lm, io), opset)
        with steps("Writing model.onnx, model.onnx.data and checking them"):
            write_onnx(graph.model, staging)
        for path in qmodel.tokenizer_files:
            shutil.copy2(path, staging / path.name)
        (staging / GENAI_CONFIG_FILE).write_text(json.dumps(genai_config(causal_lm.config, io), indent=2))
        outputs = {p.name: sha256(p) for p in sorted(staging.iterdir()) if p.is_file()}
        architecture = type(causal_lm).__name__
        manifest = build_manifest(
            qmodel, io, graph.layers, architecture=architecture, dtype=dtype, opset=opset, outputs=outputs
        )
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
        onnx_bytes = sum((staging / name).stat().st_size for name in outputs if name.startswith("model.onnx"))

    packed, fp = _exported_bytes(causal_lm)
    return ConvertSummary(
        out=out,
        architecture=architecture,
        model_type=qmodel.config["model_type"],
        quantized_layers=len(qmodel.linears),
        dtype=dtype,
        opset=opset,
        onnx_bytes=onnx_bytes,
        packed_bytes=packed,
        fp_bytes=fp,
        seconds=round(time.perf_counter() - started, 2),
    )


def _exported_bytes(causal_lm: torch.nn.Module) -> tuple[int, int]:
    """(quantized layer buffers, fp parameters counted once) of the rebuilt model."""
    packed = sum(
        buffer.numel() * buffer.element_size()
        for module in causal_lm.modules()
        if isinstance(module, HQQMatMulLinear)
        for buffer in module.buffers()
    )
    fp = sum(param.numel() * param.element_size() for param in causal_lm.parameters())
    return packed, fp


class _Steps:
    """Progress of the long steps on stderr (a spinner and the elapsed time), or nothing."""

    def __init__(self, enabled: bool) -> None:
        self.console = Console(stderr=True) if enabled else None

    @contextmanager
    def __call__(self, label: str) -> Iterator[None]:
        if self.console is None:
            yield
            return
        started = time.perf_counter()
        with self.console.status(label):
            yield
        self.console.print(f"[green]✓[/green] {label} [dim]({time.perf_counter() - started:.1f} s)[/dim]")

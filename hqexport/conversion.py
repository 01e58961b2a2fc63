"""`convert`: an HQQ source folder (or an already-read QuantizedModel) -> an ONNX output folder.

read -> adapters (merge re-quantizes before export) -> export (the decoder graph built from the config and the
weights, export/graph.py) -> adapters (separate / bake add LoRA branches to the graph) -> lower (--ops:
MatMulNBits where exact) -> adapters (instead of the branches, where every target became an HQQMatMulNBits node
that the kernels library runs: LoRA inside those nodes, adapters/fused.py) -> lower (the MLP's gating into its
packed gate/up node, lower/swiglu.py) -> write (model.onnx + data, adapters/*.onnx_adapter, tokenizer files,
config.json, genai_config.json, hqexport.json) into a staging folder that becomes OUT only when complete. The
weights are read from the source only as each one is written (every initializer is lazy, export/lazy.py).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from hqexport.adapters import AdapterSpec, apply_adapters, load_adapters, merge_adapter
from hqexport.errors import HQExportError
from hqexport.export.config import DEFAULT_OPSET, DTYPES, check_opset, check_weights, model_config
from hqexport.export.decoder import decoder_io
from hqexport.export.graph import build_decoder
from hqexport.files import DATA_FILE, GENAI_CONFIG_FILE, MODEL_FILE
from hqexport.formats import canonical_shape, storage_bits, word_dtype
from hqexport.lower import (
    EXACT_INT8_HEAD,
    HALF_HEAD_FORMATS,
    HEAD_PATH,
    LOWERINGS,
    HeadChoice,
    exact_half_head,
    exact_int8_head,
    fuse_swiglu,
    head_choice,
    lower_layers,
    matmulnbits_blocker,
    quantize_head,
    share_embedding,
)
from hqexport.model import QuantizedLinear, QuantizedModel
from hqexport.ops.half import OP_TYPE as HALF_OP_TYPE
from hqexport.ops.nbits import LORA_OP_TYPE
from hqexport.ops.schema import DOMAIN, HQQ_OP
from hqexport.options import ACCURACY_LEVELS, ADAPTER_DTYPES, ADAPTER_MODES, OPS
from hqexport.read.folder import sha256
from hqexport.read.source import read_source
from hqexport.write.folder import staged_output
from hqexport.write.genai_config import genai_config
from hqexport.write.manifest import build_manifest
from hqexport.write.onnx_file import write_onnx

if TYPE_CHECKING:
    import torch

#: below this share of the adapter's delta surviving re-quantization, merge warns that the fine-tune is lost
LOW_RETENTION = 0.5


@dataclass(frozen=True)
class ConvertSummary:
    out: Path
    architecture: str
    model_type: str
    quantized_layers: int
    dtype: str
    opset: int
    ops: dict[str, int]  # op -> number of quantized layers computed by it
    kernels: str | None  # the compiled kernel library shipped in the folder (file name), if any
    lm_head: str  # how the head is stored: fp32, int8-exact / fp16-exact / bf16-exact, int8 / int4 (lossy), hqq (an HQQ layer of the source)
    adapters: dict[str, dict[str, Any]]  # the manifest's adapters section
    onnx_bytes: int  # model.onnx + model.onnx.data
    packed_bytes: int  # packed codes + scale + zero + bias of the quantized layers, as exported
    fp_bytes: int  # the other parameters (embeddings, norms, fp lm_head), each stored once
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "out": str(self.out)}


def convert(
    source: str | Path | QuantizedModel,
    out: str | Path,
    *,
    dtype: str = "fp32",
    opset: int | None = None,
    ops: str = "auto",
    accuracy_level: int = 0,
    lm_head: str = "fp32",
    with_kernels: bool | None = None,
    adapters: Sequence[str] = (),
    adapter_mode: str | None = None,
    adapter_dtype: str = "auto",
    force: bool = False,
    progress: bool = True,
) -> ConvertSummary:
    """Export `source` to the folder `out`; see the module docstring. User mistakes raise HQExportError.

    adapters: `[NAME=]PATH` arguments (PEFT adapter folders); adapter_mode: separate (default with adapters),
    bake or merge; adapter_dtype: the factors' dtype where LoRA lives inside the layers' nodes (auto: fp16 when
    that holds every factor exactly, else fp32; fp16: rounds the others, lossy).
    ops: auto (MatMulNBits where it is exact, hqexport op elsewhere), hqq (hqexport op everywhere) or ort
    (MatMulNBits everywhere, an error for a layer it cannot express). accuracy_level: of the
    MatMulNBits nodes (ACCURACY_LEVELS); 1 computes float16 / bfloat16 layers' weights in fp32, 4 uses int8
    activations: both trade HQQ's exact result for speed. lm_head: fp32 (exact;
    stored as its int8 grid, or in float16 / bfloat16, when that holds its values and the folder ships the kernels) or a lossy int8 / int4
    requantization of an fp head (lower/lm_head.py). with_kernels: put the compiled kernel
    library (built if needed) into the folder and name it in genai_config.json, so that onnxruntime-genai runs the
    hqexport ops on it; None (the default) does so when the graph has hqexport ops and the library can be built
    on this machine, False never (a folder for another platform: the ops then run as their function bodies).
    """
    started = time.perf_counter()
    out = Path(out)
    if dtype not in DTYPES:
        raise HQExportError(f"dtype {dtype!r} is not supported; choose {', '.join(DTYPES)}")
    if ops not in OPS:
        raise HQExportError(f"--ops {ops!r} is not supported; choose {', '.join(OPS)}")
    if accuracy_level not in ACCURACY_LEVELS:
        raise HQExportError(f"--accuracy-level {accuracy_level} is not supported; choose {', '.join(map(str, ACCURACY_LEVELS))}")
    if with_kernels and ops == "ort":
        raise HQExportError("--with-kernels packages the library that runs hqexport ops; --ops ort writes none")
    if accuracy_level and ops == "hqq":
        raise HQExportError("--accuracy-level sets how MatMulNBits computes; --ops hqq writes no MatMulNBits node")
    if adapter_mode is not None and adapter_mode not in ADAPTER_MODES:
        raise HQExportError(f"--adapters {adapter_mode!r} is not supported; choose {', '.join(ADAPTER_MODES)}")
    if adapter_mode is not None and not adapters:
        raise HQExportError(f"--adapters {adapter_mode} needs at least one --adapter")
    if adapter_dtype not in ADAPTER_DTYPES:
        raise HQExportError(f"--adapter-dtype {adapter_dtype!r} is not supported; choose {', '.join(ADAPTER_DTYPES)}")
    if adapter_dtype == "fp16" and (not adapters or adapter_mode == "merge"):
        raise HQExportError(f"--adapter-dtype {adapter_dtype} sets how --adapter factors are stored; there are none to store"
                            + (" (--adapters merge folds them into the weights)" if adapters else ""))
    mode = adapter_mode or "separate"
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
        choice = head_choice(qmodel, lm_head)
        if ops == "ort":
            _check_all_lowerable(qmodel)
        specs = _load_adapters(qmodel, adapters) if adapters else []
        adapter_manifest: dict[str, dict[str, Any]] = {}
        if mode == "merge" and specs:
            qmodel, adapter_manifest = _merge(qmodel, specs, steps)
        config = model_config(qmodel)
        check_weights(qmodel, config)
        io = decoder_io(config, DTYPES[dtype])
        library, kernels_error = _find_kernels(steps, with_kernels, ops)
        # the compiled kernel will run the layers (HQQMatMulNBits: ops/nbits.py; exactly at accuracy level 0)
        fp32_kernel = ops == "auto" and dtype == "fp32" and library is not None
        head, half_head, grid = None, None, None
        tied = config.tie_word_embeddings
        if choice.lossy:
            with steps(f"Quantizing the lm_head with hqq (--lm-head {lm_head}, lossy)"):
                head = quantize_head(qmodel, tied, choice)
            if dtype == "fp32":  # the rows the shortlist rescores, and a tied embedding, in their smallest exact form
                grid, half_head = _exact_head_form(qmodel, tied, steps)
            rows = EXACT_INT8_HEAD.format if grid is not None else HALF_HEAD_FORMATS.get(half_head, dtype)
            choice = dataclasses.replace(choice, rows=rows)
        elif choice.format == "fp32" and fp32_kernel:
            head, half_head = _exact_head_form(qmodel, tied, steps)
            if head is not None:
                choice = EXACT_INT8_HEAD
            elif half_head is not None:
                choice = HeadChoice(HALF_HEAD_FORMATS[half_head], lossy=False, op=f"{DOMAIN}.{HALF_OP_TYPE}", shared_with_embedding=tied or None)
        targets = {module for spec in specs for module in spec.modules} if mode != "merge" else set()
        # LoRA inside the kernel's nodes (adapters/fused.py) where they all run on it; else a branch per target
        fused_lora = bool(targets) and fp32_kernel and _lora_fuses(qmodel, specs, targets)
        if adapter_dtype == "fp16" and not fused_lora:
            raise HQExportError(
                f"--adapter-dtype {adapter_dtype} needs the adapters inside the layers' nodes: --ops auto, --dtype fp32, the "
                "kernels library, no DoRA, every target layer lowerable"
            )
        with steps(f"Building the decoder graph (opset {opset})"):
            graph = build_decoder(qmodel, config, io, opset=opset, own_outputs=set() if fused_lora else targets, head=head,
                                  shortlist=choice.shortlist, half_head=half_head, grid=grid)
        layers = dict(graph.layers)  # each layer's node and op, updated below by lowering and adapters
        adapter_export = None
        if targets and not fused_lora:
            with steps(f"Adding {len(specs)} adapter(s) ({mode})"):
                source_layers = {path: layers[path] for path in qmodel.linears}  # a head quantized by --lm-head is not one
                adapter_export = apply_adapters(graph.model, source_layers, specs, mode, dtype=dtype, base_linears=qmodel.linears)
        if LOWERINGS[ops] is not None:
            # the exact int8 head and the adapted layers: HQQMatMulNBits nodes even where no zero needs correcting
            fuse = {layers[HEAD_PATH].node} if choice == EXACT_INT8_HEAD else set()
            fuse |= {layers[module].node for module in targets} if fused_lora else set()
            with steps(f"Lowering to MatMulNBits where exact (--ops {ops})"):
                layers = lower_layers(graph.model, layers, ops=ops, accuracy_level=accuracy_level, fuse=fuse)
        if fused_lora:
            with steps(f"Adding {len(specs)} adapter(s) ({mode}, inside the layers' nodes)"):
                adapter_export = apply_adapters(graph.model, layers, specs, mode, dtype=dtype, fused=True, factor_dtype=adapter_dtype)
            layers |= {path: dataclasses.replace(layers[path], op=f"{DOMAIN}.{LORA_OP_TYPE}") for path in targets}
        if LOWERINGS[ops] is not None:  # the MLPs' gating into their gate/up nodes, where those are HQQMatMulNBits ones
            layers = fuse_swiglu(graph.model, layers)
        if adapter_export is not None:
            adapter_manifest = adapter_export.manifest
        if head is not None:  # not a layer of the source: the manifest describes it under model.lm_head
            head_node = layers.pop(HEAD_PATH)
            # the exact int8 head, lowered, holds the table in MatMulNBits' layout; a shortlist needs the fp one
            shared = config.tie_word_embeddings and head_node.op != HQQ_OP and not choice.shortlist
            if shared:
                share_embedding(graph.model, head_node.initializers, bits=storage_bits(head.fmt), block_size=head.fmt.group_size)
            choice = dataclasses.replace(choice, op=head_node.op, shared_with_embedding=shared if tied else None)
        with steps("Writing model.onnx, model.onnx.data and checking them"):
            write_onnx(graph.model, staging)
            if adapter_export is not None:
                adapter_export.write_files(staging)
        for path in qmodel.tokenizer_files:
            shutil.copy2(path, staging / path.name)
        config.save_pretrained(staging)  # config.json: what transformers-based runtimes (optimum) read
        uses_hqexport_ops = any(node.domain == DOMAIN for node in graph.model.graph)
        shipped = _ship_kernels(staging, steps, library, kernels_error, ship=bool(with_kernels) or uses_hqexport_ops)
        (staging / GENAI_CONFIG_FILE).write_text(json.dumps(genai_config(config, io, custom_ops_library=shipped), indent=2))
        outputs = {p.relative_to(staging).as_posix(): sha256(p) for p in sorted(staging.rglob("*")) if p.is_file()}
        architecture = config.architectures[0] if config.architectures else qmodel.architecture
        manifest = build_manifest(
            qmodel, io, layers, architecture=architecture, dtype=dtype, opset=opset, outputs=outputs,
            adapters=adapter_manifest, lm_head=choice.to_json(), kernels=shipped is not None,
        )
        manifest.write(staging)
        onnx_bytes = sum((staging / name).stat().st_size for name in outputs if name in (MODEL_FILE, DATA_FILE))

    packed, fp = _exported_bytes(qmodel, DTYPES[dtype].itemsize, tied=config.tie_word_embeddings)
    return ConvertSummary(
        out=out,
        architecture=architecture,
        model_type=qmodel.config["model_type"],
        quantized_layers=len(qmodel.linears),
        dtype=dtype,
        opset=opset,
        ops=dict(Counter(entry.op for entry in manifest.layers.values())),
        kernels=shipped,
        lm_head=choice.format,
        adapters=adapter_manifest,
        onnx_bytes=onnx_bytes,
        packed_bytes=packed,
        fp_bytes=fp,
        seconds=round(time.perf_counter() - started, 2),
    )


def _load_adapters(qmodel: QuantizedModel, arguments: Sequence[str]) -> list[AdapterSpec]:
    """Parse and bind the --adapter arguments to the source's layers (shapes, targets, base model)."""
    embeddings = [key.rsplit(".", 1)[0] for key in qmodel.tensors if "embed" in key]
    return load_adapters(
        arguments,
        {path: layer.shape for path, layer in qmodel.linears.items()},
        other_modules=[*qmodel.skipped_modules, *embeddings],
        source_config=qmodel.config,
    )


def _merge(qmodel: QuantizedModel, specs: list[AdapterSpec], steps: _Steps) -> tuple[QuantizedModel, dict[str, dict[str, Any]]]:
    """Merge the one adapter into the base by hqq re-quantization; warn when little of it survives."""
    if len(specs) != 1:
        raise HQExportError(f"--adapters merge builds one model per adapter; got {len(specs)} adapters")
    spec = specs[0]
    with steps(f"Merging adapter {spec.name} (dequantize + delta + hqq re-quantize)"):
        merged, entry = merge_adapter(qmodel, spec)
    if steps.console is not None:
        retained = entry["retained"]
        style = "bold red" if retained < LOW_RETENTION else "green"
        steps.console.print(
            f"[{style}]Adapter {spec.name}: {retained:.1%} of its weight delta survived re-quantization[/{style}]"
            + (" — merging erased most of the fine-tune; prefer --adapters separate or bake" if retained < LOW_RETENTION else "")
        )
    return merged, {spec.name: entry}


def _exact_head_form(qmodel: QuantizedModel, tied: bool, steps: _Steps) -> tuple[QuantizedLinear | None, torch.dtype | None]:
    """(int8 grid, None) when the fp head is exactly an int8 grid, else (None, the half dtype that holds it or None)."""
    with steps("Checking whether the fp lm_head is an exact int8 grid, or float16 / bfloat16 values"):
        grid = exact_int8_head(qmodel, tied)
        return grid, exact_half_head(qmodel, tied) if grid is None else None


def _find_kernels(steps: _Steps, with_kernels: bool | None, ops: str) -> tuple[Path | None, str | None]:
    """The compiled kernel library the folder will ship (None with --no-kernels or --ops ort), and why it is missing
    if it cannot be built here (an error instead with --with-kernels)."""
    from hqexport.kernels import KernelBuildError, library_path

    if with_kernels is False or ops == "ort":
        return None, None
    with steps("Building / finding the compiled kernel library"):
        try:
            return library_path(build=True), None
        except KernelBuildError as error:
            if with_kernels:
                raise
            return None, str(error)


def _ship_kernels(staging: Path, steps: _Steps, library: Path | None, error: str | None, *, ship: bool) -> str | None:
    """Copy the library into the folder (onnxruntime-genai loads custom ops only from there) where `ship` (the graph
    has hqexport ops, or --with-kernels) and return its file name; say so when it is needed but missing."""
    if not ship:
        return None
    if library is None:
        if error is not None:
            steps.note(f"No compiled kernels in the folder ({error}); its hqexport ops run as their ONNX function bodies.")
        return None
    shutil.copy2(library, staging / library.name)
    return library.name


def _blocker(layer: QuantizedLinear) -> str | None:
    """Why MatMulNBits cannot express this source layer exactly, or None."""
    return matmulnbits_blocker(bits=storage_bits(layer.fmt), group_size=layer.fmt.group_size, axis=layer.fmt.axis, in_features=layer.in_features)


def _check_all_lowerable(qmodel: QuantizedModel) -> None:
    """--ops ort: refuse before the long export when a layer has no exact MatMulNBits form."""
    for path, layer in qmodel.linears.items():
        blocker = _blocker(layer)
        if blocker is not None:
            raise HQExportError(f"--ops ort: layer {path} ({layer.fmt.label}) cannot run as MatMulNBits: {blocker}")


def _lora_fuses(qmodel: QuantizedModel, specs: Sequence[AdapterSpec], targets: set[str]) -> bool:
    """Whether the adapters can live inside the target layers' HQQMatMulNBits nodes: no DoRA, every target lowerable."""
    if any(spec.use_dora for spec in specs):
        return False
    return all(_blocker(qmodel.linears[path]) is None for path in targets)


def _exported_bytes(qmodel: QuantizedModel, act_itemsize: int, *, tied: bool) -> tuple[int, int]:
    """(packed codes + scale + zero + bias of the quantized layers, the fp tensors in the activation dtype, a tied
    head counted once)."""
    packed = 0
    for layer in qmodel.linears.values():
        bits = storage_bits(layer.fmt)
        rows, words = canonical_shape(layer.out_features, layer.in_features, bits)
        packed += rows * words * word_dtype(bits).itemsize + layer.meta_bytes
    fp = sum(
        tensor.numel() * act_itemsize
        for key, tensor in qmodel.tensors.items()
        if tensor.is_floating_point() and not (tied and key == "lm_head.weight")
    )
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

    def note(self, text: str) -> None:
        if self.console is not None:
            self.console.print(f"[yellow]![/yellow] {text}")

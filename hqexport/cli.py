"""The `hqexport` command line: a thin click layer over the pipeline stages.

A user mistake (HQExportError) prints one line on stderr and exits 2; a failed validation exits 1.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from pathlib import Path

import click

from hqexport import __version__, options
from hqexport.errors import HQExportError


class _Group(click.Group):
    """Turns our errors into one line and exit code 2 instead of a traceback, and SIGTERM into a clean stop."""

    def invoke(self, ctx: click.Context):
        previous = signal.signal(signal.SIGTERM, _stop) if threading.current_thread() is threading.main_thread() else None
        try:
            return super().invoke(ctx)
        except HQExportError as error:
            click.echo(f"hqexport: error: {error}", err=True)  # one line: HQExportError keeps it so
            sys.exit(error.exit_code)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)


def _stop(signum: int, _frame: object) -> None:
    """SIGTERM (a pipeline's timeout, `kill`) unwinds like Ctrl-C does, so convert removes its staging folder."""
    click.echo(f"hqexport: stopped by {signal.Signals(signum).name}", err=True)
    raise SystemExit(128 + signum)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="hqexport")
def main() -> None:
    """Export HQQ-quantized, LoRA-fine-tuned models to ONNX Runtime, and prove nothing changed.

    \b
    Typical use:
      hqexport inspect ./my-hqq-model
      hqexport convert ./my-hqq-model -o ./onnx-out --adapter chat=./my-lora
      hqexport validate ./onnx-out
    """


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of tables.")
def inspect(path: Path, as_json: bool) -> None:
    """Describe an HQQ source folder or an exported folder: layers, formats, sizes, adapters."""
    from hqexport.inspect import inspect_path, render_inspect

    report = inspect_path(path)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        render_inspect(report)


@main.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path), help="Output folder (created; must not exist unless --force).")
@click.option(
    "--adapter",
    "adapters",
    multiple=True,
    metavar="[NAME=]PATH",
    help="A PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors); repeatable. "
    "NAME defaults to the folder name.",
)
@click.option(
    "--adapters",
    "adapter_mode",
    type=click.Choice(options.ADAPTER_MODES),
    help="separate (default): hot-swappable adapters/NAME.onnx_adapter files; bake: the exact low-rank branch "
    "inside the graph (one adapter); merge: dequantize + delta + hqq re-quantize (lossy, reports how much survived). "
    "With the kernels library, separate and bake put LoRA inside the layers' nodes: no cost while inactive.",
)
@click.option(
    "--adapter-dtype",
    type=click.Choice(options.ADAPTER_DTYPES),
    default="auto",
    show_default=True,
    help="dtype of the LoRA factors inside the layers' nodes (separate and bake with the kernels library). fp16 "
    "halves the bytes an active adapter reads per token (faster decode). auto: fp16 when every factor of every "
    "adapter is a float16 value (adapters trained and saved in float16 or bfloat16 often are), else fp32: exact "
    "either way. fp16: rounds factors that are not: lossy, recorded per adapter, and validate judges that adapter "
    "by top-1 agreement.",
)
@click.option(
    "--ops",
    type=click.Choice(options.OPS),
    default="auto",
    show_default=True,
    help="auto: MatMulNBits' layout where it expresses a layer exactly (one hqexport.HQQMatMulNBits node: "
    "MatMulNBits plus HQQ's zero-point correction, a compiled kernel where the library is registered), "
    "hqexport.HQQMatMul elsewhere; hqq: hqexport.HQQMatMul everywhere; ort: onnxruntime's own ops only, "
    "MatMulNBits everywhere (error if a layer cannot be).",
)
@click.option(
    "--accuracy-level",
    type=click.Choice([str(level) for level in options.ACCURACY_LEVELS]),
    default="0",
    show_default=True,
    help="accuracy_level of the layers' nodes (MatMulNBits' attribute). 0: HQQ's arithmetic, exact. 1: weights "
    "computed in fp32, without hqq's rounding of each one to a float16 / bfloat16 compute dtype: about 1.25x faster "
    "decode for such layers, lossy for them (the same as 0 for float32 ones). 4: activations quantized to int8 per "
    "block of 8 (16 at 2 bits) for decode rows of 2- and 4-bit layers: faster decode on CPU, but no longer HQQ's result. validate "
    "reports how far a lossy level moved.",
)
@click.option(
    "--with-kernels/--no-kernels",
    default=None,
    help="Copy the compiled kernel library (built if needed, see `hqexport kernels build`) into OUT and name it in "
    "genai_config.json, so onnxruntime (once registered) and onnxruntime-genai run each hqexport op as one fast "
    "kernel. Default: yes when the graph has hqexport ops and the library builds on this machine. The library is "
    "for this OS, CPU family and onnxruntime: --no-kernels for a folder that goes elsewhere (web, mobile, another "
    "OS), where the ops run as their ONNX function bodies (stock onnxruntime ops: exact for float32 layers, lossy "
    "for float16 / bfloat16 ones, which MatMulNBits computes in fp32).",
)
@click.option(
    "--lm-head",
    type=click.Choice(options.LM_HEADS),
    default="fp32",
    show_default=True,
    help="fp32: the fp lm_head keeps its exact values: a fp32 MatMul, or, when the folder ships the kernels, the "
    "same values in fewer bytes where a smaller form holds them all: int8 codes x one scale per 32 inputs (GGUF Q8_0 "
    "sources), else float16 or bfloat16 (checkpoints stored in those dtypes). int8 / int4: "
    "requantize it with hqq (group 64, its default) to pick 32 candidate tokens per position whose logits are then recomputed "
    "from the fp rows (lossy; faster decode: the head is most of what a small model's decode step reads; the fp "
    "table stays in the file, in the smallest of those forms that holds it). validate measures the loss.",
)
@click.option("--dtype", type=click.Choice(options.DTYPES), default="fp32", show_default=True, help="dtype of activations and fp weights.")
@click.option("--opset", type=int, help="ONNX opset (default 20; 18-23).")
@click.option("--force", is_flag=True, help="Replace OUT if it holds an earlier hqexport output.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
def convert(
    source: Path, out: Path, adapters: tuple[str, ...], adapter_mode: str | None, adapter_dtype: str, ops: str,
    accuracy_level: str, with_kernels: bool | None, lm_head: str, dtype: str, opset: int | None, force: bool, as_json: bool,
) -> None:
    """Export an HQQ model folder (and its LoRA adapters) to an ONNX folder.

    Writes model.onnx + model.onnx.data, adapters/NAME.onnx_adapter, the tokenizer files, config.json (the
    architecture, without the quantization settings), genai_config.json and hqexport.json (the manifest:
    versions, checksums, the op chosen per layer, adapters).
    """
    from hqexport.conversion import convert as run_convert

    summary = run_convert(
        source, out, dtype=dtype, opset=opset, ops=ops, accuracy_level=int(accuracy_level), lm_head=lm_head,
        with_kernels=with_kernels, adapters=adapters, adapter_mode=adapter_mode, adapter_dtype=adapter_dtype, force=force,
        progress=not as_json,
    )
    if as_json:
        click.echo(json.dumps(summary.to_dict(), indent=2))
    else:
        op_counts = ", ".join(f"{count} {op}" for op, count in summary.ops.items())
        adapters_note = f", adapters: {', '.join(summary.adapters)}" if summary.adapters else ""
        kernels_note = f", kernels: {summary.kernels} (this platform only; --no-kernels for others)" if summary.kernels else ""
        head_note = f", lm_head {summary.lm_head}" if summary.lm_head != "fp32" else ""
        click.echo(
            f"Wrote {summary.out}: {summary.architecture}, {summary.quantized_layers} quantized layers ({op_counts})"
            f"{head_note}{adapters_note}{kernels_note}, {summary.onnx_bytes / 1e6:.2f} MB in {summary.seconds:.1f} s"
        )


@main.command()
@click.option("--tokens", type=int, default=16, show_default=True, help="Greedy tokens to generate.")
def demo(tokens: int) -> None:
    """Build the bundled sample HQQ model, convert it, and generate with onnxruntime next to PyTorch."""
    from hqexport.demo import run_demo

    if not run_demo(tokens=tokens):
        sys.exit(1)


@main.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--reference", type=click.Path(path_type=Path), help="HQQ source folder (default: the one in hqexport.json).")
@click.option("--provider", type=click.Choice(options.PROVIDERS), default="cpu", show_default=True)
@click.option("--prompts", type=click.Path(path_type=Path), help="Text file with one prompt per line.")
@click.option("--tokens", type=int, default=16, show_default=True, help="Greedy tokens generated per prompt.")
@click.option("--adapter", help="Also check this adapter (a name from hqexport.json, or 'all').")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write the full report as JSON here.")
def validate(out: Path, reference: Path | None, provider: str, prompts: Path | None, tokens: int, adapter: str | None, json_path: Path | None) -> None:
    """Check that an exported folder computes what its HQQ source computes (exit 1 when a check fails).

    onnxruntime runs the folder as its users do: with the kernels library the folder ships, or, in a folder without
    one, the hqexport ops' ONNX function bodies."""
    from hqexport.validation import read_prompts
    from hqexport.validation import validate as run_validate
    from hqexport.validation.report import render, write_json

    report = run_validate(out, reference=reference, provider=provider, prompts=read_prompts(prompts), tokens=tokens, adapter=adapter)
    render(report)
    if json_path is not None:
        write_json(report, json_path)
    if not report.passed:
        sys.exit(1)


@main.group()
def kernels() -> None:
    """The compiled HQQMatMul kernels (onnxruntime custom-op library): build it, or show where it is."""


@kernels.command("build")
@click.option("--force", is_flag=True, help="Rebuild even if the cached library matches the sources.")
def kernels_build(force: bool) -> None:
    """Build the library (headers from ORT_INCLUDE_DIR or Debian's libonnxruntime-dev) and print its path."""
    from hqexport.kernels import build

    path = build.build_library(force=force)
    click.echo(f"CPU kernel: {path}")
    if build.with_cuda():
        click.echo("CUDA kernel: built into the library (CUDAExecutionProvider)")
    elif build.nvcc() is not None:
        click.echo(f"CUDA kernel: compile check only, no CUDA EP in this onnxruntime ({build.cuda_compile_check()})")
    else:
        click.echo("CUDA kernel: not built (nvcc not found)")


@kernels.command("path")
def kernels_path() -> None:
    """Print the library's path; exit 1 if it is not built for the current sources."""
    from hqexport.kernels import library_path

    path = library_path()
    if path is None:
        click.echo("hqexport: the kernels library is not built; run `hqexport kernels build`", err=True)
        sys.exit(1)
    click.echo(str(path))


if __name__ == "__main__":  # pragma: no cover
    main()

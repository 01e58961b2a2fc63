"""The `hqexport` command line: a thin click layer over the pipeline stages.

A user mistake (HQExportError) prints one line on stderr and exits 2; a failed validation exits 1.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from hqexport import __version__
from hqexport.errors import HQExportError


class _Group(click.Group):
    """Turns our errors into one line and exit code 2 instead of a traceback."""

    def invoke(self, ctx: click.Context):  # noqa: D102
        try:
            return super().invoke(ctx)
        except HQExportError as error:
            click.echo(f"hqexport: error: {error}", err=True)
            sys.exit(error.exit_code)


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


if __name__ == "__main__":  # pragma: no cover
    main()

"""Show a Report: a rich table on screen, and JSON with every figure and threshold."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from hqexport.validation.result import CheckResult, Report

_STYLE = {"PASS": "bold green", "FAIL": "bold red", "NOT CHECKED": "yellow"}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _headline(check: CheckResult) -> str:
    """The figures a reader wants first, per check."""
    f = check.figures
    keys = {
        "weights": ("exact", "lowered_within_tolerance", "layers"),
        "per-layer": ("max_relative", "first_divergent_block"),
        "logits": ("relative", "cosine", "top1_agreement"),
        "generation": ("identical", "tokens"),
        "perplexity": ("reference", "onnx", "relative_difference"),
        "adapter": ("relative", "cosine", "adapter_effect_relative"),
    }.get(check.name.split(":")[0], ())
    return "\n".join(f"{key} {_fmt(f[key])}" for key in keys if key in f)


def render(report: Report, console: Console | None = None) -> None:
    console = console or Console(stderr=False)
    table = Table(title=f"hqexport validate {report.folder} ({report.dtype}, {report.provider})", show_lines=True)
    table.add_column("check")
    table.add_column("figures")
    table.add_column("threshold")
    table.add_column("result")
    table.add_column("details", overflow="fold")
    for check in report.checks:
        threshold = "\n".join(f"{key} {_fmt(value)}" for key, value in check.threshold.items())
        table.add_row(check.name, _headline(check), threshold, f"[{_STYLE[check.status]}]{check.status}[/]", check.message)
    console.print(table)
    for note in report.notes:
        console.print(f"[dim]note: {note}[/]")
    verdict = "[bold green]PASSED[/]" if report.passed else f"[bold red]FAILED[/] ({len(report.failed)} checks)"
    console.print(f"validation {verdict}; reference: {report.reference}")


def write_json(report: Report, path: Path) -> None:
    """Strict JSON: numpy values become Python ones, non-finite floats the strings "inf" / "nan"."""
    path.write_text(json.dumps(_plain(report.to_json()), indent=2, allow_nan=False))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return _plain(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)

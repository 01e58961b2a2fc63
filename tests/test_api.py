"""The Python API the CLI wraps: hqexport.convert and hqexport.validate, imported on first use."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import hqexport
from hqexport.errors import HQExportError


def test_convert_and_validate_from_python(hqq_source, tmp_path):
    """The README's notebook use: str paths in, a summary and a passing Report out, the same folder the CLI writes."""
    out = tmp_path / "out"
    summary = hqexport.convert(str(hqq_source("llama", nbits=4, group_size=32, axis=1)), str(out), progress=False)
    assert isinstance(summary, hqexport.ConvertSummary) and summary.out == out
    assert json.loads((out / "hqexport.json").read_text())["model"]["architecture"] == summary.architecture
    report = hqexport.validate(str(out), tokens=4, progress=None)
    assert isinstance(report, hqexport.Report) and report.passed, report.to_json()


def test_user_mistakes_raise_hqexport_error(tmp_path):
    with pytest.raises(HQExportError):
        hqexport.validate(tmp_path / "missing", progress=None)


def test_unknown_names_and_light_imports():
    """Only the public names resolve; importing hqexport or hqexport.kernels does not load torch."""
    with pytest.raises(AttributeError, match="has no attribute 'convertt'"):
        _ = hqexport.convertt
    code = "import sys, hqexport, hqexport.kernels; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"

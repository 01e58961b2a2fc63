"""hqexport demo: builds, converts and generates on the bundled sample; exit 0 only when the tokens match."""

from __future__ import annotations

import io

import numpy as np
from click.testing import CliRunner
from rich.console import Console

from hqexport.cli import main
from hqexport.demo import show_comparison
from hqexport.sample import build_tokenizer


def test_demo_command_matches_and_exits_zero():
    result = CliRunner().invoke(main, ["demo", "--tokens", "8"])
    assert result.exit_code == 0, result.output
    assert "MATCH" in result.output and "MISMATCH" not in result.output
    assert "PyTorch + hqq HQQLinear" in result.output and "onnxruntime" in result.output


def test_demo_reports_a_mismatch():
    """Different tokens must be reported and make the demo fail (the comparison is not a formality)."""
    out = io.StringIO()
    logits = np.zeros((2, 8), np.float32)
    matched = show_comparison(Console(file=out, width=120), build_tokenizer(), ([1, 2], logits), ([1, 3], logits, "onnxruntime"))
    assert matched is False
    assert "MISMATCH" in out.getvalue()

"""Smoke tests of the benchmark scripts: each runs on a tiny layer / model and writes the JSON rows it promises.

No speed is asserted (the machines are shared). What could fail is checked against independent facts: every
exact variant of a layer matches hqq's own dequantized weight, greedy tokens of the hqexport --ops auto export
through onnxruntime equal those of hqq's HQQLinear layers in PyTorch, and the bytes-per-token budget equals the
4-bit packing arithmetic of the model's config.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYER_VARIANTS = {
    "fp32 MatMul",
    "MatMulNBits float zp",
    "hqexport lowered acc0",
    "hqexport lowered acc4",
    "hqexport kernel acc0",
    "hqexport kernel acc4",
    "hqexport op, no folding",
    "hqexport op, folded",
}


def _run(script: str, *args: str) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]


def test_bench_layers_on_a_small_layer(tmp_path):
    out = tmp_path / "layers.json"
    _run("bench_layers.py", "--shapes", "64x128", "--out", str(out))
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert {(row["layer"], row["M"], row["variant"]) for row in rows} == {
        ("64x128", m, variant) for m in (1, 128) for variant in LAYER_VARIANTS
    }
    assert data["memory_bandwidth_gbs"] > 0
    for row in rows:
        assert row["ms"] > 0
        # accuracy level 4 quantizes the activations to int8; every other variant is exact up to fp32 rounding
        assert row["rel err"] < (2e-2 if row["variant"].endswith("acc4") else 1e-5), row


@pytest.fixture(scope="module")
def e2e(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("e2e")
    out = work / "e2e.json"
    _run(
        # float16: hqq's GPU default, whose exact export rounds each weight as hqq does (HQQMatMulNBits compute_dtype)
        "bench_e2e.py", "--tiny", "--compute-dtype", "float16", "--variants", "pytorch-hqq,builder-int4-acc1,hqexport-fp32,hqexport", "--prompt", "6",
        "--decode", "5", "--prefill", "12", "--rounds", "2", "--work", str(work / "models"), "--out", str(out),
    )
    return json.loads(out.read_text())


@pytest.mark.integration  # converts a model: runs in .ci/run's integration step
def test_bench_e2e_rows_and_targets(e2e):
    assert [row["variant"] for row in e2e["rows"]] == ["pytorch-hqq", "builder-int4-acc1", "hqexport-fp32", "hqexport"]
    for row in e2e["rows"]:
        assert row["decode tok/s ort"] > 0 and row["prefill ms"] > 0 and row["peak MiB"] >= 0
        if row["variant"] != "pytorch-hqq":  # ONNX folders also run through onnxruntime-genai
            assert row["decode tok/s genai"] > 0 and row["file MB"] > 0 and row["nodes/layer"] > 0 and row["build s"] > 0
    targets = {target["target"]: target for target in e2e["targets"]}
    measured = targets["exact decode vs builder int4 acc1 (onnxruntime)"]
    assert measured["measured"] > 0 and measured["reached"] in ("yes", "no")
    assert targets["lossy int4 decode vs builder int4 (onnxruntime)"]["measured"] is None  # those variants were not run
    interleaved = e2e["interleaved_prefill"]  # the default and the fp32 export alternated in one process
    ratios = sorted(theirs / mine for mine, theirs in interleaved["pairs_ms"])
    assert len(ratios) == 12 and interleaved["ratio"] == pytest.approx((ratios[5] + ratios[6]) / 2)
    assert targets["exact prefill vs our fp32 export (interleaved, one process)"]["measured"] == interleaved["ratio"]
    builder = e2e["build"]["variants"]["builder-int4-acc1"]
    assert "onnxruntime_genai.models.builder" in builder["command"] and "accuracy_level=1" in builder["command"]
    assert e2e["load_average"]["start"] and e2e["settings"]["cpu_count"] > 0 and e2e["settings"]["compute_dtype"] == "float16"
    assert "float16 compute" in e2e["model"]
    for variant, result in e2e["variants"].items():  # the table's timing is the median of the interleaved rounds
        decode_rounds = sorted(run["decode_ms"] for run in result["rounds"])
        assert len(decode_rounds) == 2 and result["decode_ms"] == pytest.approx(sum(decode_rounds) / 2), variant


@pytest.mark.integration  # converts a model: runs in .ci/run's integration step
def test_bench_e2e_exact_tokens_equal_hqq_pytorch_in_both_runtimes(e2e):
    """The exact exports (hqexport's and our fp32 graph of hqq's dequantized weights) decode PyTorch-hqq's tokens,
    through onnxruntime and through onnxruntime-genai."""
    variants = e2e["variants"]
    reference = variants["pytorch-hqq"]["tokens"]
    assert len(reference) == 6  # the prompt's next token + 5 decode steps
    for variant in ("hqexport", "hqexport-fp32"):
        assert variants[variant]["tokens"] == reference, variant
        assert variants[variant]["genai_tokens"] == reference, variant


@pytest.mark.integration  # converts three models: runs in .ci/run's integration step
def test_bench_adapters_rows_and_adapter_semantics(tmp_path):
    """Per case: the five variants and the switch row; with the adapter active the separate export decodes the
    baked export's tokens, inactive it decodes the base export's, and the adapter changes them."""
    out = tmp_path / "adapters.json"
    _run("bench_adapters.py", "--tiny", "--rounds", "1", "--out", str(out))
    data = json.loads(out.read_text())
    rows = {(row["case"], row["variant"]): row for row in data["rows"]}
    for case, results in data["cases"].items():
        assert {variant for (name, variant) in rows if name == case} == {"base", "inactive", "active", "active fp16", "baked", "switch"}
        assert results["active"]["tokens"] == results["baked"]["tokens"]
        assert results["inactive"]["tokens"] == results["base"]["tokens"]
        assert results["base"]["tokens"] != results["baked"]["tokens"], case
        assert rows[(case, "base")]["decode vs base"] == 1 and rows[(case, "active")]["decode ms"] > 0
        assert results["active fp16"]["tokens"] != results["base"]["tokens"], case  # fp16 factors: the adapter still acts
        assert results["switch"]["load_ms"] > 0 and results["switch"]["activate_ms"] > 0


@pytest.mark.integration  # headless Chromium per row: runs in .ci/run's integration step (after npm ci in samples/js)
def test_bench_web_rows(tmp_path):
    """A row per variant and WASM thread count; the two exact exports (kernels folder, --no-kernels) decode the
    same tokens in the browser."""
    out = tmp_path / "web.json"
    _run("bench_web.py", "--tiny", "--decode", "3", "--rounds", "1", "--threads", "1", "--variants", "hqexport,hqexport-portable", "--out", str(out))
    data = json.loads(out.read_text())
    assert [(row["variant"], row["backend"]) for row in data["rows"]] == [("hqexport", "wasm 1 thread"), ("hqexport-portable", "wasm 1 thread")]
    assert all(row["decode ms"] > 0 for row in data["rows"])
    tokens = {name: variant["tokens"] for name, variant in data["variants"].items()}
    assert len(tokens["hqexport wasm 1"]) == 4 and tokens["hqexport wasm 1"] == tokens["hqexport-portable wasm 1"]

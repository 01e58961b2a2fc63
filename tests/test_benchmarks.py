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
        "bench_e2e.py", "--tiny", "--variants", "pytorch-hqq,hqexport-auto", "--prompt", "6", "--decode", "5",
        "--prefill", "12", "--repeats", "2", "--work", str(work / "models"), "--out", str(out),
    )
    return json.loads(out.read_text())


@pytest.mark.integration  # converts a model: runs in .ci/run's integration step
def test_bench_e2e_rows_and_targets(e2e):
    assert [row["variant"] for row in e2e["rows"]] == ["pytorch-hqq", "hqexport-auto"]
    for row in e2e["rows"]:
        assert row["decode tok/s"] > 0 and row["prefill ms"] > 0 and row["1-token ms"] > 0 and row["file MB"] > 0
        assert row["peak MiB"] >= 0
    targets = {target["target"]: target for target in e2e["targets"]}
    assert set(targets) == {"decode vs ONNX fp32", "decode vs ORT HQQ quantizer", "decode vs PyTorch hqq", "decode vs bandwidth limit"}
    assert targets["decode vs PyTorch hqq"]["measured"] > 0 and targets["decode vs PyTorch hqq"]["reached"] in ("yes", "no")
    assert targets["decode vs ONNX fp32"]["measured"] is None  # that variant was not run
    convert = e2e["build"]["convert"]["auto"]
    assert convert["seconds"] > 0 and convert["process_peak_mib"] > 0
    assert e2e["load_average"]["start"] and e2e["settings"]["cpu_count"] > 0


@pytest.mark.integration  # converts a model: runs in .ci/run's integration step
def test_bench_e2e_onnx_tokens_equal_hqq_pytorch(e2e):
    tokens = {variant: result["tokens"] for variant, result in e2e["variants"].items()}
    assert len(tokens["pytorch-hqq"]) == 6  # the prompt's next token + 5 decode steps
    assert tokens["hqexport-auto"] == tokens["pytorch-hqq"]


@pytest.mark.integration  # converts a model: runs in .ci/run's integration step
def test_bench_e2e_bytes_per_token_match_the_config(e2e):
    config = json.loads((Path(e2e["source"]) / "config.json").read_text())
    hidden, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    head_dim = hidden // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head_dim
    per_layer = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden), (inter, hidden), (inter, hidden), (hidden, inter)]
    group = 32  # the tiny sample's hqq group size
    quantized = config["num_hidden_layers"] * sum(n * k // 2 + 2 * 4 * n * k // group for n, k in per_layer)  # 4-bit + fp32 scale, zero
    norms = (2 * config["num_hidden_layers"] + 1) * hidden * 4
    lm_head = 0 if config.get("tie_word_embeddings") else vocab * hidden * 4
    embedding_read = vocab * hidden * 4 if config.get("tie_word_embeddings") else hidden * 4
    assert e2e["bytes_per_token"] == {
        "quantized": quantized, "fp": norms + lm_head + embedding_read, "total": quantized + norms + lm_head + embedding_read
    }

"""The exact int8 head: an fp lm_head that is int8 codes x one scale per 32 inputs (GGUF Q8_0) is stored as that grid.

The grids here are made with numpy the way GGUF's Q8_0 makes them (fp16 scale = block max / 127, codes rounded), and
every check compares against that table: the exported codes and scales multiply back to it bit for bit, the
embedding reads the same rows, and validate holds the export to the exact thresholds.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from hqexport.conversion import convert
from hqexport.lower import exact_int8_head
from hqexport.read.source import read_source
from hqexport.sample import build_sample_model, save_hqq_pickle
from hqexport.validation import validate
from hqexport.validation.blocks import with_extra_outputs
from hqexport.validation.onnx_session import OnnxDecoder
from tests.conftest import FORMATS, assert_embedding_gathers, assert_shortlist_rows, assert_validates_as_exact


def q8_0_grid(table: np.ndarray) -> np.ndarray:
    """`table` [rows, K] as GGUF's Q8_0 stores it, dequantized to fp32: per 32 values d = fp16(max|x| / 127),
    q = int8(round(x / d)), value = q * d (no -0.0: the codes are integers)."""
    blocks = table.reshape(-1, 32).astype(np.float32)
    d = (np.abs(blocks).max(axis=1, keepdims=True) / 127).astype(np.float16).astype(np.float32)
    q = np.round(blocks / np.where(d == 0, 1, d)).astype(np.int8)
    return (q * d).astype(np.float32).reshape(table.shape)


@pytest.mark.parametrize("check_rows", [4096, 7])  # one chunk of rows, or 46 with a partial last one
def test_only_an_exact_grid_is_taken(hqq_source, monkeypatch, check_rows):
    monkeypatch.setattr("hqexport.lower.lm_head.GRID_CHECK_ROWS", check_rows)
    qmodel = read_source(hqq_source("llama", "pickle", tie_word_embeddings=True, **FORMATS["4bit"]))
    key = "model.embed_tokens.weight"
    random_table = qmodel.tensors[key].clone()
    assert exact_int8_head(qmodel, tied=True) is None  # random fp32 values are no grid

    grid = q8_0_grid(random_table.numpy())
    grid[3, :32] = 0.0  # an all-zero block has scale 0
    qmodel.tensors[key] = torch.from_numpy(grid)
    layer = exact_int8_head(qmodel, tied=True)
    assert layer is not None and layer.fmt.nbits == 8 and layer.fmt.group_size == 32 and layer.fmt.axis == 1
    codes = layer.packed.numpy().astype(np.float32).reshape(grid.shape)  # 8-bit hqq packing: one code per byte
    zero = layer.zero.numpy().reshape(grid.shape[0], -1, 1)
    scale = layer.scale.numpy().reshape(grid.shape[0], -1, 1)
    weight = ((codes.reshape(grid.shape[0], -1, 32) - zero) * scale).reshape(grid.shape)
    np.testing.assert_array_equal(weight.view(np.uint32), grid.view(np.uint32))

    last = grid.shape[0] - 1  # in the last (partial) chunk when check_rows is 7
    for row, col, value in ((5, 7, np.nextafter(grid[5, 7], np.float32(np.inf))), (6, 0, np.float32(-0.0)),
                            (last, 40, np.nextafter(grid[last, 40], np.float32(-np.inf)))):
        off = grid.copy()
        off[row, col] = value  # one ulp off the grid; a -0.0 that (code - 128) * scale cannot give
        if value == 0:
            off[row, 1:32] = 0.0
        qmodel.tensors[key] = torch.from_numpy(off)
        assert exact_int8_head(qmodel, tied=True) is None


@pytest.fixture(scope="module")
def grid_source(tmp_path_factory, tokenizer):
    """Factory: a tiny llama whose embedding (tied) or lm_head (untied) is a Q8_0 grid, saved by hqq."""

    def make(tied: bool) -> Path:
        model = build_sample_model("llama", vocab_size=tokenizer.vocab_size, tie_word_embeddings=tied, **FORMATS["4bit"])
        head = model.get_output_embeddings().weight
        with torch.no_grad():
            head.copy_(torch.from_numpy(q8_0_grid(head.numpy())))
        return save_hqq_pickle(model, tmp_path_factory.mktemp(f"grid-{tied}") / "model", tokenizer)

    return make


@pytest.mark.parametrize("tied", [True, False])
def test_default_export_stores_the_exact_grid(grid_source, tmp_path, tied, library):
    source = grid_source(tied)
    table = read_source(source).tensors["model.embed_tokens.weight" if tied else "lm_head.weight"].numpy()
    out = tmp_path / "out"
    convert(source, out, progress=False)
    manifest = json.loads((out / "hqexport.json").read_text())
    expected = {"format": "int8-exact", "lossy": False, "group_size": 32, "op": "hqexport.HQQMatMulNBits"}
    assert manifest["model"]["lm_head"] == {**expected, **({"shared_with_embedding": True} if tied else {})}
    assert manifest["model"]["lossy"] == []

    model = onnx.load(str(out / "model.onnx"))
    initializers = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    head = next(n for n in model.graph.node if n.op_type == "HQQMatMulNBits" and n.input[1].startswith("lm_head"))
    vocab, hidden = table.shape
    codes = initializers[head.input[1]].reshape(vocab, hidden // 32, 32).astype(np.float32)
    zero_points = initializers[head.input[3]].reshape(vocab, hidden // 32, 1).astype(np.float32)
    scales = initializers[head.input[2]].reshape(vocab, hidden // 32, 1)
    weight = ((codes - zero_points) * scales).reshape(vocab, hidden)
    np.testing.assert_array_equal(weight.view(np.uint32), table.view(np.uint32))
    assert not initializers[head.input[5]].any()  # integer zero points: the correction is zero
    assert ("model.embed_tokens.weight" in initializers) == (not tied)
    if tied:  # the embedding gathers the same rows, exactly
        assert_embedding_gathers(out, table, next(n.output[0] for n in reversed(model.graph.node) if n.name.startswith("/model/embed_tokens/")))
    assert_validates_as_exact(out)


def test_the_grid_stays_exact_at_accuracy_level_4(grid_source, tmp_path, library):
    """--accuracy-level 4 quantizes the activations of 2- and 4-bit layers only: the kernel computes the 8-bit grid
    in fp32, so the head's logits are the hidden state times the table (numpy, float64) to fp32 rounding."""
    source = grid_source(True)
    table = read_source(source).tensors["model.embed_tokens.weight"].numpy().astype(np.float64)
    out = tmp_path / "out"
    convert(source, out, progress=False, accuracy_level=4)
    manifest = json.loads((out / "hqexport.json").read_text())
    assert manifest["model"]["lm_head"]["format"] == "int8-exact" and manifest["model"]["lossy"] == ["accuracy_level 4"]
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    head = next(n for n in model.graph.node if n.op_type == "HQQMatMulNBits" and n.input[1].startswith("lm_head"))
    decoder = OnnxDecoder(out, "cpu", model=with_extra_outputs(model, [head.input[0]], 1))
    step = decoder.step(np.array([[3]]), decoder.empty_cache(1, 2, table.shape[1] // 4))  # one row: the decode path
    hidden = step.extras[head.input[0]][0].astype(np.float64)
    expected = hidden @ table.T
    bound = 8 * np.finfo(np.float32).eps * (np.abs(hidden) @ np.abs(table).T)
    assert np.all(np.abs(step.logits[0] - expected) <= bound)


@pytest.mark.parametrize("options", [{"with_kernels": False}, {"ops": "hqq"}])
def test_the_grid_needs_the_library_and_the_exact_lowering(grid_source, tmp_path, options, library):
    """Without the library the fused node would run as MatMulNBits' slow 8-bit fp32 path; --ops hqq writes no fused
    node: each keeps the fp32 head."""
    out = tmp_path / "out"
    convert(grid_source(True), out, progress=False, **options)
    assert json.loads((out / "hqexport.json").read_text())["model"]["lm_head"] == {"format": "fp32", "lossy": False}
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert "model.embed_tokens.weight" in {t.name for t in model.graph.initializer}


@pytest.mark.parametrize("tied", [True, False])
def test_a_lossy_head_rescores_its_shortlist_from_the_grid(grid_source, tmp_path, tied):
    """--lm-head int4 draws the shortlist; the fp rows it rescores (and a tied embedding's) come from the int8 grid,
    the same values in a quarter of the fp table's bytes, which is no longer in the file."""
    source = grid_source(tied)
    key = "model.embed_tokens.weight" if tied else "lm_head.weight"
    table = read_source(source).tensors[key].float().numpy()
    out = tmp_path / "out"
    convert(source, out, progress=False, lm_head="int4")
    head = json.loads((out / "hqexport.json").read_text())["model"]["lm_head"]
    assert head["format"] == "int4" and head["rows"] == "int8-exact"
    initializers = {t.name: t for t in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.initializer}
    assert key not in initializers
    assert_shortlist_rows(out, table)
    if tied:
        assert_embedding_gathers(out, table, "/model/embed_tokens/GatherBlockQuantized/output_0")
        report = validate(out, prompts=["The old man"], tokens=4, progress=None)  # the reference's embedding: the same rows
        assert report.passed, [(check.name, check.message) for check in report.checks if not check.passed]

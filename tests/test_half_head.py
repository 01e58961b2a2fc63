"""The half-width exact head: an fp lm_head whose values are all float16 (or bfloat16) numbers is stored in that dtype.

hqexport.HalfMatMul (ops/half.py) is checked against numpy in float64, through the library's kernel and through
its ONNX function body; the export keeps the table's values bit for bit (the initializer widened equals the
source table), the embedding reads the same rows, and validate holds it to the exact thresholds.
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from hqexport.conversion import convert
from hqexport.lower import exact_half_head
from hqexport.lower.lm_head import HALF_HEAD_FORMATS
from hqexport.ops import attach_function, register_schema
from hqexport.read.source import read_source
from hqexport.sample import build_sample_model, save_hqq_pickle
from tests.conftest import FORMATS, assert_embedding_gathers, assert_shortlist_rows, assert_validates_as_exact

HALF_DTYPES = {"float16": (np.float16, TensorProto.FLOAT16), "bfloat16": (ml_dtypes.bfloat16, TensorProto.BFLOAT16)}


def half_matmul_model(W: np.ndarray) -> onnx.ModelProto:
    """One HalfMatMul node, A [batch, sequence, K] -> Y, W an initializer."""
    register_schema()
    N, K = W.shape
    node = helper.make_node("HalfMatMul", ["A", "W"], ["Y"], domain="hqexport", N=N, K=K)
    graph = helper.make_graph([node], "half", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["batch", "sequence", K])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], [numpy_helper.from_array(W, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("hqexport", 1)], ir_version=10)
    attach_function(model)
    return model


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("shape", [(37, 13), (100, 576), (9, 8)])
def test_half_matmul_is_the_widened_product(dtype, shape, library):
    """Kernel (decode rows and the panel GEMM) and function body: A @ float(W)^T to fp32 summation rounding."""
    N, K = shape
    rng = np.random.default_rng(N * K)
    W = rng.standard_normal(shape).astype(HALF_DTYPES[dtype][0])
    wide = W.astype(np.float64)
    model = half_matmul_model(W).SerializeToString()
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(library))
    sessions = {"kernel": ort.InferenceSession(model, options, providers=["CPUExecutionProvider"]),
                "body": ort.InferenceSession(model, providers=["CPUExecutionProvider"])}
    for M in (1, 3, 4, 7, 130):
        A = rng.standard_normal((1, M, K)).astype(np.float32)
        expected = A.astype(np.float64) @ wide.T
        bound = 2 * K * np.finfo(np.float32).eps * (np.abs(A).astype(np.float64) @ np.abs(wide).T)
        for name, session in sessions.items():
            got = session.run(None, {"A": A})[0]
            assert got.dtype == np.float32 and got.shape == (1, M, N), name
            assert np.all(np.abs(got - expected) <= bound), (name, M)


def test_half_matmul_refuses_a_float32_matrix(library):
    W = np.ones((4, 8), np.float32)
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(library))
    session = ort.InferenceSession(half_matmul_model(W).SerializeToString(), options, providers=["CPUExecutionProvider"])
    with pytest.raises(Exception, match="W must be float16 or bfloat16"):
        session.run(None, {"A": np.ones((1, 1, 8), np.float32)})


def test_only_a_table_of_half_values_is_taken(hqq_source, monkeypatch):
    monkeypatch.setattr("hqexport.lower.lm_head.GRID_CHECK_ROWS", 7)  # several chunks of rows, a partial last one
    qmodel = read_source(hqq_source("llama", "pickle", tie_word_embeddings=True, **FORMATS["4bit"]))
    key = "model.embed_tokens.weight"
    table = qmodel.tensors[key].clone()
    assert table.dtype == torch.float32 and exact_half_head(qmodel, tied=True) is None  # random fp32 values

    qmodel.tensors[key] = table.to(torch.float16).float()
    assert exact_half_head(qmodel, tied=True) == torch.float16
    qmodel.tensors[key] = table.to(torch.bfloat16).float() * 2.0**20  # bfloat16 values past float16's range
    assert exact_half_head(qmodel, tied=True) == torch.bfloat16
    qmodel.tensors[key] = table.to(torch.bfloat16)  # stored as bfloat16 already
    assert exact_half_head(qmodel, tied=True) == torch.bfloat16

    last = table.shape[0] - 1
    for row, value in ((2, float("nan")), (last, float(np.nextafter(np.float32(1.0), np.float32(2.0))))):
        off = table.to(torch.float16).float()
        off[row, 3] = value  # one value no half dtype holds, in the first or the last chunk
        qmodel.tensors[key] = off
        assert exact_half_head(qmodel, tied=True) is None


@pytest.fixture(scope="module")
def half_source(tmp_path_factory, tokenizer):
    """Factory: a tiny llama whose embedding (tied) or lm_head (untied) holds float16 or bfloat16 values, saved by hqq."""

    def make(tied: bool, dtype: torch.dtype) -> Path:
        model = build_sample_model("llama", vocab_size=tokenizer.vocab_size, tie_word_embeddings=tied, **FORMATS["4bit"])
        head = model.get_output_embeddings().weight
        with torch.no_grad():
            head.copy_(head.to(dtype).float())
            if dtype == torch.bfloat16:
                head[0, 0] = 2.0**-30  # below float16's smallest subnormal: only bfloat16 holds it
        return save_hqq_pickle(model, tmp_path_factory.mktemp(f"half-{tied}-{dtype}".replace("torch.", "")) / "model", tokenizer)

    return make


@pytest.mark.parametrize(("tied", "dtype"), [(True, torch.float16), (False, torch.float16), (True, torch.bfloat16)])
def test_default_export_stores_the_head_in_its_half_dtype(half_source, tmp_path, tied, dtype, library):
    source = half_source(tied, dtype)
    table = read_source(source).tensors["model.embed_tokens.weight" if tied else "lm_head.weight"].float().numpy()
    out = tmp_path / "out"
    convert(source, out, progress=False)
    manifest = json.loads((out / "hqexport.json").read_text())
    expected = {"format": "fp16-exact" if dtype == torch.float16 else "bf16-exact", "lossy": False, "op": "hqexport.HalfMatMul"}
    assert manifest["model"]["lm_head"] == {**expected, **({"shared_with_embedding": True} if tied else {})}
    assert manifest["model"]["lossy"] == []

    model = onnx.load(str(out / "model.onnx"))
    initializers = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    head = next(n for n in model.graph.node if n.op_type == "HalfMatMul")
    stored = initializers[head.input[1]]
    assert stored.dtype == (np.float16 if dtype == torch.float16 else ml_dtypes.bfloat16)
    np.testing.assert_array_equal(stored.astype(np.float32).view(np.uint32), table.view(np.uint32))
    assert (head.input[1] == "model.embed_tokens.weight") == tied
    if tied:  # the embedding gathers the same rows, widened exactly
        assert_embedding_gathers(out, table, next(n.output[0] for n in model.graph.node if n.name == "/model/embed_tokens/Cast"))
    assert_validates_as_exact(out)


@pytest.mark.parametrize("options", [{"with_kernels": False}, {"ops": "hqq"}, {"lm_head": "int8"}])
def test_the_half_head_needs_the_library_and_the_fp32_choice(half_source, tmp_path, options, library):
    """Without the library the node would run its body (the fp32 head, in more memory); --ops hqq keeps the fp32
    head as it keeps every layer's own op; a lossy --lm-head quantizes instead."""
    out = tmp_path / "out"
    convert(half_source(True, torch.float16), out, progress=False, **options)
    head = json.loads((out / "hqexport.json").read_text())["model"]["lm_head"]
    assert head["format"] == options.get("lm_head", "fp32")
    assert not any(n.op_type == "HalfMatMul" for n in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node)


@pytest.mark.parametrize(("tied", "dtype"), [(True, torch.float16), (False, torch.bfloat16)])
def test_a_lossy_head_rescores_its_shortlist_from_the_half_table(half_source, tmp_path, tied, dtype):
    """--lm-head int4 draws the shortlist; the fp rows it rescores (and a tied embedding's) come from the table
    stored in its half dtype, widened exactly."""
    source = half_source(tied, dtype)
    key = "model.embed_tokens.weight" if tied else "lm_head.weight"
    table = read_source(source).tensors[key].float().numpy()
    out = tmp_path / "out"
    convert(source, out, progress=False, lm_head="int4")
    head = json.loads((out / "hqexport.json").read_text())["model"]["lm_head"]
    assert head["format"] == "int4" and head["rows"] == HALF_HEAD_FORMATS[dtype]
    initializers = {t.name: t for t in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.initializer}
    assert initializers[key].data_type == (TensorProto.FLOAT16 if dtype == torch.float16 else TensorProto.BFLOAT16)
    assert_shortlist_rows(out, table)
    if tied:
        assert_embedding_gathers(out, table, "/model/embed_tokens/Cast/output_0")

"""hqexport.GridShortlist (ops/shortlist.py), through the library's kernel and through its ONNX function body, against
numpy: the entries it recomputes are TopK's (ties to the lower index), each the float64 dot product of X with the
grid's row to fp32 summation rounding; every other entry is the input logit bit for bit."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from hqexport.ops import attach_function, register_schema

BLOCK = 32


def grid_shortlist_model(codes: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, k: int) -> bytes:
    """One GridShortlist node over the grid's initializers; logits and X are inputs [batch, sequence, ...]."""
    register_schema()
    vocab, hidden = codes.shape
    node = helper.make_node("GridShortlist", ["logits", "X", "codes", "scales", "zero_points"], ["Y"], domain="hqexport",
                            name="shortlist", k=k, block_size=BLOCK)
    inputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", vocab]),
              helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", "sequence", hidden])]
    initializers = [numpy_helper.from_array(array, name) for name, array in
                    (("codes", codes), ("scales", scales), ("zero_points", zero_points))]
    graph = helper.make_graph([node], "shortlist", inputs, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", "sequence", vocab])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("hqexport", 1)], ir_version=10)
    attach_function(model)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def grid(vocab: int, hidden: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An int8 grid as lower/lm_head.py stores one: codes q + 128, one fp32 scale and zero point 128 per block."""
    codes = rng.integers(1, 256, (vocab, hidden), dtype=np.uint8)
    scales = (rng.random((vocab, hidden // BLOCK)) * 0.02 + 1e-3).astype(np.float32)
    return codes, scales, np.full((vocab, hidden // BLOCK), 128, np.uint8)


def kernel_session(model: bytes, library) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(library))
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("k, ties", [(32, False), (32, True), (1, True), (300, False)])
def test_grid_shortlist_recomputes_topks_entries(library, k, ties):
    vocab, hidden = 300, 96
    rng = np.random.default_rng(k + ties)
    codes, scales, zero_points = grid(vocab, hidden, rng)
    rows = ((codes.astype(np.float32) - zero_points.repeat(BLOCK, axis=1)) * scales.repeat(BLOCK, axis=1)).astype(np.float64)
    model = grid_shortlist_model(codes, scales, zero_points, k)
    shape = (2, 5)
    # with ties: a few distinct values, so the k-th largest is shared by many entries and the lower indices win
    logits = (rng.integers(0, 12, (*shape, vocab)) if ties else rng.standard_normal((*shape, vocab))).astype(np.float32)
    X = rng.standard_normal((*shape, hidden)).astype(np.float32)
    chosen = np.argsort(-logits, axis=-1, kind="stable")[..., :k]  # TopK's entries: larger first, then lower index
    picked = np.zeros(logits.shape, bool)
    np.put_along_axis(picked, chosen, True, axis=-1)
    dots = X.astype(np.float64) @ rows.T
    bound = 2 * hidden * np.finfo(np.float32).eps * (np.abs(X).astype(np.float64) @ np.abs(rows).T)
    for name, session in {"kernel": kernel_session(model, library), "body": ort.InferenceSession(model, providers=["CPUExecutionProvider"])}.items():
        got = session.run(None, {"logits": logits, "X": X})[0]
        assert got.shape == logits.shape and got.dtype == np.float32, name
        np.testing.assert_array_equal(got[~picked], logits[~picked], err_msg=name)
        assert np.all(np.abs(got[picked] - dots[picked]) <= bound[picked]), name
        assert not np.array_equal(got[picked], logits[picked]), name  # they really were recomputed


def test_grid_shortlist_kernel_names_a_bad_input(library):
    """A grid whose scales do not match its codes: one error naming the node and the shapes."""
    rng = np.random.default_rng(0)
    codes, scales, zero_points = grid(40, 64, rng)
    model = grid_shortlist_model(codes, scales[:, :1], zero_points, 4)
    session = kernel_session(model, library)
    feeds = {"logits": np.zeros((1, 1, 40), np.float32), "X": np.zeros((1, 1, 64), np.float32)}
    with pytest.raises(Exception, match=r"GridShortlist node 'shortlist': scales of shape \[40, 1\], expected \[40, 2\]"):
        session.run(None, feeds)

"""hqexport::HQQMatMul: numpy reference, ONNX function body in stock onnxruntime, onnx.reference, torch op.

Every layer is quantized by real hqq; the independent references are hqq's own dequantize() and forward.
"""

from __future__ import annotations

import functools
import zlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from hqexport.formats import numpy_dtype, pack_canonical, tensor_to_numpy
from hqexport.model import QuantizedLinear
from hqexport.ops import (
    DOMAIN,
    OP_TYPE,
    HQQMatMulRun,
    attach_function,
    dequantize_canonical,
    hqq_matmul_function,
    hqq_matmul_reference,
    op_inputs,
    register_schema,
)
from hqexport.ops.function import MAX_OPSET, MIN_OPSET
from hqexport.read.meta import layer_from_meta

NBITS = (8, 6, 5, 4, 3, 2, 1.58, 1)
AXES = (0, 1)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SHAPES = ((24, 40, 8), (16, 72, 16))  # (N, K, group_size); 72 / 16: groups straddle rows
ONNX_ACT = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16}
CASES = [
    pytest.param(nbits, axis, dtype, shape, id=f"{nbits:g}bit-axis{axis}-{dtype}-{shape[0]}x{shape[1]}g{shape[2]}")
    for nbits in NBITS
    for axis in AXES
    for dtype in DTYPES
    for shape in SHAPES
]

register_schema()


@functools.cache
def hqq_layer(nbits: float, axis: int, dtype: str, shape: tuple[int, int, int]) -> tuple[HQQLinear, QuantizedLinear]:
    """A real hqq layer (with bias on the first shape only) and what the readers make of it."""
    n, k, group = shape
    torch.manual_seed(zlib.crc32(repr((nbits, axis, dtype, shape)).encode()))
    linear = torch.nn.Linear(k, n, bias=shape == SHAPES[0])
    config = BaseQuantizeConfig(nbits=nbits, group_size=group, axis=axis)
    hqq = HQQLinear(linear, config, compute_dtype=DTYPES[dtype], device="cpu")
    return hqq, layer_from_meta("layer", hqq.W_q.data, hqq.meta, hqq.bias)


def numpy_inputs(layer: QuantizedLinear, act: np.dtype) -> tuple[dict[str, np.ndarray | None], dict[str, int]]:
    return op_inputs(layer, act)


def op_model(
    layers: list[tuple[dict[str, np.ndarray | None], dict[str, int]]],
    act: np.dtype,
    opset: int = 20,
    rank: int = 3,
    function: bool = True,
) -> onnx.ModelProto:
    """One HQQMatMul node per layer, all reading the graph input A [..., K] (of the given rank): outputs Y0, Y1..."""
    k = layers[0][1]["K"]
    a_shape = [f"d{i}" for i in range(rank - 1)] + [k]
    nodes, outputs, initializers = [], [], []
    for index, (tensors, attrs) in enumerate(layers):
        names = [key for key in ("weight", "scale", "zero", "bias") if tensors[key] is not None]
        initializers += [numpy_helper.from_array(tensors[key], f"{key}{index}") for key in names]
        node_inputs = ["A"] + [f"{key}{index}" for key in names]
        nodes.append(helper.make_node(OP_TYPE, node_inputs, [f"Y{index}"], domain=DOMAIN, **attrs))
        outputs.append(helper.make_tensor_value_info(f"Y{index}", ONNX_ACT[act], a_shape[:-1] + [attrs["N"]]))
    a_info = helper.make_tensor_value_info("A", ONNX_ACT[act], a_shape)
    graph = helper.make_graph(nodes, "hqq_matmul", [a_info], outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
    if function:
        attach_function(model)
    else:
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return model


def run_ort(model: onnx.ModelProto, a: np.ndarray, disabled: list[str], input_name: str = "A") -> list[np.ndarray]:
    session = ort.InferenceSession(
        model.SerializeToString(), providers=["CPUExecutionProvider"], disabled_optimizers=disabled
    )
    return session.run(None, {input_name: a})


def activations(k: int, act: np.dtype) -> list[np.ndarray]:
    """M = 1 and M = 7, plus the identity: Y = dequant(W)^T exactly, whatever the matmul order. All [1, M, K]."""
    rng = np.random.default_rng(k)
    return [
        rng.standard_normal((1, 1, k)).astype(act),
        rng.standard_normal((1, 7, k)).astype(act),
        np.eye(k, dtype=act)[None],
    ]


def is_identity(a: np.ndarray) -> bool:
    return a.shape[-2] == a.shape[-1]


@functools.cache
def hqq_weight(hqq: HQQLinear) -> torch.Tensor:
    with torch.no_grad():
        return hqq.dequantize()


def expected(hqq: HQQLinear, a: np.ndarray) -> np.ndarray:
    """A @ hqq.dequantize()^T (+ bias) in float64 from A's dtype, independent of our code."""
    weight = tensor_to_numpy(hqq_weight(hqq)).astype(a.dtype).astype(np.float64)
    out = a.astype(np.float64) @ weight.T
    if hqq.bias is not None:
        out += tensor_to_numpy(hqq.bias).astype(a.dtype).astype(np.float64)
    return out


def assert_close(actual: np.ndarray, want: np.ndarray, act: np.dtype) -> None:
    """Within rounding of the matmul (a few ulp of the output scale)."""
    assert actual.dtype == act and actual.shape == want.shape
    ulp = np.finfo(act).eps * max(1.0, float(np.abs(want).max())) * np.sqrt(want.shape[-1] if want.ndim else 1)
    np.testing.assert_allclose(actual.astype(np.float64), want, rtol=0, atol=8 * ulp)


@pytest.mark.parametrize("nbits, axis, dtype, shape", CASES)
def test_numpy_reference_matches_hqq(nbits, axis, dtype, shape):
    hqq, layer = hqq_layer(nbits, axis, dtype, shape)
    tensors, attrs = numpy_inputs(layer, np.dtype(np.float32))
    weight = dequantize_canonical(tensors["weight"], tensors["scale"], tensors["zero"], **attrs)
    want = tensor_to_numpy(hqq_weight(hqq))
    assert weight.dtype == numpy_dtype(DTYPES[dtype])
    assert np.array_equal(weight.view(np.uint8), want.view(np.uint8)), "dequantized weight not bit-identical to hqq"
    for act in (np.dtype(np.float32), np.dtype(np.float16)):
        tensors, attrs = numpy_inputs(layer, act)
        for a in activations(layer.in_features, act):
            got = hqq_matmul_reference(a, tensors["weight"], tensors["scale"], tensors["zero"], tensors["bias"], **attrs)
            if is_identity(a) and hqq.bias is None:
                assert np.array_equal(got, expected(hqq, a).astype(act))
            else:
                assert_close(got, expected(hqq, a), act)


def layers_of(dtype: str, shape: tuple[int, int, int]) -> list[tuple[str, HQQLinear, QuantizedLinear]]:
    return [(f"{nbits:g}bit axis{axis}", *hqq_layer(nbits, axis, dtype, shape)) for nbits in NBITS for axis in AXES]


@pytest.mark.parametrize(
    "shape, act",
    [(SHAPES[0], np.dtype(np.float32)), (SHAPES[1], np.dtype(np.float32)), (SHAPES[1], np.dtype(np.float16))],
    ids=lambda v: f"A-{v}" if isinstance(v, np.dtype) else f"{v[0]}x{v[1]}g{v[2]}",
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_function_body_in_onnxruntime(dtype, shape, act):
    """Every nbits and axis in one model (one session per option set keeps this fast)."""
    layers = layers_of(dtype, shape)
    inputs = [numpy_inputs(layer, act) for _, _, layer in layers]
    model = op_model(inputs, act)
    onnx.checker.check_model(model, full_check=True)
    failures = []
    for disabled in ([], ["ConstantFolding"]):
        for a in activations(shape[1], act):
            for (label, _, _), (tensors, attrs), got in zip(layers, inputs, run_ort(model, a, disabled)):
                ref = hqq_matmul_reference(a, tensors["weight"], tensors["scale"], tensors["zero"], tensors["bias"], **attrs)
                try:
                    if is_identity(a):  # the dequantized weight itself (+ bias, one rounding): bit for bit
                        np.testing.assert_array_equal(got, ref)
                    else:
                        assert_close(got, ref.astype(np.float64), act)
                except AssertionError as error:
                    failures.append(f"{label} M={a.shape[-2]} disabled={disabled}: {error}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}g{s[2]}")
@pytest.mark.parametrize("dtype", DTYPES)
def test_onnx_reference_evaluator(dtype, shape):
    layers = layers_of(dtype, shape)
    act = np.dtype(np.float32)
    a = activations(shape[1], act)[1]
    for function in (False, True):  # new_ops must win over the model-local function
        model = op_model([numpy_inputs(layer, act) for _, _, layer in layers], act, function=function)
        for (label, hqq, _), got in zip(layers, ReferenceEvaluator(model, new_ops=[HQQMatMulRun]).run(None, {"A": a})):
            assert_close(got, expected(hqq, a), act)


def test_missing_bias_and_grouping_edge_cases():
    """G == 1 (one group for the whole weight) on both axes, K not a multiple of the codes per word."""
    rng = np.random.default_rng(1)
    for bits, axis in ((4, 0), (3, 1), (1, 0), (2, 1)):
        n, k = 2, 7 if bits != 1 else 8
        codes = rng.integers(0, 2**bits, (n, k)).astype(np.uint8)
        scale = np.full((1, 1), 0.25, np.float16)
        zero = np.full((1, 1), 1.5, np.float16)
        tensors = {"weight": pack_canonical(codes, bits), "scale": scale, "zero": zero, "bias": None}
        attrs = {"N": n, "K": k, "bits": bits, "group_size": n * k, "axis": axis}
        model = op_model([(tensors, attrs)], np.dtype(np.float32), rank=2)
        onnx.checker.check_model(model, full_check=True)
        got = run_ort(model, np.eye(k, dtype=np.float32), [])[0]
        want = ((codes.astype(np.float16) - zero) * scale).astype(np.float32).T
        assert np.array_equal(got, want)


@pytest.mark.parametrize("opset", range(MIN_OPSET, MAX_OPSET + 1))
def test_function_opsets(opset):
    hqq, layer = hqq_layer(3, 0, "bf16", SHAPES[0])
    tensors, attrs = numpy_inputs(layer, np.dtype(np.float32))
    model = op_model([(tensors, attrs)], np.dtype(np.float32), opset=opset)
    onnx.checker.check_model(model, full_check=True)
    eye = np.eye(layer.in_features, dtype=np.float32)[None]
    want = hqq_matmul_reference(eye, tensors["weight"], tensors["scale"], tensors["zero"], tensors["bias"], **attrs)
    assert np.array_equal(run_ort(model, eye, ["ConstantFolding"])[0], want)


def test_function_and_schema_contract():
    register_schema()  # idempotent
    assert onnx.defs.get_schema(OP_TYPE, 1, DOMAIN).name == OP_TYPE
    with pytest.raises(ValueError, match="opset"):
        hqq_matmul_function(MIN_OPSET - 1)
    plain = helper.make_model(
        helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [], []),
        opset_imports=[helper.make_opsetid("", 20)],
    )
    attach_function(plain)
    assert not plain.functions and [o.domain for o in plain.opset_import] == [""]
    hqq, layer = hqq_layer(4, 1, "fp32", SHAPES[0])
    model = op_model([numpy_inputs(layer, np.dtype(np.float32))], np.dtype(np.float32))
    attach_function(model)  # a second call replaces, never duplicates
    assert len(model.functions) == 1 and sum(o.domain == DOMAIN for o in model.opset_import) == 1

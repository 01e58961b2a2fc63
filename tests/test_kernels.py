"""The compiled hqexport::HQQMatMul kernels against hqq's own dequantize() (float64 matmul), and their failure modes.

The library is built once per session (cached by source hash). Without onnxruntime's headers (no ORT_INCLUDE_DIR
and Debian unreachable) the build fails and so do these tests, with the builder's message.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import zlib
from functools import cache
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
from onnx import TensorProto, helper, numpy_helper

from hqexport.formats import pack_canonical, storage_bits, tensor_to_numpy, unpack_codes
from hqexport.kernels import build
from hqexport.ops.function import attach_function
from hqexport.read.live import layer_from_meta

NBITS = (8, 6, 5, 4, 3, 2, 1.58, 1)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
#: (N, K, group size for axis 1, group size for axis 0). hqq wants group sizes that are multiples of 8 and packs
#: along the groups, so axis-1 group counts must be multiples of 8 too. K=52 leaves a partial word at 1 and 3 bits
#: and its axis-1 groups (104) straddle rows; 37x64 has an odd N
SHAPES = {"48x52": (48, 52, 104, 8), "37x64": (37, 64, 8, 16)}
ROWS = (1, 7, 128)
_ONNX_TYPE = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16}


@pytest.fixture(scope="module", autouse=True)
def nvcc_check(tmp_path_factory):
    """Starts the nvcc compile check in the background so it overlaps the CPU tests (test_cuda_source_compiles)."""
    compiler = build.nvcc()
    if compiler is None:
        yield None
        return
    out = tmp_path_factory.mktemp("cuda") / "hqq_matmul.o"
    # PTX for sm_90 only: every template is instantiated and compiled by the front end and NVVM, at a third of the
    # cost of the full build's SASS + PTX targets
    command = [compiler, "-std=c++17", "-O3", "-gencode=arch=compute_90,code=compute_90", "-Xcompiler", "-fPIC"]
    command += [f"-I{build.HERE / 'src'}", "-c", str(build.CUDA_SOURCE), "-o", str(out)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    yield process, out
    if process.poll() is None:
        process.kill()
        process.wait()


@cache
def hqq_layer(nbits: float, axis: int, dtype: str, shape: str) -> HQQLinear:
    n, k, g1, g0 = SHAPES[shape]
    torch.manual_seed(zlib.crc32(repr((nbits, axis, dtype, shape)).encode()))
    linear = torch.nn.Linear(k, n, bias=True)
    config = BaseQuantizeConfig(nbits=nbits, group_size=g1 if axis == 1 else g0, axis=axis)
    return HQQLinear(linear, config, compute_dtype=DTYPES[dtype], device="cpu")


def op_tensors(layer: HQQLinear) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """The op's canonical inputs and attributes for an hqq layer (hqq codes -> pack_canonical)."""
    q = layer_from_meta("layer", layer.W_q.data, layer.meta, layer.bias)
    bits = storage_bits(q.fmt)
    codes = unpack_codes(q.packed.numpy(), q.out_features, q.in_features, q.fmt)
    tensors = {"W": pack_canonical(codes, bits), "scale": tensor_to_numpy(q.scale), "zero": tensor_to_numpy(q.zero)}
    attrs = {"N": q.out_features, "K": q.in_features, "bits": bits, "group_size": q.fmt.group_size, "axis": q.fmt.axis}
    return tensors, attrs


def reference_weight(layer: HQQLinear) -> torch.Tensor:
    """hqq's own dequantized weight [N, K] in the layer's compute dtype."""
    with torch.no_grad():
        return layer.dequantize().reshape(layer.meta["shape"])


def single_node_model(tensors: dict[str, np.ndarray], attrs: dict[str, int], act: np.dtype, bias: np.ndarray | None = None) -> onnx.ModelProto:
    initializers = [numpy_helper.from_array(array, name) for name, array in tensors.items()]
    inputs = ["A", *tensors]
    if bias is not None:
        initializers.append(numpy_helper.from_array(bias, "bias"))
        inputs.append("bias")
    node = helper.make_node("HQQMatMul", inputs, ["Y"], domain="hqexport", name="hqq0", **attrs)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("A", _ONNX_TYPE[act], ["M", attrs["K"]])],
        [helper.make_tensor_value_info("Y", _ONNX_TYPE[act], ["M", attrs["N"]])], initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("hqexport", 1)])
    model.ir_version = 10
    return model


def session(model: onnx.ModelProto, library: Path, **options) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.register_custom_ops_library(str(library))
    for key, value in options.items():
        setattr(so, key, value)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def assert_close(y: np.ndarray, a: np.ndarray, w: np.ndarray, bias: np.ndarray | None) -> None:
    """y vs A @ W^T (+ bias) in float64; allowed error: K * eps32 * (|A| @ |W|^T), plus fp16's last rounding."""
    a64, w64 = a.astype(np.float64), w.astype(np.float64)
    ref = a64 @ w64.T + (0.0 if bias is None else bias.astype(np.float64))
    bound = a.shape[-1] * np.finfo(np.float32).eps * (np.abs(a64) @ np.abs(w64).T) + 1e-30
    if y.dtype == np.float16:
        bound = bound + np.abs(ref) * 2.0**-11 + 2.0**-25
    excess = np.abs(y.astype(np.float64) - ref) / bound
    assert excess.max() <= 1.0, f"error {excess.max():.2f} x the bound at {np.unravel_index(excess.argmax(), y.shape)}"


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("axis", [1, 0])
@pytest.mark.parametrize("nbits", NBITS)
def test_cpu_kernel_matches_hqq(library: Path, nbits: float, axis: int, dtype: str, shape: str) -> None:
    layer = hqq_layer(nbits, axis, dtype, shape)
    tensors, attrs = op_tensors(layer)
    weight = reference_weight(layer)
    rng = np.random.default_rng(7)
    # fp32 activations for every compute dtype; fp16 activations for the fp16 layers (with a bias)
    acts = [np.dtype(np.float32)] + ([np.dtype(np.float16)] if dtype == "fp16" else [])
    for act in acts:
        w = weight.to(torch.float16 if act == np.float16 else torch.float32).float().numpy().astype(act)
        bias = layer.bias.detach().float().numpy().astype(act) if (act == np.float16 or nbits in (4, 3)) else None
        sess = session(single_node_model(tensors, attrs, act, bias), library)
        for m in ROWS:
            a = rng.standard_normal((m, attrs["K"])).astype(act)
            y = sess.run(None, {"A": a})[0]
            assert y.shape == (m, attrs["N"]) and y.dtype == act
            assert_close(y, a, w, bias)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("axis", [1, 0])
@pytest.mark.parametrize("nbits", NBITS)
def test_dequantized_weight_is_bit_identical(library: Path, nbits: float, axis: int, dtype: str) -> None:
    """The kernel's dequantization (exported as hqexport_dequantize) against hqq.dequantize(), bit for bit."""
    lib = ctypes.CDLL(str(library))
    lib.hqexport_dequantize.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int] * 2 + [ctypes.c_int64] * 5 + [ctypes.c_void_p]
    layer = hqq_layer(nbits, axis, dtype, "48x52")
    tensors, attrs = op_tensors(layer)
    meta_type = {"fp32": 1, "fp16": 10, "bf16": 16}[dtype]
    for act, act_type in ((torch.float32, 1), (torch.float16, 10)):
        out = np.empty((attrs["N"], attrs["K"]), dtype=np.float32)
        arrays = [np.ascontiguousarray(tensors[name]) for name in ("W", "scale", "zero")]
        status = lib.hqexport_dequantize(
            *(array.ctypes.data for array in arrays), meta_type, act_type,
            *(attrs[key] for key in ("N", "K", "bits", "group_size", "axis")), out.ctypes.data,
        )
        assert status == 0
        expected = reference_weight(layer).to(act).float().numpy()
        np.testing.assert_array_equal(out.view(np.uint32), expected.view(np.uint32))


#: (nbits, group size) of layers [22, 1280] axis 1 that take the factorized M < 4 path (fp32, groups of whole
#: 8-word blocks: 64 codes at 1 bit, 32 at 2, 80 at 3, 16 at 4, 8 at 8); N = 22 leaves a 2-row remainder
FACTORIZED = [(nbits, 320) for nbits in NBITS] + [(4, 16), (4, 64), (2, 32), (1, 64), (8, 8)]


@pytest.mark.parametrize(("nbits", "group_size"), FACTORIZED)
def test_factorized_gemv_matches_hqq(library: Path, nbits: float, group_size: int) -> None:
    torch.manual_seed(zlib.crc32(repr((nbits, group_size)).encode()))
    linear = torch.nn.Linear(1280, 22, bias=True)
    config = BaseQuantizeConfig(nbits=nbits, group_size=group_size, axis=1)
    layer = HQQLinear(linear, config, compute_dtype=torch.float32, device="cpu")
    tensors, attrs = op_tensors(layer)
    weight = reference_weight(layer).numpy()
    bias = layer.bias.detach().numpy()
    sess = session(single_node_model(tensors, attrs, np.dtype(np.float32), bias), library)
    # tighter than assert_close: s * sum(A q) - s * z * sum(A) rounds terms up to |q s| <= |w| + |z s| each
    n, k = weight.shape
    zs = np.repeat(np.abs(tensors["zero"] * tensors["scale"]).reshape(n, k // group_size), group_size, axis=1)
    rng = np.random.default_rng(3)
    for m in (1, 2, 3):
        a = rng.standard_normal((m, k)).astype(np.float32)
        y = sess.run(None, {"A": a})[0].astype(np.float64)
        ref = a.astype(np.float64) @ weight.astype(np.float64).T + bias
        terms = np.abs(a).astype(np.float64) @ (np.abs(weight) + 2 * zs).T + np.abs(bias)
        bound = 64 * np.finfo(np.float32).eps * terms
        excess = np.abs(y - ref) / bound
        assert excess.max() <= 1.0, f"M={m}: error {excess.max():.2f} x the bound"


#: (nbits, group size, K) of the GEMM test: K in three chunks. Groups of 40 keep k's natural order; groups of
#: whole 8-word blocks take word order (cpu_kernel.cpp's KOrder), whose chunks start on whole blocks
GEMM_CASES = [(4, 40, 2600), (4, 64, 2624), (2, 64, 2624), (1, 64, 2624)]


@pytest.mark.parametrize(("nbits", "group_size", "k"), GEMM_CASES)
def test_gemm_over_k_chunks_and_partial_panels(library: Path, nbits: int, group_size: int, k: int) -> None:
    """The M >= 4 GEMM splits K into three chunks whose tiles add up in Y, packs A into panels of 8 rows (M <= 8)
    or 16 (M > 8, here with a partial last panel), and leaves a 2-row tile at N = 104."""
    torch.manual_seed(11)
    linear = torch.nn.Linear(k, 104, bias=True)
    config = BaseQuantizeConfig(nbits=nbits, group_size=group_size, axis=1)
    layer = HQQLinear(linear, config, compute_dtype=torch.float32, device="cpu")
    tensors, attrs = op_tensors(layer)
    bias = layer.bias.detach().numpy()
    sess = session(single_node_model(tensors, attrs, np.dtype(np.float32), bias), library)
    rng = np.random.default_rng(5)
    for m in (5, 29):
        a = rng.standard_normal((m, attrs["K"])).astype(np.float32)
        assert_close(sess.run(None, {"A": a})[0], a, reference_weight(layer).numpy(), bias)


def test_leading_dims_and_absent_bias(library: Path) -> None:
    layer = hqq_layer(4, 1, "fp32", "48x52")
    tensors, attrs = op_tensors(layer)
    model = single_node_model(tensors, attrs, np.dtype(np.float32))
    model.graph.input[0].CopyFrom(helper.make_tensor_value_info("A", TensorProto.FLOAT, [2, 3, attrs["K"]]))
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2, 3, attrs["N"]]))
    a = np.random.default_rng(1).standard_normal((2, 3, attrs["K"])).astype(np.float32)
    y = session(model, library).run(None, {"A": a})[0]
    assert y.shape == (2, 3, attrs["N"])
    assert_close(y.reshape(6, -1), a.reshape(6, -1), reference_weight(layer).numpy(), None)


def test_kernel_takes_precedence_over_the_function_body(library: Path, tmp_path: Path) -> None:
    """A model carrying the op's FunctionProto runs the library's kernel when the library is registered."""
    layer = hqq_layer(4, 1, "fp32", "48x52")
    tensors, attrs = op_tensors(layer)
    model = single_node_model(tensors, attrs, np.dtype(np.float32))
    attach_function(model)
    sess = session(model, library, enable_profiling=True, profile_file_prefix=str(tmp_path / "profile"))
    a = np.random.default_rng(2).standard_normal((3, attrs["K"])).astype(np.float32)
    y = sess.run(None, {"A": a})[0]
    events = json.loads(Path(sess.end_profiling()).read_text())
    kernels = {e["args"]["op_name"] for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")}
    assert kernels == {"HQQMatMul"}
    assert_close(y, a, reference_weight(layer).numpy(), None)


def _malformed(tensors: dict[str, np.ndarray], attrs: dict[str, int], case: str) -> onnx.ModelProto:
    tensors, attrs = dict(tensors), dict(attrs)
    if case == "bits 5":
        attrs["bits"] = 5
    elif case == "axis 2":
        attrs["axis"] = 2
    elif case == "missing group_size":
        del attrs["group_size"]
    elif case == "W shape vs N":
        attrs["N"] += 1
    elif case == "W shape vs bits":
        attrs["bits"] = 2
    elif case == "scale numel":
        tensors["scale"] = tensors["scale"][:-1]
        tensors["zero"] = tensors["zero"][:-1]
    elif case == "zero dtype":
        tensors["zero"] = tensors["zero"].astype(np.float16)
    elif case == "W dtype":
        tensors["W"] = tensors["W"].astype(np.uint16)
    return single_node_model(tensors, attrs, np.dtype(np.float32))


@pytest.mark.parametrize(
    "case",
    ["bits 5", "axis 2", "missing group_size", "W shape vs N", "W shape vs bits", "scale numel", "zero dtype", "W dtype"],
)
def test_malformed_node_raises(library: Path, case: str) -> None:
    layer = hqq_layer(4, 1, "fp32", "48x52")
    tensors, attrs = op_tensors(layer)
    a = np.ones((2, attrs["K"]), dtype=np.float32)
    with pytest.raises(Exception, match="HQQMatMul|hqq0") as raised:
        session(_malformed(tensors, attrs, case), library).run(None, {"A": a})
    assert not isinstance(raised.value, AssertionError)
    # the process survived and the library still works
    y = session(single_node_model(tensors, attrs, np.dtype(np.float32)), library).run(None, {"A": a})[0]
    assert_close(y, a, reference_weight(layer).numpy(), None)


def test_cuda_source_compiles(nvcc_check) -> None:
    if nvcc_check is None:
        if os.environ.get("HQEXPORT_REQUIRE_NVCC") == "1":
            pytest.fail("HQEXPORT_REQUIRE_NVCC=1 but nvcc was not found (set CUDA_HOME or put nvcc on PATH)")
        pytest.skip("nvcc not found: the CUDA kernel's compile check needs the CUDA toolkit")
    process, out = nvcc_check
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, f"nvcc failed:\n{output}"
    assert out.stat().st_size > 0

"""MatMulNBits lowering: stock onnxruntime output vs hqq's own forward, and the rules for what stays."""

from __future__ import annotations

import ctypes
import json
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

from hqexport.errors import HQExportError
from hqexport.formats import pack_canonical, storage_bits, tensor_to_numpy, unpack_codes
from hqexport.lower import LowerToMatMulNBits
from hqexport.ops.function import attach_function
from hqexport.read.live import layer_from_meta

N, K, M = 48, 128, 5
_ROUNDING = {torch.float32: 0.0, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def _hqq_layer(nbits: float, group_size: int, axis: int, *, bias: bool = False, dtype=torch.float32, seed: int = 0, in_features: int = K,
               out_features: int = N):
    torch.manual_seed(seed)
    linear = torch.nn.Linear(in_features, out_features, bias=bias)
    return HQQLinear(linear, BaseQuantizeConfig(nbits=nbits, group_size=group_size, axis=axis), compute_dtype=dtype, device="cpu")


def _single_layer_model(hqq_layer: HQQLinear, name: str = "layer0") -> ir.Model:
    """A graph with one hqexport.HQQMatMul node holding the layer's canonical initializers."""
    layer = layer_from_meta(name, hqq_layer.W_q.data, hqq_layer.meta, hqq_layer.bias)
    bits, n, k = storage_bits(layer.fmt), layer.out_features, layer.in_features
    codes = unpack_codes(layer.packed.numpy(), n, k, layer.fmt)
    a = ir.val("A", ir.DataType.FLOAT, ["M", k])
    inputs = [a]
    for label, array in (
        ("weight", pack_canonical(codes, bits)),
        ("scale", tensor_to_numpy(layer.scale)),
        ("zero", tensor_to_numpy(layer.zero)),
    ) + ((("bias", layer.bias.float().numpy()),) if layer.bias is not None else ()):
        inputs.append(ir.Value(name=f"{name}.{label}", const_value=ir.tensor(array, name=f"{name}.{label}")))
    node = ir.node(
        "HQQMatMul", inputs,
        {"N": n, "K": k, "bits": bits, "group_size": layer.fmt.group_size, "axis": layer.fmt.axis},
        domain="hqexport", name=name,
    )
    node.outputs[0].name = "Y"
    node.outputs[0].dtype = ir.DataType.FLOAT
    graph = ir.Graph([a], node.outputs, nodes=[node], initializers=inputs[1:], opset_imports={"": 21, "hqexport": 1})
    return ir.Model(graph, ir_version=10)


def _session(model: ir.Model, library: Path | None = None, **options) -> ort.InferenceSession:
    """A CPU session of `model` with hqexport's function bodies attached (as write_onnx does), with the kernels
    library registered when given."""
    proto = ir.serde.serialize_model(model)
    attach_function(proto)
    so = ort.SessionOptions()
    if library is not None:
        so.register_custom_ops_library(str(library))
    for key, value in options.items():
        setattr(so, key, value)
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _run(model: ir.Model, x: np.ndarray, library: Path | None = None) -> np.ndarray:
    return _session(model, library).run(None, {"A": x})[0]


@pytest.mark.parametrize(
    "nbits, group_size, bias, dtype, in_features",
    [(4, 64, False, torch.float32, K), (4, 32, True, torch.float32, K), (2, 16, False, torch.float32, K),
     (8, 128, False, torch.float32, K), (3, 64, False, torch.float32, K), (1, 16, False, torch.float32, K),
     (4, 64, False, torch.float16, K), (4, 64, False, torch.bfloat16, K),
     # an odd number of groups per row: 4- and 2-bit zero points are padded to whole bytes row by row
     (4, 32, False, torch.float32, 96), (2, 16, False, torch.float32, 80)],
)
def test_lowered_layer_matches_hqq_forward(nbits, group_size, bias, dtype, in_features):
    hqq_layer = _hqq_layer(nbits, group_size, axis=1, bias=bias, dtype=dtype, in_features=in_features)
    lowering = LowerToMatMulNBits("ort")
    model = lowering(_single_layer_model(hqq_layer)).model
    assert [n.op_type for n in model.graph if n.domain == "hqexport"] == []
    assert lowering.decisions["layer0"].op == "com.microsoft.MatMulNBits"

    x = torch.randn(M, in_features)
    with torch.no_grad():
        weight = hqq_layer.dequantize().float()
        expected = (x.double() @ weight.double().T + (hqq_layer.bias.double() if bias else 0)).numpy()
    got = _run(model, x.numpy())
    # hqq rounds (q - z) and its product with s to the compute dtype; the lowering computes in fp32, so each
    # weight may differ by that rounding (2 x unit roundoff), fp32 rounding aside.
    bound = _ROUNDING[dtype] * (x.abs().double() @ weight.abs().double().T).numpy() + 2e-6 * np.abs(expected).max()
    assert np.all(np.abs(got - expected) <= bound)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
# 4 bits in groups of 64 and 128 take the kernel's weight tables, in groups of 32 its per-call ones
@pytest.mark.parametrize(
    ("nbits", "group_size", "integer_zeros"),
    [(4, 64, False), (4, 64, True), (4, 128, False), (4, 32, False), (2, 32, False), (3, 64, False), (8, 128, False)],
)
def test_fp16_and_bf16_layers_keep_hqqs_roundings_on_the_kernel(nbits, group_size, integer_zeros, dtype, library):
    """A float16 / bfloat16 layer becomes an HQQMatMulNBits node with its compute_dtype, even with integer zeros
    (where plain MatMulNBits would be exact for fp32): the kernel rounds each weight as hqq does, so decode rows and
    the panel GEMM are hqq's dequantized weight times A to fp32 summation error, not the dtype's rounding that
    the function body (MatMulNBits in fp32) may differ by."""
    hqq_layer = _hqq_layer(nbits, group_size, axis=1, dtype=dtype, seed=nbits)
    if integer_zeros:
        hqq_layer.meta["zero"] = torch.round(hqq_layer.meta["zero"]).clamp(0, 2**nbits - 1)
    lowering = LowerToMatMulNBits("auto")
    model = lowering(_single_layer_model(hqq_layer)).model
    (node,) = [n for n in model.graph if n.domain == "hqexport"]
    assert node.op_type == "HQQMatMulNBits" and node.attributes.get_int("compute_dtype") == int(ir.DataType.from_numpy(tensor_to_numpy(hqq_layer.meta["scale"]).dtype))
    with torch.no_grad():
        weight = hqq_layer.dequantize().double().numpy()
    for rows in (1, 3, 5):
        x = torch.randn(rows, K).numpy()
        got = _run(model, x, library).astype(np.float64)
        expected = x.astype(np.float64) @ weight.T
        bound = 2 * K * np.finfo(np.float32).eps * (np.abs(x).astype(np.float64) @ np.abs(weight).T)
        assert np.all(np.abs(got - expected) <= bound), rows
    # decode rows (3 at a time) of unit vectors pick single weights, which must be hqq's bit for bit
    unit = np.eye(K, dtype=np.float32)
    picked = np.concatenate([_run(model, unit[k : k + 3], library) for k in range(0, K, 3)])
    np.testing.assert_array_equal(picked, weight.T.astype(np.float32))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_accuracy_level_1_computes_fp16_and_bf16_weights_in_fp32(dtype, library):
    """--accuracy-level 1 (the explicit fp32-compute choice): the kernel skips hqq's roundings, so it computes what
    the function body computes, (q - z) * s in fp32 per weight, to fp32 summation error."""
    hqq_layer = _hqq_layer(4, 64, axis=1, dtype=dtype, seed=1)
    model = LowerToMatMulNBits("auto", accuracy_level=1)(_single_layer_model(hqq_layer)).model
    (node,) = [n for n in model.graph if n.domain == "hqexport"]
    assert node.attributes.get_int("accuracy_level") == 1
    scale = hqq_layer.meta["scale"].double().reshape(N, -1).repeat_interleave(64, dim=1).numpy()
    zero = hqq_layer.meta["zero"].double().reshape(N, -1).repeat_interleave(64, dim=1).numpy()
    codes = unpack_codes(hqq_layer.W_q.data.numpy(), N, K, layer_from_meta("l", hqq_layer.W_q.data, hqq_layer.meta, None).fmt)
    weight = (codes - zero) * scale  # unrounded
    for rows in (1, 5):
        x = torch.randn(rows, K).numpy().astype(np.float64)
        got = _run(model, x.astype(np.float32), library).astype(np.float64)
        bound = 4 * K * np.finfo(np.float32).eps * (np.abs(x) @ np.abs(weight).T)
        assert np.all(np.abs(got - x @ weight.T) <= bound), rows


def test_integer_zero_points_need_no_correction():
    hqq_layer = _hqq_layer(4, 64, axis=1)
    hqq_layer.meta["zero"] = torch.round(hqq_layer.meta["zero"]).clamp(0, 15)
    lowering = LowerToMatMulNBits("auto")
    model = lowering(_single_layer_model(hqq_layer)).model
    assert lowering.decisions["layer0"].zero_correction is False
    assert {n.op_type for n in model.graph} == {"MatMulNBits"}


@pytest.mark.parametrize(
    "nbits, group_size, axis, reason",
    [(4, 64, 0, "axis 0"), (4, 48, 1, "power of 2"), (4, 8, 1, "power of 2"), (5, 64, 1, None), (3, 32, 1, None)],
)
def test_what_can_be_lowered(nbits, group_size, axis, reason):
    hqq_layer = _hqq_layer(nbits, group_size, axis)
    auto = LowerToMatMulNBits("auto")
    auto(_single_layer_model(hqq_layer))
    decision = auto.decisions["layer0"]
    if reason is None:  # hqq's zeros are fractional: the fused node with its correction
        assert decision.op == "hqexport.HQQMatMulNBits" and decision.zero_correction
    else:
        assert decision.op == "hqexport.HQQMatMul" and reason in decision.reason
        with pytest.raises(HQExportError, match="cannot run as MatMulNBits"):
            LowerToMatMulNBits("ort")(_single_layer_model(hqq_layer))


#: (nbits, group size, K) through the fused node's kernel paths: factorized (4-bit g64, 8-bit, 3-bit in the 4-bit
#: container, 2-bit g32), dequantizing (2-bit and 1-bit g16: 16 codes are not whole 8-word blocks at 2 bits), and
#: odd block counts per row, whose zero points are padded to whole bytes (4-bit 96 / 32, 2-bit 80 / 16)
FUSED_CASES = [(4, 64, K), (4, 32, 96), (8, 128, K), (3, 64, K), (2, 32, K), (2, 16, 80), (1, 16, K)]


def _correction_as_input(model: ir.Model) -> np.ndarray:
    """Make layer0's zero_correction a graph input (not a constant the kernel can read when it is created); its value."""
    value = model.graph.initializers.pop("layer0.zero_correction")
    array = value.const_value.numpy()
    value.const_value = None
    value.type, value.shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape(array.shape)
    model.graph.inputs.append(value)
    return array


@pytest.mark.parametrize("runtime", ["function body", "kernel", "kernel, correction fed per call"])
@pytest.mark.parametrize("nbits, group_size, in_features", FUSED_CASES)
def test_fused_node_matches_hqq_forward(nbits, group_size, in_features, runtime, request):
    """--ops auto writes one HQQMatMulNBits node per layer; stock onnxruntime runs its body (MatMulNBits plus the
    zero-point correction) and the library its kernel, and both compute hqq's layer for decode and prefill rows.
    The kernel turns constant zero points and correction into HQQ's zeros once; fed per call, on every call."""
    hqq_layer = _hqq_layer(nbits, group_size, axis=1, bias=True, in_features=in_features, seed=nbits * 100 + group_size)
    lowering = LowerToMatMulNBits("auto")
    model = lowering(_single_layer_model(hqq_layer)).model
    assert lowering.decisions["layer0"].op == "hqexport.HQQMatMulNBits"
    assert [(n.domain, n.op_type) for n in model.graph] == [("hqexport", "HQQMatMulNBits"), ("", "Add")]  # + bias
    feeds = {"layer0.zero_correction": _correction_as_input(model)} if runtime.endswith("per call") else {}
    library = request.getfixturevalue("library") if runtime.startswith("kernel") else None
    session = _session(model, library)
    with torch.no_grad():
        weight = hqq_layer.dequantize().double()
    zero_scale = (hqq_layer.meta["zero"].double() * hqq_layer.meta["scale"].double()).abs()
    zero_scale = zero_scale.reshape(N, -1).repeat_interleave(group_size, dim=1)  # |z * s| of each weight's group
    for rows in (1, 3, 5, 64):  # the kernel's factorized decode path below 4 rows, its dequantizing path from 4
        x = torch.randn(rows, in_features, dtype=torch.float64)
        expected = (x @ weight.T + hqq_layer.bias.detach().double()).numpy()
        got = session.run(None, {"A": x.float().numpy(), **feeds})[0]
        # fp32 rounding: the kernel's factorized sum skips rounding (q - z) but its terms reach |w| + |z s|
        # (docs/kernels.md); the body's correction adds the same two-term form
        bound = 64 * np.finfo(np.float32).eps * (x.abs() @ (weight.abs() + 2 * zero_scale).T).numpy() + 1e-6
        assert np.all(np.abs(got - expected) <= bound), (rows, np.abs(got - expected).max())


def test_fused_node_runs_on_the_kernel_when_the_library_is_registered(library, tmp_path):
    """With the library the node is one kernel call (no MatMulNBits in the profile); without it, its body."""
    model = LowerToMatMulNBits("auto")(_single_layer_model(_hqq_layer(4, 64, axis=1))).model
    x = np.random.default_rng(0).standard_normal((1, K)).astype(np.float32)
    kernels = {}
    for runtime, lib in (("kernel", library), ("function body", None)):
        session = _session(model, lib, enable_profiling=True, profile_file_prefix=str(tmp_path / runtime.replace(" ", "_")))
        session.run(None, {"A": x})
        events = json.loads(Path(session.end_profiling()).read_text())
        kernels[runtime] = {event["args"]["op_name"] for event in events if event.get("cat") == "Node"}
    assert kernels["kernel"] == {"HQQMatMulNBits"}
    assert "MatMulNBits" in kernels["function body"] and "HQQMatMulNBits" not in kernels["function body"]


def test_fused_kernel_refuses_a_malformed_correction(library):
    """A zero_correction of the wrong shape is an onnxruntime error naming the node and the input, never a crash."""
    model = LowerToMatMulNBits("auto")(_single_layer_model(_hqq_layer(4, 64, axis=1))).model
    correction = model.graph.initializers["layer0.zero_correction"]
    correction.const_value = ir.tensor(np.zeros((K // 64, N + 1), np.float32), name=correction.name)
    correction.shape = ir.Shape([K // 64, N + 1])
    with pytest.raises(Exception, match=r"HQQMatMulNBits node 'layer0.*zero_correction of shape \[2, 49\]"):
        _run(model, np.zeros((1, K), np.float32), library)


def _runs_avx2(library: Path) -> bool:
    isa = ctypes.CDLL(str(library)).hqexport_cpu_isa
    isa.restype = ctypes.c_char_p
    return isa() == b"avx2"


def _int8_activation_reference(x: np.ndarray, hqq_layer: HQQLinear, group_size: int) -> np.ndarray:
    """What the kernel's int8 path computes, in float64 (docs/kernels.md): A rounded to int8 per block of one int32
    lane's inputs (8 in a 4-bit container, 16 in a 2-bit one; scale = max |A| / 127, fp32 as the kernel rounds it)
    times the codes times the scale, minus the zero term on A itself."""
    n = hqq_layer.out_features
    fmt = layer_from_meta("l", hqq_layer.W_q.data, hqq_layer.meta, None).fmt
    scale = hqq_layer.meta["scale"].double().reshape(n, -1).repeat_interleave(group_size, dim=1).numpy()
    zero = hqq_layer.meta["zero"].double().reshape(n, -1).repeat_interleave(group_size, dim=1).numpy()
    codes = unpack_codes(hqq_layer.W_q.data.numpy(), n, x.shape[1], fmt)
    container = 2 if fmt.nbits <= 2 else 4  # MatMulNBits' code width: 3-bit codes in 4 bits
    blocks = x.reshape(x.shape[0], -1, 32 // container)
    largest = np.abs(blocks).max(axis=-1, keepdims=True)
    inverse = np.where(largest > 0, np.float32(127) / np.where(largest > 0, largest, 1), 0).astype(np.float32)
    rounded = np.rint(blocks * inverse) * (largest / np.float32(127)).astype(np.float32)
    a = rounded.reshape(x.shape).astype(np.float64)
    return a @ (codes * scale).T - x.astype(np.float64) @ (zero * scale).T


#: (nbits, group size, K, int8 path): 4-bit chunks (64 codes) within a group or holding two (g32), 2-bit chunks (128
#: codes) likewise, 3-bit in the 4-bit container; 2-bit g32 (four groups per chunk), K not in whole chunks (96 at
#: 4 bits) and 8-bit codes keep fp32
INT8_CASES = [(4, 64, K, True), (4, 32, K, True), (4, 128, 256, True), (2, 128, 256, True), (2, 64, K, True),
              (3, 64, K, True), (2, 32, K, False), (4, 32, 96, False), (8, 64, K, False)]
#: the int8 path takes rows of W two at a time: an odd N leaves a task's last row alone (hqq packs odd N at 4 bits)
INT8_ODD_N = 45



@pytest.mark.parametrize("nbits, group_size, in_features, int8, out_features",
                         [(*case, N) for case in INT8_CASES] + [(4, 64, K, True, INT8_ODD_N), (4, 128, 256, True, INT8_ODD_N)])
def test_accuracy_level_4_kernel_quantizes_activations_to_int8(library, nbits, group_size, in_features, int8, out_features):
    """At accuracy level 4 the fused node's kernel computes decode rows (M < 4) from int8 activations where its
    int8 path applies, and exactly (fp32) elsewhere and from 4 rows on; the body runs MatMulNBits at level 4."""
    int8 = int8 and _runs_avx2(library)  # the library's baseline (pre-AVX2) build has no int8 path
    hqq_layer = _hqq_layer(nbits, group_size, axis=1, in_features=in_features, out_features=out_features, seed=7)
    lowering = LowerToMatMulNBits("auto", accuracy_level=4)
    model = lowering(_single_layer_model(hqq_layer)).model
    node = next(iter(model.graph))
    assert node.op_type == "HQQMatMulNBits" and node.attributes.get_int("accuracy_level") == 4
    assert lowering.decisions["layer0"].accuracy_level == 4
    kernel, body = _session(model, library), _session(model)
    exact_body = _session(LowerToMatMulNBits("auto")(_single_layer_model(hqq_layer)).model)
    with torch.no_grad():
        weight = hqq_layer.dequantize().double().numpy()
    fp32 = 64 * np.finfo(np.float32).eps
    for rows in (1, 3, 5):
        x = np.random.default_rng(rows).standard_normal((rows, in_features)).astype(np.float32)
        got = kernel.run(None, {"A": x})[0]
        exact = x.astype(np.float64) @ weight.T
        scale = np.abs(exact).max()
        if int8 and rows < 4:
            expected = _int8_activation_reference(x, hqq_layer, group_size)
            assert np.abs(got - expected).max() <= fp32 * scale  # the int8 computation, to fp32 rounding
            assert np.abs(got - exact).max() > 100 * fp32 * scale  # which is not the exact one
        else:
            assert np.abs(got - exact).max() <= fp32 * scale
        in_body = body.run(None, {"A": x})[0]  # stock MatMulNBits at level 4 loses about as much
        assert np.abs(in_body - exact).max() <= 0.05 * scale
        assert not np.array_equal(in_body, exact_body.run(None, {"A": x})[0])

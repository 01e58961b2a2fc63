"""The MLP's gating inside the packed gate/up node (lower/swiglu.py, ops/nbits.py), against numpy.

The reference is silu(gate) * up of hqq's own dequantized product (and LoRA branch) in float64; the node runs as the
compiled kernel (its dot-product path below 4 rows, its panel GEMM from 4) and as its function body in stock
onnxruntime, and the pass is checked to rewrite exactly the pattern export/graph.py writes.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from hqexport.adapters.fused import FusedGroup, FuseLora
from hqexport.lower import FuseSwiGLU, LowerToMatMulNBits
from tests.test_lora_fused import ROWS
from tests.test_lowering import K, _hqq_layer, _session, _single_layer_model

HALF = 20  # gate's columns (and up's): not a multiple of the kernel's 8 lanes, so the tail is exercised
RANK = 4


def _gated(model: ir.Model) -> ir.Model:
    """The graph's one node followed by the gating as export/graph.py writes it: Split, Sigmoid, Mul, Mul."""
    graph = model.graph
    product = graph.outputs[0]
    product.name = "product"
    sizes = ir.Value(name="sizes", const_value=ir.tensor(np.array([HALF, HALF], np.int64), name="sizes"))
    graph.register_initializer(sizes)
    split = ir.node("Split", [product, sizes], {"axis": -1}, num_outputs=2)
    gate, up = split.outputs
    sigmoid = ir.node("Sigmoid", [gate])
    silu = ir.node("Mul", [gate, sigmoid.outputs[0]])
    gated = ir.node("Mul", [silu.outputs[0], up])
    graph.extend([split, sigmoid, silu, gated])
    gated.outputs[0].name, gated.outputs[0].dtype = "Y", ir.DataType.FLOAT
    graph.outputs[0] = gated.outputs[0]
    return model


def _layer_model(lora: bool, seed: int) -> tuple[ir.Model, np.ndarray]:
    """A packed gate/up layer (N = 2 * HALF) as an HQQMatMulNBits[LoRA] node, and hqq's dequantized weight."""
    hqq_layer = _hqq_layer(4, 32, axis=1, seed=seed, out_features=2 * HALF)
    model = LowerToMatMulNBits("auto")(_single_layer_model(hqq_layer)).model
    if lora:
        node = next(iter(model.graph)).name
        group = FusedGroup("layer0", node, K, ("gate", "up"), ((0, HALF), (HALF, 2 * HALF)))
        FuseLora({node: group}, dtype=np.dtype(np.float32), baked=None)(model)
    return model, hqq_layer.dequantize().double().numpy()


def _factors(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "layer0.lora_A.weight": (rng.standard_normal((2 * RANK, K)) / K**0.5).astype(np.float32),
        "layer0.lora_B.weight": rng.standard_normal((2 * HALF, RANK)).astype(np.float32),
    }


def _expected(x: np.ndarray, weight: np.ndarray, factors: dict[str, np.ndarray] | None) -> np.ndarray:
    product = x @ weight.T
    if factors is not None:
        lora_a, lora_b = (factors[f"layer0.lora_{n}.weight"].astype(np.float64) for n in "AB")
        for segment in range(2):
            columns = slice(segment * HALF, (segment + 1) * HALF)
            product[:, columns] += (x @ lora_a[segment * RANK : (segment + 1) * RANK].T) @ lora_b[columns].T
    gate, up = product[:, :HALF], product[:, HALF:]
    return gate / (1 + np.exp(-gate)) * up


@pytest.mark.parametrize("lora", [False, True], ids=["HQQMatMulNBitsSwiGLU", "HQQMatMulNBitsLoRASwiGLU"])
@pytest.mark.parametrize("runtime", ["kernel", "function body"])
def test_gated_node_matches_numpy(lora, runtime, request):
    """One node computes silu(gate) * up of the layer's product, for decode and prefill row counts."""
    model, weight = _layer_model(lora, seed=3)
    fusion = FuseSwiGLU()
    fusion(_gated(model))
    op_type = "HQQMatMulNBitsLoRASwiGLU" if lora else "HQQMatMulNBitsSwiGLU"
    (node,) = model.graph
    assert node.op_type == op_type and fusion.fused == {node.name: op_type}
    library = request.getfixturevalue("library") if runtime == "kernel" else None
    session = _session(model, library)
    factors = _factors(seed=5) if lora else None
    for rows in ROWS:
        x = np.random.default_rng(rows).standard_normal((rows, K))
        got = session.run(None, {"A": x.astype(np.float32), **(factors or {})})[0]
        expected = _expected(x, weight, factors)
        assert got.shape == (rows, HALF)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
        if lora:  # the adapter's branch is inside the gated product
            assert np.abs(expected - _expected(x, weight, None)).max() > 0.1 * np.abs(expected).max()


def test_rank_0_gated_node_is_the_plain_gated_node_bit_for_bit(library):
    """With no adapter active, the LoRA form gives exactly the adapter-free node's output."""
    plain, _ = _layer_model(lora=False, seed=6)
    with_lora, _ = _layer_model(lora=True, seed=6)
    sessions = []
    for model in (plain, with_lora):
        FuseSwiGLU()(_gated(model))
        sessions.append(_session(model, library))
    for rows in ROWS:
        x = np.random.default_rng(rows).standard_normal((rows, K)).astype(np.float32)
        np.testing.assert_array_equal(*(session.run(None, {"A": x})[0] for session in sessions))


def test_gating_with_another_reader_is_left_alone():
    """When a half of the product is read elsewhere (here, a graph output), folding the gating would lose it."""
    model, _ = _layer_model(lora=False, seed=7)
    _gated(model)
    up = next(node for node in model.graph if node.op_type == "Split").outputs[1]
    up.name = "up"
    model.graph.outputs.append(up)
    fusion = FuseSwiGLU()
    result = fusion(model)
    assert not result.modified and not fusion.fused
    assert [node.op_type for node in model.graph] == ["HQQMatMulNBits", "Split", "Sigmoid", "Mul", "Mul"]


def test_uneven_split_is_left_alone():
    """A Split that is not two equal halves is not a gate/up pair."""
    model, _ = _layer_model(lora=False, seed=8)
    _gated(model)
    sizes = model.graph.initializers["sizes"]
    sizes.const_value = ir.tensor(np.array([HALF - 4, HALF + 4], np.int64), name="sizes")
    assert not FuseSwiGLU()(model).modified


def test_kernel_refuses_an_odd_n(library):
    """N must split into gate and up halves: an onnxruntime error naming the node, at session creation."""
    model, _ = _layer_model(lora=False, seed=9)
    FuseSwiGLU()(_gated(model))
    node = next(iter(model.graph))
    node.attributes["N"] = ir.AttrInt64("N", 2 * HALF - 1)
    with pytest.raises(Exception, match=f"HQQMatMulNBitsSwiGLU node '{node.name}': N must be even"):
        _session(model, library)

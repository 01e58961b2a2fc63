"""HQQMatMulNBitsLoRA (adapters/fused.py, ops/nbits.py): LoRA inside the layer's node, against numpy.

The reference is hqq's own dequantized weight and the LoRA product in float64; the node runs as the compiled
kernel (its dot-product path below 4 rows, its panel GEMM from 4) and as its function body in stock onnxruntime.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import torch

from hqexport.adapters.fused import FusedGroup, FuseLora, rank0_parameters
from hqexport.errors import HQExportError
from hqexport.lower import LowerToMatMulNBits
from tests.test_lowering import K, N, _hqq_layer, _run, _session, _single_layer_model

#: output columns of the segments: one layer, a packed node's first and last parts (q and v of q/k/v), three parts,
#: widths that the kernel's eight columns at a time do not divide
SEGMENTS = {"whole": [(0, N)], "two of three": [(0, 16), (32, N)], "three": [(0, 8), (8, 40), (40, N)], "odd widths": [(0, 13), (20, N)]}
ROWS = (1, 3, 7, 40)  # dot products below 4 rows; GEMM panels of 8, of 16 and several panels from 4


def _fused_model(
    columns: list[tuple[int, int]], baked: dict[str, np.ndarray] | None = None, *, bits: int = 4, factor_dtype: type = np.float32
) -> tuple[ir.Model, torch.Tensor, FusedGroup]:
    hqq_layer = _hqq_layer(bits, 32, axis=1, seed=bits)
    model = LowerToMatMulNBits("auto")(_single_layer_model(hqq_layer)).model
    node = next(iter(model.graph)).name
    group = FusedGroup("layer0", node, K, tuple(f"part{i}" for i in range(len(columns))), tuple(columns))
    FuseLora({node: group}, dtype=np.dtype(factor_dtype), baked=baked)(model)
    with torch.no_grad():
        weight = hqq_layer.dequantize().double().numpy()
    return model, weight, group


def _factors(group: FusedGroup, rank: int, seed: int = 0, dtype: type = np.float32) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    lora_a = (rng.standard_normal((len(group.columns) * rank, K)) / K**0.5).astype(dtype)
    lora_b = rng.standard_normal((group.widths, rank)).astype(dtype)
    return {"layer0.lora_A.weight": lora_a, "layer0.lora_B.weight": lora_b}


def _expected(x: np.ndarray, weight: np.ndarray, group: FusedGroup, factors: dict[str, np.ndarray]) -> np.ndarray:
    lora_a, lora_b = (factors[f"layer0.lora_{n}.weight"].astype(np.float64) for n in "AB")
    rank = lora_b.shape[1]
    y = x @ weight.T
    row = 0
    for s, (start, stop) in enumerate(group.columns):
        y[:, start:stop] += (x @ lora_a[s * rank : (s + 1) * rank].T) @ lora_b[row : row + stop - start].T
        row += stop - start
    return y


@pytest.mark.parametrize("rank", [5, 12])  # below the kernel's 8 lanes; 8 lanes and a tail
@pytest.mark.parametrize("factor_dtype", [np.float32, np.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("segments", SEGMENTS)
@pytest.mark.parametrize("runtime", ["kernel", "function body"])
def test_lora_node_matches_numpy(segments, runtime, factor_dtype, rank, request):
    """Each segment's product lands in its own columns and nowhere else, for decode and prefill row counts; fp16
    factors (convert --adapter-dtype fp16) are widened exactly and multiplied in fp32 like fp32 ones."""
    model, weight, group = _fused_model(SEGMENTS[segments], factor_dtype=factor_dtype)
    library = request.getfixturevalue("library") if runtime == "kernel" else None
    session = _session(model, library)
    factors = _factors(group, rank=rank, dtype=factor_dtype)
    for rows in ROWS:
        x = np.random.default_rng(rows).standard_normal((rows, K))
        got = session.run(None, {"A": x.astype(np.float32), **factors})[0]
        expected = _expected(x, weight, group, factors)
        lora_scale = np.abs(expected - x @ weight.T).max()
        assert lora_scale > 0.1  # the adapter moves the output
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("rank", [5, 12])
def test_fp16_factors_compute_what_the_same_fp32_factors_compute(rank, library):
    """Factors that are float16 values (what convert's --adapter-dtype auto stores as fp16) give the fp32 node's
    output bit for bit in the kernel, at every row count: widening is exact and the arithmetic is the same."""
    outputs = {}
    for dtype in (np.float32, np.float16):
        model, _, group = _fused_model(SEGMENTS["odd widths"], factor_dtype=dtype)
        factors = {name: value.astype(np.float16).astype(dtype) for name, value in _factors(group, rank=rank).items()}
        session = _session(model, library)
        outputs[dtype] = [session.run(None, {"A": np.random.default_rng(rows).standard_normal((rows, K)).astype(np.float32), **factors})[0]
                          for rows in ROWS]
    for fp32, fp16 in zip(outputs[np.float32], outputs[np.float16]):
        np.testing.assert_array_equal(fp16, fp32)


@pytest.mark.parametrize("runtime", ["kernel", "function body"])
def test_baked_lora_node_matches_numpy(runtime, request):
    """Bake mode: the factors are constants of the node, with the same result."""
    _, _, group = _fused_model(SEGMENTS["two of three"])
    factors = _factors(group, rank=3, seed=1)
    model, weight, group = _fused_model(SEGMENTS["two of three"], baked=factors)
    assert not [value.name for value in model.graph.inputs if value.name.startswith("layer0.lora")]
    library = request.getfixturevalue("library") if runtime == "kernel" else None
    x = np.random.default_rng(2).standard_normal((5, K))
    expected = _expected(x, weight, group, factors)
    np.testing.assert_allclose(_run(model, x.astype(np.float32), library), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("runtime", ["kernel", "function body"])
def test_rank_0_is_the_base_layer_bit_for_bit(runtime, request):
    """The rank-0 defaults (no adapter active) give exactly the HQQMatMulNBits node's output."""
    library = request.getfixturevalue("library") if runtime == "kernel" else None
    base = LowerToMatMulNBits("auto")(_single_layer_model(_hqq_layer(4, 32, axis=1, seed=4))).model
    model, _, group = _fused_model(SEGMENTS["three"])
    assert {name: value.shape for name, value in rank0_parameters(group, np.dtype(np.float32)).items()} == {
        "layer0.lora_A.weight": (0, K), "layer0.lora_B.weight": (N, 0)
    }
    for rows in ROWS:
        x = np.random.default_rng(rows).standard_normal((rows, K)).astype(np.float32)
        np.testing.assert_array_equal(_run(model, x, library), _run(base, x, library))


def test_kernel_refuses_mismatched_factors(library):
    """Factors of different ranks: an onnxruntime error naming the node and the input, never a wrong read."""
    model, _, group = _fused_model(SEGMENTS["two of three"])
    factors = _factors(group, rank=2)
    factors["layer0.lora_B.weight"] = np.zeros((group.widths, 3), np.float32)
    with pytest.raises(Exception, match=r"HQQMatMulNBitsLoRA node 'layer0.*lora_B of shape \[32, 3\] is not \[32, 2\]"):
        _session(model, library).run(None, {"A": np.zeros((1, K), np.float32), **factors})


def test_kernel_refuses_overlapping_segments(library):
    """lora_columns that overlap are refused when the session is created."""
    model, _, _ = _fused_model([(0, 20), (10, 30)])
    with pytest.raises(Exception, match=r"lora_columns must be ascending, non-empty, disjoint ranges within N = 48"):
        _session(model, library)


def test_only_hqq_matmul_nbits_nodes_take_lora():
    """The pass refuses a node of another op (e.g. one left as HQQMatMul) instead of writing a wrong graph."""
    model = _single_layer_model(_hqq_layer(4, 32, axis=1))
    group = FusedGroup("layer0", "layer0", K, ("layer0",), ((0, N),))
    with pytest.raises(HQExportError, match="LoRA fuses into an HQQMatMulNBits node, not layer0"):
        FuseLora({"layer0": group}, dtype=np.dtype(np.float32), baked=None)(model)

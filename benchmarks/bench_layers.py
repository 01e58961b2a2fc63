"""Per-layer speed of the ways to run an HQQ linear in stock onnxruntime (CPU).

    python benchmarks/bench_layers.py [--shapes 4096x4096,11008x4096] [--threads 2]

For each layer (hqq 4-bit, group 64, axis 1, fractional zero points) and M = 1 and 128 it times:
fp32 MatMul on the dequantized weight; MatMulNBits with float zero points (what onnxruntime's own HQQ
quantizer emits); the hqexport lowering (uint8 zero points + exact correction) at accuracy levels 0 and 4, as
stock ops and as the hqexport.HQQMatMulNBits node that convert writes, run by the compiled kernels library;
the hqexport.HQQMatMul function body with constant folding off (its real cost) and on (folded to fp32).
Every speed is also given as a ratio to fp32 MatMul from the same run, and the bandwidth-bound limit
(bytes of weights read ÷ measured memory bandwidth) is printed beside it.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import torch
from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, median_seconds, memory_bandwidth_gbs, report

from hqexport.kernels import register
from hqexport.lower import LowerToMatMulNBits
from hqexport.ops import canonical_weight
from hqexport.ops.function import attach_function
from hqexport.read.meta import layer_from_meta

OPSET = 21


def _model(nodes, inits, k: int, n: int, domains: dict[str, int]) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "layer",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])],
        inits,
    )
    opsets = [helper.make_opsetid("", OPSET)] + [helper.make_opsetid(d, v) for d, v in domains.items()]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)


def variants(hqq_layer: HQQLinear, n: int, k: int) -> dict[str, tuple[onnx.ModelProto, list[str], bool]]:
    """name -> (model, disabled optimizers, whether the session registers the kernels library)."""
    layer = layer_from_meta("layer", hqq_layer.W_q.data, hqq_layer.meta, None)
    weight = hqq_layer.dequantize().float().numpy()
    blocks = k // layer.fmt.group_size
    w_init = numpy_helper.from_array(canonical_weight(layer), "W")
    scale = layer.scale.float().numpy()
    zero = layer.zero.float().numpy()

    fp32 = _model([helper.make_node("MatMul", ["A", "WT"], ["Y"])], [numpy_helper.from_array(weight.T.copy(), "WT")], k, n, {})
    nbits_attrs = dict(K=k, N=n, bits=4, block_size=layer.fmt.group_size)
    float_zp = _model(
        [helper.make_node("MatMulNBits", ["A", "B", "s", "z"], ["Y"], domain="com.microsoft", accuracy_level=0, **nbits_attrs)],
        [numpy_helper.from_array(canonical_weight(layer).reshape(n, blocks, -1), "B"),
         numpy_helper.from_array(scale.reshape(-1), "s"), numpy_helper.from_array(zero.reshape(-1), "z")],
        k, n, {"com.microsoft": 1},
    )
    hqq_op = _model(
        [helper.make_node("HQQMatMul", ["A", "W", "scale", "zero"], ["Y"], domain="hqexport", name="layer",
                          N=n, K=k, bits=4, group_size=layer.fmt.group_size, axis=1)],
        [w_init, numpy_helper.from_array(scale, "scale"), numpy_helper.from_array(zero, "zero")],
        k, n, {"hqexport": 1},
    )
    attach_function(hqq_op)
    lowered = {}
    for ops, level in itertools.product(("ort", "auto"), (0, 4)):
        ir_model = ir.serde.deserialize_model(hqq_op)
        LowerToMatMulNBits(ops, accuracy_level=level)(ir_model)
        lowered[ops, level] = ir.serde.serialize_model(ir_model)
    return {
        "fp32 MatMul": (fp32, [], False),
        "MatMulNBits float zp": (float_zp, [], False),
        "hqexport lowered acc0": (lowered["ort", 0], [], False),
        "hqexport lowered acc4": (lowered["ort", 4], [], False),
        "hqexport kernel acc0": (lowered["auto", 0], [], True),
        "hqexport kernel acc4": (lowered["auto", 4], [], True),
        "hqexport op, no folding": (hqq_op, ["ConstantFolding"], False),
        "hqexport op, folded": (hqq_op, [], False),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="4096x4096,11008x4096,4096x11008", help="NxK (out x in) list")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: default)")
    parser.add_argument("--out", type=Path, default=RESULTS / "layers.json")
    args = parser.parse_args()

    bandwidth = memory_bandwidth_gbs()
    rows = []
    for shape in args.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        torch.manual_seed(0)
        config = BaseQuantizeConfig(nbits=4, group_size=64, axis=1)
        config["weight_quant_params"].update(optimize=False, round_zero=False)  # fast; zeros stay fractional
        hqq_layer = HQQLinear(torch.nn.Linear(k, n, bias=False), config, compute_dtype=torch.float32, device="cpu")
        packed_bytes = n * k // 2 + 2 * 4 * n * k // 64
        for m in (1, 128):
            x = np.random.default_rng(0).standard_normal((m, k), dtype=np.float32)
            reference = x.astype(np.float64) @ hqq_layer.dequantize().double().numpy().T
            baseline = None
            for name, (model, disabled, with_kernels) in variants(hqq_layer, n, k).items():
                options = ort.SessionOptions()
                options.intra_op_num_threads = args.threads
                if with_kernels:
                    register(options, build=True)
                session = ort.InferenceSession(model.SerializeToString(), options, disabled_optimizers=disabled)
                y = session.run(None, {"A": x})[0]
                seconds = median_seconds(lambda: session.run(None, {"A": x}), repeats=10 if m == 1 else 3)
                baseline = baseline or seconds
                rows.append({
                    "layer": f"{n}x{k}", "M": m, "variant": name, "ms": seconds * 1e3,
                    "vs fp32": baseline / seconds,
                    "rel err": float(np.abs(y - reference).max() / np.abs(reference).max()),
                    "bw limit ms": packed_bytes / (bandwidth * 1e9) * 1e3 if m == 1 else None,
                })
    report(
        f"HQQ 4-bit g64 layer in onnxruntime (CPU, memory bandwidth {bandwidth:.1f} GB/s)",
        ["layer", "M", "variant", "ms", "vs fp32", "rel err", "bw limit ms"],
        rows, args.out, {"memory_bandwidth_gbs": bandwidth},
    )


if __name__ == "__main__":
    main()

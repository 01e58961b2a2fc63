"""CPU speed of hqexport::HQQMatMul's compiled kernel vs the other ways onnxruntime can run the layer.

For one N x K layer (default 4096 x 4096, 4-bit, group 64, axis 1, fp32 compute) at M = 1 and M = 128:
  kernel        the custom-op library (hqexport kernels build)
  fused kernel  the same layer lowered by --ops auto (one hqexport.HQQMatMulNBits node) on the library
  function      the op's ONNX function body, constant folding off (weights stay packed; the reference path)
  matmulnbits   the MatMulNBits lowering (hqexport.lower, --ops ort), uint8 zero points + group-sum correction:
                also what the fused node runs as without the library (its function body)
  fp32 MatMul   a plain MatMul with the dequantized fp32 weight (4x-8x the memory)
Prints a table (best of --repeat runs: the least disturbed by other load) and writes JSON (--out) with the best and
the median and the load average. Weights are random codes: speed does not depend on the values.

    python benchmarks/kernels_bench.py [--n 4096 --k 4096 --bits 4 --group-size 64 --threads 1 --no-function]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from hqexport.formats import pack_canonical
from hqexport.kernels import library_path
from hqexport.lower import LowerToMatMulNBits
from hqexport.ops.function import attach_function
from hqexport.ops.reference import dequantize_canonical


def hqq_model(tensors: dict[str, np.ndarray], attrs: dict[str, int]) -> onnx.ModelProto:
    node = helper.make_node("HQQMatMul", ["A", *tensors], ["Y"], domain="hqexport", name="layer", **attrs)
    graph = helper.make_graph(
        [node], "bench", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", attrs["K"]])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", attrs["N"]])],
        [numpy_helper.from_array(array, name) for name, array in tensors.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("hqexport", 1)])
    model.ir_version = 10
    return model


def fp32_model(weight: np.ndarray) -> onnx.ModelProto:
    n, k = weight.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["A", "Wt"], ["Y"])], "fp32",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])],
        [numpy_helper.from_array(np.ascontiguousarray(weight.T), "Wt")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def time_session(
    model: onnx.ModelProto, a: np.ndarray, repeat: int, threads: int, library: Path | None = None, **options
) -> dict[str, float]:
    """Best and median milliseconds per run."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    if library is not None:
        so.register_custom_ops_library(str(library))
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"], **options)
    for _ in range(3):
        sess.run(None, {"A": a})
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        sess.run(None, {"A": a})
        times.append((time.perf_counter() - start) * 1e3)
    return {"min": min(times), "median": statistics.median(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--k", type=int, default=4096)
    parser.add_argument("--bits", type=int, default=4, choices=[1, 2, 3, 4, 8])
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 128])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0: onnxruntime's default)")
    parser.add_argument("--no-function", action="store_true", help="skip the (slow) function-body path")
    parser.add_argument("--out", type=Path, default=Path("kernels_bench.json"))
    args = parser.parse_args()

    library = library_path(build=True)
    rng = np.random.default_rng(0)
    n, k, bits, g = args.n, args.k, args.bits, args.group_size
    groups = n * k // g
    codes = rng.integers(0, 2**bits, (n, k), dtype=np.uint8)
    tensors = {
        "W": pack_canonical(codes, bits),
        "scale": (rng.random((groups, 1), dtype=np.float32) * 0.02).astype(np.float32),
        "zero": (rng.random((groups, 1), dtype=np.float32) * (2**bits - 1)).astype(np.float32),
    }
    attrs = {"N": n, "K": k, "bits": bits, "group_size": g, "axis": 1}
    model = hqq_model(tensors, attrs)
    with_function = hqq_model(tensors, attrs)
    attach_function(with_function)
    lowering = LowerToMatMulNBits("ort")
    lowered = ir.serde.serialize_model(lowering(ir.serde.deserialize_model(hqq_model(tensors, attrs))).model)
    fused = ir.serde.serialize_model(LowerToMatMulNBits("auto")(ir.serde.deserialize_model(hqq_model(tensors, attrs))).model)
    attach_function(fused)
    weight = dequantize_canonical(tensors["W"], tensors["scale"], tensors["zero"], **attrs)

    rows = []
    for m in args.rows:
        a = rng.standard_normal((m, k)).astype(np.float32)
        t = args.threads
        row = {"M": m, "kernel_ms": time_session(model, a, args.repeat, t, library),
               "fused_kernel_ms": time_session(fused, a, args.repeat, t, library)}
        if not args.no_function:
            function_repeat = max(3, args.repeat // 4)
            no_folding = {"disabled_optimizers": ["ConstantFolding"]}
            row["function_ms"] = time_session(with_function, a, function_repeat, t, **no_folding)
        row["matmulnbits_ms"] = time_session(lowered, a, args.repeat, t)
        row["fp32_matmul_ms"] = time_session(fp32_model(weight), a, args.repeat, t)
        rows.append(row)
    isa = ctypes.CDLL(str(library)).hqexport_cpu_isa
    isa.restype = ctypes.c_char_p
    result = {
        "layer": {"N": n, "K": k, "bits": bits, "group_size": g, "axis": 1, "compute_dtype": "fp32"},
        "onnxruntime": ort.__version__,
        "cpu_isa": isa().decode(),
        "threads": args.threads or "default",
        "load_average": os.getloadavg(),
        "cpus": os.cpu_count(),
        "matmulnbits": lowering.decisions["layer"].to_json(),
        "rows": rows,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"{n}x{k} {bits}-bit g{g} axis 1, onnxruntime {ort.__version__}, kernel ISA {result['cpu_isa']}, "
        f"threads {result['threads']}, load average {result['load_average'][0]:.2f} on {result['cpus']} CPUs "
        f"(ms, best of {args.repeat})"
    )
    titles = {
        "kernel_ms": "kernel", "fused_kernel_ms": "fused kernel", "function_ms": "function", "matmulnbits_ms": "MatMulNBits", "fp32_matmul_ms": "fp32 MatMul"
    }
    columns = [(key, title) for key, title in titles.items() if key in rows[0]]
    print(f"{'M':>5} " + " ".join(f"{title:>12}" for _, title in columns))
    for row in rows:
        print(f"{row['M']:>5} " + " ".join(f"{row[key]['min']:>12.2f}" for key, _ in columns))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""One-shot check of the CUDA kernel on a machine with an NVIDIA GPU, nvcc and onnxruntime-gpu (not run in CI).

1. builds the library with the CUDA kernel (fails loudly if nvcc or the CUDA EP is missing);
2. checks it against the numpy reference for every storage width x axis x compute dtype x activation dtype,
   M in {1, 7, 128}, odd sizes, on CUDAExecutionProvider (and that the node really ran there);
3. measures GEMV bandwidth at M = 1 (bytes of packed weight + scale/zero read per second, vs the device's peak)
   for 4096x4096 and 4096x11008 layers at 4 and 2 bits, with inputs and outputs bound on the device.
Writes JSON to --out (default $OUT/gpu_check.json when $OUT is set) and prints a table.

    python benchmarks/gpu_check.py [--out gpu_check.json] [--peak-gbps 4800]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from hqexport.formats import pack_canonical
from hqexport.kernels import build
from hqexport.ops.reference import hqq_matmul_reference

_NP = {"fp32": np.float32, "fp16": np.float16}
_ONNX = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16}


def meta_dtype(name: str) -> np.dtype:
    if name == "bf16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(_NP[name])


def layer(rng: np.random.Generator, n: int, k: int, bits: int, g: int, axis: int, meta: str):
    groups = n * k // g
    shape = (groups, 1) if axis == 1 else (1, groups)
    tensors = {
        "W": pack_canonical(rng.integers(0, 2**bits, (n, k), dtype=np.uint8), bits),
        "scale": (rng.random(shape, dtype=np.float32) * 0.05 + 0.01).astype(meta_dtype(meta)),
        "zero": (rng.random(shape, dtype=np.float32) * (2**bits - 1)).astype(meta_dtype(meta)),
    }
    return tensors, {"N": n, "K": k, "bits": bits, "group_size": g, "axis": axis}


def model(tensors: dict, attrs: dict, act: np.dtype) -> onnx.ModelProto:
    node = helper.make_node("HQQMatMul", ["A", *tensors], ["Y"], domain="hqexport", name="layer", **attrs)
    graph = helper.make_graph(
        [node], "gpu", [helper.make_tensor_value_info("A", _ONNX[act], ["M", attrs["K"]])],
        [helper.make_tensor_value_info("Y", _ONNX[act], ["M", attrs["N"]])],
        [numpy_helper.from_array(a, name) for name, a in tensors.items()],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("hqexport", 1)])
    m.ir_version = 10
    return m


def cuda_session(proto: onnx.ModelProto, library: Path, profile: bool = False) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.register_custom_ops_library(str(library))
    so.enable_profiling = profile
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])


def check_formats(library: Path) -> list[dict]:
    rng = np.random.default_rng(0)
    results = []
    n, k, g1, g0 = 37, 104, 8, 8  # odd N; K leaves partial words at 1 and 3 bits; axis-0 groups wrap rows
    for bits in (1, 2, 3, 4, 8):
        for axis, g in ((1, g1), (0, g0)):
            for meta in ("fp32", "fp16", "bf16"):
                tensors, attrs = layer(rng, n, k, bits, g, axis, meta)
                for act_name in ("fp32", "fp16"):
                    act = np.dtype(_NP[act_name])
                    sess = cuda_session(model(tensors, attrs, act), library, profile=True)
                    worst = 0.0
                    for m in (1, 7, 128):
                        a = rng.standard_normal((m, k)).astype(act)
                        y = sess.run(None, {"A": a})[0].astype(np.float64)
                        ref = hqq_matmul_reference(a, **tensors, **attrs).astype(np.float64)
                        wd = hqq_matmul_reference(np.eye(k, dtype=act), **tensors, **attrs).astype(np.float64)
                        bound = k * np.finfo(np.float32).eps * (np.abs(a.astype(np.float64)) @ np.abs(wd)) + 1e-30
                        if act == np.float16:
                            bound = bound + np.abs(ref) * 2.0**-10 + 2.0**-24
                        worst = max(worst, float((np.abs(y - ref) / bound).max()))
                    events = json.loads(Path(sess.end_profiling()).read_text())
                    providers = {e["args"].get("provider") for e in events if e.get("cat") == "Node" and e["args"].get("op_name") == "HQQMatMul"}
                    ok = worst <= 1.0 and providers == {"CUDAExecutionProvider"}
                    results.append({"bits": bits, "axis": axis, "meta": meta, "act": act_name, "error_over_bound": worst,
                                    "providers": sorted(p for p in providers if p), "ok": ok})
    return results


def peak_gbps() -> float | None:
    """Theoretical DRAM bandwidth from the CUDA runtime (memory clock x bus width x 2), or None."""
    for name in ("libcudart.so", "libcudart.so.13", "libcudart.so.12"):
        try:
            cudart = ctypes.CDLL(name)
            break
        except OSError:
            continue
    else:
        return None
    clock_khz, bus_bits = ctypes.c_int(), ctypes.c_int()
    if cudart.cudaDeviceGetAttribute(ctypes.byref(clock_khz), 36, 0) or cudart.cudaDeviceGetAttribute(ctypes.byref(bus_bits), 37, 0):
        return None
    return 2.0 * clock_khz.value * 1e3 * bus_bits.value / 8 / 1e9


def bandwidth(library: Path, repeat: int) -> list[dict]:
    rng = np.random.default_rng(1)
    rows = []
    for n, k in ((4096, 4096), (11008, 4096), (4096, 11008)):
        for bits in (4, 2):
            tensors, attrs = layer(rng, n, k, bits, 64, 1, "fp16")
            sess = cuda_session(model(tensors, attrs, np.dtype(np.float16)), library)
            a = ort.OrtValue.ortvalue_from_numpy(rng.standard_normal((1, k)).astype(np.float16), "cuda", 0)
            binding = sess.io_binding()
            binding.bind_ortvalue_input("A", a)
            binding.bind_output("Y", "cuda", 0)
            for _ in range(5):
                sess.run_with_iobinding(binding)
            times = []
            for _ in range(repeat):
                start = time.perf_counter()
                sess.run_with_iobinding(binding)
                binding.synchronize_outputs()
                times.append(time.perf_counter() - start)
            seconds = statistics.median(times)
            nbytes = sum(t.nbytes for t in tensors.values())
            rows.append({"N": n, "K": k, "bits": bits, "bytes": nbytes, "us": seconds * 1e6, "GBps": nbytes / seconds / 1e9})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_out = Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else Path("gpu_check.json")
    parser.add_argument("--out", type=Path, default=default_out)
    parser.add_argument("--peak-gbps", type=float, default=None, help="device DRAM bandwidth if the runtime can't tell")
    parser.add_argument("--repeat", type=int, default=50)
    args = parser.parse_args()
    if build.nvcc() is None or not build.cuda_ep_available():
        print(f"need nvcc ({build.nvcc()}) and onnxruntime's CUDA EP ({ort.get_available_providers()})", file=sys.stderr)
        return 2
    start = time.perf_counter()
    library = build.build_library()
    build_s = time.perf_counter() - start
    formats = check_formats(library)
    bw = bandwidth(library, args.repeat)
    peak = args.peak_gbps or peak_gbps()
    for row in bw:
        row["fraction_of_peak"] = row["GBps"] / peak if peak else None
    report = {"onnxruntime": ort.__version__, "library": str(library), "build_s": build_s, "peak_gbps": peak,
              "formats_ok": all(r["ok"] for r in formats), "formats": formats, "gemv": bw}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"build {build_s:.0f} s; formats: {sum(r['ok'] for r in formats)}/{len(formats)} ok")
    for r in formats:
        if not r["ok"]:
            print("  FAIL", r)
    print(f"{'N':>6} {'K':>6} {'bits':>4} {'us':>8} {'GB/s':>8} {'of peak':>8}   (peak {peak} GB/s)")
    for r in bw:
        frac = f"{r['fraction_of_peak']:.0%}" if r["fraction_of_peak"] else "?"
        print(f"{r['N']:>6} {r['K']:>6} {r['bits']:>4} {r['us']:>8.1f} {r['GBps']:>8.0f} {frac:>8}")
    return 0 if report["formats_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

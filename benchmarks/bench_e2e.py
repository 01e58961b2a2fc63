"""End-to-end speed and memory of an HQQ model on CPU: hqexport's ONNX exports against the alternatives.

    python benchmarks/bench_e2e.py           # SmolLM2-135M-Instruct, hqq 4-bit g64 axis 1 (tests/smollm2.py)
    python benchmarks/bench_e2e.py --tiny    # a tiny hqexport.sample model, about a minute (the smoke test)

In a work folder it builds: `hqexport convert --ops auto` and `--ops hqq` (each through the CLI in its own
process: wall time and that process's peak RSS), a fp32 ONNX of the same model (the hqq weights dequantized into nn.Linear, exported
with hqexport's decoder wrapper through plain torch.onnx dynamo, no hqexport op), and onnxruntime's own HQQ
quantizer (matmul_nbits_quantizer, HQQWeightOnlyQuantConfig) applied to that fp32 ONNX.

Each variant then runs in a fresh process (batch 1, greedy, default threads): one forward of one token without
cache; prefill of `--prefill` tokens; a `--prompt`-token prompt followed by `--decode` cached decode steps (each
step timed; tokens/s = 1 / median step). Peak memory is the process's high-water mark after the kernel's
counter was reset (/proc/self/clear_refs) just before the model is loaded, minus the RSS at that moment.
Speeds are compared as ratios from this one run and against the bandwidth-bound decode limit: the bytes a
decode step must read for this HQQ model (packed codes + scale + zero of every quantized layer, the fp
parameters each step touches: all of them except the input embedding, of which one row) ÷ the measured
memory bandwidth.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import RESULTS, median_seconds, memory_bandwidth_gbs, report, status_kib  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

#: variant -> what it runs; the order of the table
VARIANTS = {
    "pytorch-fp32": "PyTorch, fp32 weights (dequantized hqq)",
    "pytorch-hqq": "PyTorch, hqq HQQLinear layers",
    "onnx-fp32": "ONNX fp32 (torch.onnx of the same model)",
    "ort-hqq-quantizer": "ORT HQQ quantizer on the fp32 ONNX (MatMulNBits, float zp)",
    "hqexport-auto": "hqexport --ops auto (MatMulNBits, uint8 zp + correction)",
    "hqexport-auto-acc4": "convert --accuracy-level 4: MatMulNBits with int8 activations (lossy)",
    "hqexport-hqq": "hqexport --ops hqq (function body, default session)",
    "hqexport-kernels": "hqexport --ops hqq + compiled kernel library",
}
TARGETS = [  # (what, baseline variant or None for the bandwidth limit, required ratio)
    ("decode vs ONNX fp32", "onnx-fp32", 1.5),
    ("decode vs ORT HQQ quantizer", "ort-hqq-quantizer", 8.0),
    ("decode vs PyTorch hqq", "pytorch-hqq", 15.0),
    ("decode vs bandwidth limit", None, 0.5),
]
SUBJECT = "hqexport-auto"


# ---------------------------------------------------------------- child processes


def run_task(task: dict, work: Path, reuse: bool = False) -> dict:
    """Run one worker task (this script with --worker) in a fresh process; its JSON result.

    Peak memory is read by the worker itself (VmHWM): the ru_maxrss that wait4/getrusage report for a child
    also counts the parent's RSS at fork time, which would hide the child's own peak behind this process's.
    With `reuse`, a task that already completed in `work` is not run again; its recorded result is returned.
    """
    name = "-".join(filter(None, (task["task"], task.get("variant"), task.get("ops"))))
    spec, result = work / f"{name}.task.json", work / f"{name}.result.json"
    if reuse and result.is_file():
        return {**json.loads(result.read_text()), "reused": True}
    spec.write_text(json.dumps({**task, "result": str(result)}))
    started = time.perf_counter()
    with (work / f"{name}.log").open("w") as log:
        code = subprocess.run([sys.executable, __file__, "--worker", str(spec)], stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise RuntimeError(f"worker {name} failed ({code}):\n{(work / f'{name}.log').read_text()[-3000:]}")
    return {**json.loads(result.read_text()), "process_seconds": time.perf_counter() - started}


def worker(spec_path: Path) -> None:
    spec = json.loads(spec_path.read_text())
    tasks = {"convert": run_convert, "export-fp32": export_fp32, "ort-quantize": ort_quantize, "run": run_variant}
    result = tasks[spec["task"]](spec)
    result["process_peak_mib"] = _peak_rss_bytes() / 2**20
    Path(spec["result"]).write_text(json.dumps(result))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return status_kib("VmHWM") * 1024


# ---------------------------------------------------------------- artifacts


def tiny_source(folder: Path) -> Path:
    from hqexport.sample import build_sample_model, build_tokenizer, save_hqq_pickle

    tokenizer = build_tokenizer()
    model = build_sample_model("llama", nbits=4, group_size=32, axis=1, vocab_size=tokenizer.vocab_size)
    return save_hqq_pickle(model, folder, tokenizer)


def dequantized_fp32(source: Path):  # noqa: ANN201 - a transformers model
    """The source model with every hqq layer replaced by an nn.Linear holding hqq's own dequantized weight."""
    import torch
    from hqq.core.quantize import HQQLinear

    from hqexport.validate.reference import load_reference

    reference = load_reference(source)
    model = reference.model
    for path, layer in reference.hqq_layers.items():
        out_features, in_features = layer.meta["shape"]
        linear = torch.nn.Linear(in_features, out_features, bias=layer.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(layer.dequantize().float())
            if layer.bias is not None:
                linear.bias.copy_(layer.bias.float())
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent), child, linear)
    assert not any(isinstance(m, HQQLinear) for m in model.modules())
    return model, reference


def bytes_per_token(reference) -> dict:  # noqa: ANN001 - hqexport.validate.reference.Reference
    """Bytes one decode step must read at least, for the HQQ model as stored."""
    model = reference.model
    quantized = sum(
        tensor.numel() * tensor.element_size()
        for layer in reference.hqq_layers.values()
        for tensor in (layer.W_q, layer.meta["scale"], layer.meta["zero"], *([layer.bias] if layer.bias is not None else []))
    )
    embedding = model.get_input_embeddings().weight
    in_hqq = {id(p) for layer in reference.hqq_layers.values() for p in layer.parameters()}  # W_q is a parameter
    params = {id(p): p for p in model.parameters() if id(p) not in in_hqq}  # tied tensors once
    fp_other = sum(p.numel() * p.element_size() for p in params.values() if p is not embedding)
    tied = model.get_output_embeddings().weight is embedding
    embedding_read = embedding.numel() * embedding.element_size() if tied else embedding[0].numel() * embedding.element_size()
    return {"quantized": quantized, "fp": fp_other + embedding_read, "total": quantized + fp_other + embedding_read}


def run_convert(spec: dict) -> dict:
    """`hqexport convert SOURCE -o OUT --ops OPS` through the CLI, in this (fresh) process."""
    from hqexport.cli import main

    started = time.perf_counter()
    main(["convert", spec["source"], "-o", spec["out"], "--ops", spec["ops"], "--json"], standalone_mode=False)
    return {"seconds": time.perf_counter() - started}


def export_fp32(spec: dict) -> dict:
    """fp32 ONNX (and a transformers fp32 folder) of the dequantized model."""
    import torch

    from hqexport.export.decoder import DecoderWithCache, decoder_io
    from hqexport.export.onnx_export import export_decoder
    from hqexport.write.onnx_file import write_onnx

    model, _ = dequantized_fp32(Path(spec["source"]))
    started = time.perf_counter()
    graph = export_decoder(DecoderWithCache(model, decoder_io(model.config, torch.float32)))
    onnx_folder = Path(spec["onnx"])
    onnx_folder.mkdir(parents=True)
    write_onnx(graph.model, onnx_folder)
    export_seconds = time.perf_counter() - started
    model.save_pretrained(spec["torch"])
    return {"export_seconds": export_seconds}


def ort_quantize(spec: dict) -> dict:
    """onnxruntime's own HQQ weight-only quantizer applied to the fp32 ONNX."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, MatMulNBitsQuantizer

    started = time.perf_counter()
    config = HQQWeightOnlyQuantConfig(block_size=spec["block_size"], bits=4)
    quantizer = MatMulNBitsQuantizer(onnx.load(spec["fp32"]), algo_config=config)
    quantizer.process()
    out = Path(spec["out"])
    out.mkdir(parents=True)
    quantizer.model.save_model_to_file(str(out / "model.onnx"), use_external_data_format=True)
    nodes = quantizer.model.model.graph.node
    return {
        "seconds": time.perf_counter() - started,
        "matmulnbits_nodes": sum(n.op_type == "MatMulNBits" for n in nodes),
        "matmul_nodes_left": sum(n.op_type == "MatMul" for n in nodes),
    }


# ---------------------------------------------------------------- running one variant


class OrtModel:
    """Greedy steps through an exported decoder in onnxruntime."""

    def __init__(self, path: str, kv_heads: int, head_dim: int, library: str | None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if library:
            options.register_custom_ops_library(library)
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.inputs = {i.name for i in self.session.get_inputs()}
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.layers = sum(name.endswith(".key") for name in self.inputs)
        self.kv_shape = (1, kv_heads, 0, head_dim)

    def empty(self):  # noqa: ANN201
        import numpy as np

        return {f"past_key_values.{i}.{kv}": np.zeros(self.kv_shape, np.float32) for i in range(self.layers) for kv in ("key", "value")}

    def step(self, ids: list[int], past):  # noqa: ANN001, ANN201 - -> (next token, present)
        import numpy as np

        done = next(iter(past.values())).shape[2]
        feeds = {
            "input_ids": np.array([ids], np.int64),
            "attention_mask": np.ones((1, done + len(ids)), np.int64),
            **past,
        }
        if "position_ids" in self.inputs:
            feeds["position_ids"] = np.arange(done, done + len(ids), dtype=np.int64)[None]
        outputs = dict(zip(self.outputs, self.session.run(None, feeds)))
        present = {name: outputs[name.replace("past_key_values.", "present.")] for name in past}
        return int(outputs["logits"][0, -1].argmax()), present


class TorchModel:
    """Greedy steps through a transformers model with a DynamicCache."""

    def __init__(self, model) -> None:  # noqa: ANN001
        self.model = model

    def empty(self):  # noqa: ANN201
        return None

    def step(self, ids: list[int], past):  # noqa: ANN001, ANN201
        import torch

        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([ids]), cache=past, use_cache=True)
        return int(out.logits[0, -1].argmax()), out.cache


def load_variant(spec: dict):  # noqa: ANN201 - OrtModel | TorchModel
    variant = spec["variant"]
    if variant == "pytorch-hqq":
        from hqexport.validate.reference import load_reference

        return TorchModel(load_reference(Path(spec["path"])).model)
    if variant == "pytorch-fp32":
        import torch
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(spec["path"], dtype=torch.float32)
        return TorchModel(model.eval())
    return OrtModel(str(Path(spec["path"]) / "model.onnx"), spec["kv_heads"], spec["head_dim"], spec.get("library"))


def run_variant(spec: dict) -> dict:
    """Load one variant and time it; peak memory from a high-water mark reset just before the load."""
    import numpy  # noqa: F401 - imported before the baseline so that imports are not counted
    import onnxruntime  # noqa: F401

    if spec["variant"].startswith("pytorch"):
        import torch  # noqa: F401
        import transformers  # noqa: F401
    peak_before = _peak_rss_bytes()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    baseline = _rss_bytes()
    load_average = os.getloadavg()[0]
    started = time.perf_counter()
    model = load_variant(spec)
    load_seconds = time.perf_counter() - started

    tokens, repeats = spec["tokens"], spec["repeats"]
    one = tokens[:1]
    one_token = median_seconds(lambda: model.step(one, model.empty()), warmup=2, repeats=repeats)
    prefill_ids = tokens[: spec["prefill"]]
    prefill = median_seconds(lambda: model.step(prefill_ids, model.empty()), warmup=1, repeats=3)

    token, past = model.step(tokens[: spec["prompt"]], model.empty())
    generated, step_seconds = [token], []
    for _ in range(spec["decode"]):
        started = time.perf_counter()
        token, past = model.step([token], past)
        step_seconds.append(time.perf_counter() - started)
        generated.append(token)
    threads = {"process_threads": len(os.listdir("/proc/self/task"))}
    if spec["variant"].startswith("pytorch"):
        threads["torch"] = torch.get_num_threads()
    return {
        "load_s": load_seconds,
        "one_token_ms": one_token * 1e3,
        "prefill_ms": prefill * 1e3,
        "decode_step_ms_median": statistics.median(step_seconds) * 1e3,
        "decode_step_ms_mean": statistics.mean(step_seconds) * 1e3,
        "decode_total_s": sum(step_seconds),
        "tokens": generated,
        "session_peak_mib": (_peak_rss_bytes() - baseline) / 2**20,
        "imports_peak_mib": peak_before / 2**20,
        "threads": threads,
        "load_average_1min": load_average,
    }


# ---------------------------------------------------------------- orchestration


def model_bytes(path: Path) -> int:
    """Bytes of the weights and graph files (tokenizer and config files excluded)."""
    if path.is_file():
        return path.stat().st_size
    files = [p for p in path.iterdir() if p.name.startswith("model.") or p.suffix in (".pt", ".safetensors")]
    return sum(p.stat().st_size for p in files)


def threaded_bandwidth_gbs(megabytes: int = 512) -> float:
    """Read bandwidth with torch's default thread count (all cores), beside common's single-thread numpy sum."""
    import torch

    buffer = torch.ones(megabytes * 2**20 // 8, dtype=torch.float64)
    seconds = median_seconds(buffer.sum, warmup=1, repeats=5)
    return buffer.numel() * 8 / seconds / 1e9


def source_tokens(source: Path, count: int) -> list[int]:
    import transformers

    from hqexport.sample import corpus_text

    tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    ids = tokenizer(corpus_text(), add_special_tokens=False).input_ids
    if len(ids) < count:
        raise RuntimeError(f"the corpus gives only {len(ids)} tokens, {count} needed")
    return ids[:count]


def with_accuracy_level(folder: Path, out: Path, level: int) -> None:
    """A copy of an exported folder whose MatMulNBits nodes carry `level`.

    Its graph is the one `convert --accuracy-level LEVEL` writes (that option sets only this attribute), without
    a third multi-minute convert.
    """
    import onnx

    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            kept = [attribute for attribute in node.attribute if attribute.name != "accuracy_level"]
            del node.attribute[:]
            node.attribute.extend([*kept, onnx.helper.make_attribute("accuracy_level", level)])
    out.mkdir()
    onnx.save(model, str(out / "model.onnx"))
    # a copy, not a hard link: onnx refuses external data with several links, so validate could not read either
    shutil.copyfile(folder / "model.onnx.data", out / "model.onnx.data")


#: what each variant needs built: (artifact, path inside the work folder)
NEEDS = {
    "pytorch-hqq": None,
    "pytorch-fp32": ("fp32", "torch-fp32"),
    "onnx-fp32": ("fp32", "onnx-fp32"),
    "ort-hqq-quantizer": ("ort-hqq", "ort-hqq"),
    "hqexport-auto": ("auto", "hqexport-auto"),
    "hqexport-auto-acc4": ("auto", "hqexport-auto-acc4"),
    "hqexport-hqq": ("hqq", "hqexport-hqq"),
    "hqexport-kernels": ("hqq", "hqexport-hqq"),
}


def prepare(source: Path, work: Path, selected: list[str], group_size: int, reuse: bool) -> tuple[dict, dict]:
    """Build what the selected variants need; (variant -> model path, or a reason it is skipped; build facts)."""
    artifacts = {NEEDS[v][0] for v in selected if NEEDS[v]}
    if "ort-hqq" in artifacts:
        artifacts.add("fp32")
    facts: dict = {"convert": {}}
    for ops in ("auto", "hqq"):
        if ops in artifacts:
            facts["convert"][ops] = run_task(
                {"task": "convert", "ops": ops, "source": str(source), "out": str(work / f"hqexport-{ops}")}, work, reuse
            )
    if "fp32" in artifacts:
        facts["fp32_export"] = run_task(
            {"task": "export-fp32", "source": str(source), "onnx": str(work / "onnx-fp32"), "torch": str(work / "torch-fp32")},
            work,
            reuse,
        )
    if "ort-hqq" in artifacts:
        facts["ort_quantizer"] = run_task(
            {"task": "ort-quantize", "fp32": str(work / "onnx-fp32" / "model.onnx"), "out": str(work / "ort-hqq"),
             "block_size": group_size},
            work,
            reuse,
        )
    paths: dict[str, Path | str] = {v: work / NEEDS[v][1] if NEEDS[v] else source for v in selected}
    if "hqexport-auto-acc4" in selected and not (reuse and (work / "hqexport-auto-acc4").is_dir()):
        with_accuracy_level(work / "hqexport-auto", work / "hqexport-auto-acc4", 4)
    facts["library"] = None
    if "hqexport-kernels" in selected:
        from hqexport.kernels import KernelBuildError, library_path

        try:
            facts["library"] = str(library_path(build=True))
        except KernelBuildError as error:
            paths["hqexport-kernels"] = f"kernel library not built: {error}"
    return paths, facts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a tiny hqexport.sample llama instead of SmolLM2-135M")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of: " + ", ".join(VARIANTS))
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens before the timed decode steps")
    parser.add_argument("--decode", type=int, default=32, help="timed decode steps")
    parser.add_argument("--prefill", type=int, default=128, help="tokens of the timed prefill")
    parser.add_argument("--repeats", type=int, default=10, help="repeats of the one-token forward")
    parser.add_argument("--work", type=Path, help="keep the built models here (default: a temporary folder)")
    parser.add_argument("--reuse", action="store_true", help="reuse the models (and their build facts) already in --work")
    parser.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/e2e.json, or e2e-tiny.json)")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return
    selected = args.variants.split(",")
    unknown = set(selected) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}")
    os.environ.setdefault("COLUMNS", "160")  # rich would squeeze the table to 80 columns without a terminal
    out = args.out or RESULTS / ("e2e-tiny.json" if args.tiny else "e2e.json")
    if args.work:
        if not args.reuse and args.work.is_dir() and any(args.work.iterdir()):
            parser.error(f"--work {args.work} is not empty: pass --reuse to reuse the models in it, or name an empty folder")
        args.work.mkdir(parents=True, exist_ok=True)
        benchmark(args, args.work, selected, out)
    else:
        with tempfile.TemporaryDirectory(prefix="hqexport-bench-") as work:
            benchmark(args, Path(work), selected, out)


def model_facts(source: Path) -> dict:
    """Bytes per decode step, group size and KV cache shape of the source, read through hqq (the reference loader)."""
    from hqexport.validate.reference import load_reference

    reference = load_reference(source)
    config = reference.model.config
    return {
        "bytes_per_token": bytes_per_token(reference),
        "group_size": next(iter(reference.hqq_layers.values())).meta["group_size"],
        "kv_heads": config.num_key_value_heads,
        "head_dim": getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
    }


def benchmark(args: argparse.Namespace, work: Path, selected: list[str], out: Path) -> None:
    started, load_start = time.perf_counter(), os.getloadavg()
    bandwidth = {"numpy_1_thread": memory_bandwidth_gbs(), "torch_default_threads": threaded_bandwidth_gbs()}
    gbs = max(bandwidth.values())
    if args.tiny:
        source = work / "source" if args.reuse and (work / "source").is_dir() else tiny_source(work / "source")
        model_name = "tiny hqexport.sample llama (hqq 4-bit g32 axis 1)"
    else:
        from tests.smollm2 import smollm2_hqq

        source, model_name = smollm2_hqq(), "SmolLM2-135M-Instruct (hqq 4-bit g64 axis 1, fp32 compute)"
    facts = model_facts(source)
    paths, build = prepare(source, work, selected, facts["group_size"], args.reuse)
    tokens = source_tokens(source, max(args.prefill, args.prompt))
    budget = facts["bytes_per_token"]
    limit_tok_s = gbs * 1e9 / budget["total"]

    results: dict[str, dict] = {}
    for variant in selected:
        path = paths[variant]
        if isinstance(path, str):
            results[variant] = {"skipped": path}
            continue
        spec = {
            "task": "run", "variant": variant, "path": str(path), "tokens": tokens, "prompt": args.prompt,
            "decode": args.decode, "prefill": args.prefill, "repeats": args.repeats,
            "kv_heads": facts["kv_heads"], "head_dim": facts["head_dim"],
            "library": build["library"] if variant == "hqexport-kernels" else None,
        }
        results[variant] = run_task(spec, work)
        results[variant]["file_bytes"] = model_bytes(path / "qmodel.pt" if variant == "pytorch-hqq" else path)

    rows = table_rows(results, limit_tok_s)
    targets = target_rows(results, limit_tok_s)
    extra = {
        "model": model_name,
        "source": str(source),
        "memory_bandwidth_gbs": bandwidth,
        "bytes_per_token": budget,
        "bandwidth_limit_tok_s": limit_tok_s,
        "settings": {"prompt": args.prompt, "decode": args.decode, "prefill": args.prefill, "batch": 1,
                     "repeats": args.repeats, "threads": "onnxruntime and torch defaults", "cpu_count": os.cpu_count()},
        "load_average": {"start": load_start, "end": os.getloadavg()},
        "build": build,
        "variants": results,
        "targets": targets,
        "seconds": time.perf_counter() - started,
    }
    report(
        f"{model_name} on CPU ({os.cpu_count()} cores, {gbs:.1f} GB/s): bandwidth limit {limit_tok_s:.0f} tok/s "
        f"({budget['total'] / 1e6:.1f} MB read per token)",
        ["variant", "decode tok/s", "vs onnx-fp32", "% bw limit", "prefill ms", "1-token ms", "file MB", "peak MiB",
         "same tokens"],
        rows, out, extra,
    )
    targets_table = Table(title=f"targets ({SUBJECT} decode)")
    for column in ("target", "required", "measured", "reached"):
        targets_table.add_column(column)
    for target in targets:
        measured = "n/a" if target["measured"] is None else f"{target['measured']:.2f}"
        targets_table.add_row(target["target"], f"{target['required']:g}", measured, target["reached"] or "n/a")
    Console().print(targets_table)
    for ops, facts_ in build["convert"].items():
        print(f"hqexport convert --ops {ops}: {facts_['seconds']:.1f} s, peak RSS {facts_['process_peak_mib']:.0f} MiB")


def table_rows(results: dict[str, dict], limit_tok_s: float) -> list[dict]:
    fp32 = results.get("onnx-fp32", {}).get("decode_step_ms_median")
    reference = results.get("pytorch-hqq", {}).get("tokens")
    rows = []
    for variant, result in results.items():
        if "skipped" in result:
            rows.append({"variant": variant, "what": VARIANTS[variant], "decode tok/s": None, "note": result["skipped"]})
            continue
        tok_s = 1e3 / result["decode_step_ms_median"]
        same = None
        if reference is not None:
            same = f"{sum(a == b for a, b in zip(result['tokens'], reference))}/{len(reference)}"
        rows.append({
            "variant": variant,
            "what": VARIANTS[variant],
            "decode tok/s": tok_s,
            "vs onnx-fp32": fp32 / result["decode_step_ms_median"] if fp32 else None,
            "% bw limit": 100 * tok_s / limit_tok_s,
            "prefill ms": result["prefill_ms"],
            "1-token ms": result["one_token_ms"],
            "file MB": result["file_bytes"] / 1e6,
            "peak MiB": result["session_peak_mib"],
            "same tokens": same,
        })
    return rows


def target_rows(results: dict[str, dict], limit_tok_s: float) -> list[dict]:
    subject = results.get(SUBJECT, {}).get("decode_step_ms_median")
    rows = []
    for what, baseline, required in TARGETS:
        if subject is None:
            measured = None
        elif baseline is None:
            measured = 1e3 / subject / limit_tok_s
        else:
            other = results.get(baseline, {}).get("decode_step_ms_median")
            measured = other / subject if other else None
        rows.append({
            "target": what, "required": required, "measured": measured,
            "reached": None if measured is None else ("yes" if measured >= required else "no"),
        })
    return rows


if __name__ == "__main__":
    main()

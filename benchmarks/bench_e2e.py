"""End-to-end decode speed of an HQQ model on CPU: hqexport's exports against onnxruntime-genai's model builder.

    python benchmarks/bench_e2e.py           # SmolLM2-135M-Instruct, hqq 4-bit g64 axis 1 (tests/smollm2.py)
    python benchmarks/bench_e2e.py --tiny    # a tiny hqexport.sample model, about a minute (the smoke test)
    python benchmarks/bench_e2e.py --compute-dtype float16 --out e2e-fp16.json  # hqq's GPU default compute dtype

In a work folder it builds, each in its own process (wall time, peak RSS):

- hqexport: `convert` (the exact default: HQQMatMulNBits nodes, the compiled kernel library in the folder, named in
  genai_config.json), `--no-kernels` (the same graph without the library: its function bodies, stock onnxruntime
  ops), `--ops hqq` (HQQMatMul nodes with the library), `--accuracy-level 4 --lm-head int8` and `--accuracy-level 4
  --lm-head int4` (lossy), and `hqexport-fp32`: the same graph on hqq's dequantized weights as plain fp32 MatMuls,
  the head included (our own fp32 export, stock onnxruntime ops);
- onnxruntime-genai's model builder (`python -m onnxruntime_genai.models.builder -e cpu`) on a Hugging Face folder
  of the same dequantized weights: `-p fp32`, `-p int4` with its defaults (accuracy_level 4, block 32), and
  `-p int4` with accuracy_level 1 (fp32 compute) and the source's group size as block size.

Each ONNX variant then runs in a fresh process (batch 1, greedy, default threads) through plain onnxruntime, with
samples/python_generate's Decoder (the code a user runs: it registers the kernel library the folder ships), and through
onnxruntime-genai (which registers it from genai_config.json): prefill of `--prefill` tokens (onnxruntime only);
a `--prompt`-token prompt, then `--decode` cached steps, each timed (tok/s = 1 / median step). Every variant runs `--rounds` times, the rounds
interleaved (all variants once, then all again), and the table shows each timing's median over the rounds, so a
slow spell of the shared machine lands on every variant rather than on one. The prefill target is measured a second
way as well: the exact default and our fp32 export in one process, 12 prefills of each alternated 0.2 s apart, the
median of the pairs' time ratios (a fresh process's three prefills meet the machine's slow spells unequally: per-round
ratios of the same two folders ranged from 0.6 to 1.3 in one run). PyTorch with hqq's HQQLinear layers
(`pytorch-hqq`) gives the reference tokens: "same tokens" counts equal greedy tokens, position by position.
The variants whose manifest lists lossy choices are also validated (`hqexport validate`: top-1 agreement and perplexity
against PyTorch-hqq).
Only ratios within one run are compared: the machines are shared and their speed moves by 2x between runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "samples" / "python_generate"))
from common import RESULTS, median_seconds, report, status_kib
from generate import Decoder, greedy
from rich.console import Console
from rich.table import Table

from hqexport.files import MANIFEST_FILE

if TYPE_CHECKING:
    from hqexport.model import QuantizedModel

#: variant -> (what it is, how it is built); the order of the table
VARIANTS = {
    "pytorch-hqq": ("PyTorch, hqq HQQLinear layers (the reference)", None),
    "builder-fp32": ("onnxruntime-genai builder -p fp32", ("builder", "-p fp32")),
    "builder-int4-acc1": ("builder -p int4, accuracy_level 1, block = group size", ("builder", "-p int4 acc1")),
    "builder-int4": ("builder -p int4 defaults (accuracy_level 4, block 32)", ("builder", "-p int4")),
    "hqexport-fp32": ("hqexport graph, dequantized fp32 weights", ("convert-fp32", [])),
    "hqexport": ("hqexport convert (default: exact, kernels library in the folder)", ("convert", [])),
    "hqexport-portable": ("convert --no-kernels (stock onnxruntime ops: exact for float32 layers)", ("convert", ["--no-kernels"])),
    "hqexport-kernels": ("convert --ops hqq (exact, HQQMatMul kernels)", ("convert", ["--ops", "hqq", "--with-kernels"])),
    "hqexport-fast": ("convert --accuracy-level 4 --lm-head int8 (lossy)", ("convert", ["--accuracy-level", "4", "--lm-head", "int8"])),
    "hqexport-fast-int4": ("convert --accuracy-level 4 --lm-head int4 (lossy)", ("convert", ["--accuracy-level", "4", "--lm-head", "int4"])),
}
SUBJECT = "hqexport"
#: (what, subject, baseline, metric, required ratio baseline / subject of the metric's time, or a bound)
TARGETS = [
    ("exact decode vs builder int4 acc1 (onnxruntime)", SUBJECT, "builder-int4-acc1", "decode_ms", 1.0),
    ("exact decode vs builder int4 acc1 (genai)", SUBJECT, "builder-int4-acc1", "genai_decode_ms", 1.0),
    ("exact decode vs our fp32 export (onnxruntime)", SUBJECT, "hqexport-fp32", "decode_ms", 2.0),
    ("exact prefill vs our fp32 export", SUBJECT, "hqexport-fp32", "prefill_ms", 1.0),
    ("lossy int4 decode vs builder int4 (onnxruntime)", "hqexport-fast-int4", "builder-int4", "decode_ms", 1.0),
    ("lossy int4 decode vs builder int4 (genai)", "hqexport-fast-int4", "builder-int4", "genai_decode_ms", 1.0),
    ("convert time vs builder int4 (builder / hqexport >= 0.5)", SUBJECT, "builder-int4", "build_seconds", 0.5),
]
#: the prefill target again, both folders in one process, their prefills alternated (interleaved_prefill)
INTERLEAVED = ("exact prefill vs our fp32 export (interleaved, one process)", SUBJECT, "hqexport-fp32", 1.0)
INTERLEAVED_PAIRS = 12
INTERLEAVED_PAUSE = 0.2  # seconds before each of its prefills (interleaved_prefill)


# ---------------------------------------------------------------- child processes


def run_task(task: dict, work: Path, reuse: bool = False) -> dict:
    """Run one worker task (this script with --worker) in a fresh process; its JSON result (peak RSS from VmHWM)."""
    name = "-".join(filter(None, (task["task"], task.get("variant"), task.get("round"))))
    spec, result = work / f"{name}.task.json", work / f"{name}.result.json"
    if reuse and result.is_file():
        return {**json.loads(result.read_text()), "reused": True}
    spec.write_text(json.dumps({**task, "result": str(result)}))
    with (work / f"{name}.log").open("w") as log:
        code = subprocess.run([sys.executable, __file__, "--worker", str(spec)], stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise RuntimeError(f"worker {name} failed ({code}):\n{(work / f'{name}.log').read_text()[-3000:]}")
    return json.loads(result.read_text())


def worker(spec_path: Path) -> None:
    spec = json.loads(spec_path.read_text())
    tasks = {"convert": run_convert, "convert-fp32": convert_fp32, "hf-folder": hf_folder, "builder": run_builder,
             "run": run_variant, "validate": run_validate, "prefill-ab": interleaved_prefill}
    started = time.perf_counter()
    result = tasks[spec["task"]](spec)
    result.setdefault("seconds", time.perf_counter() - started)
    result["process_peak_mib"] = status_kib("VmHWM") / 1024
    Path(spec["result"]).write_text(json.dumps(result))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ---------------------------------------------------------------- artifacts


def tiny_source(folder: Path, compute_dtype: str) -> Path:
    import torch

    from hqexport.sample import build_sample_model, build_tokenizer, save_hqq_pickle

    tokenizer = build_tokenizer()
    model = build_sample_model("llama", nbits=4, group_size=32, axis=1, vocab_size=tokenizer.vocab_size,
                               compute_dtype=getattr(torch, compute_dtype))
    return save_hqq_pickle(model, folder, tokenizer)


def dequantized(source: Path) -> QuantizedModel:
    """The source with every HQQ layer replaced by fp32 tensors of hqq's own dequantized weight (and its bias)."""
    from hqexport.formats.dequant import dequantize_torch
    from hqexport.model import QuantizedModel
    from hqexport.read.source import read_source

    qmodel = read_source(source)
    tensors = dict(qmodel.tensors)
    for path, layer in qmodel.linears.items():
        tensors[f"{path}.weight"] = dequantize_torch(layer).float()
        if layer.bias is not None:
            tensors[f"{path}.bias"] = layer.bias.float()
    return QuantizedModel(qmodel.config, {}, tensors, qmodel.tokenizer_files, qmodel.provenance, qmodel.skipped_modules)


def run_convert(spec: dict) -> dict:
    """`hqexport convert SOURCE -o OUT [ARGS]` through the CLI, in this (fresh) process."""
    from hqexport.cli import main

    started = time.perf_counter()
    main(["convert", spec["source"], "-o", spec["out"], *spec["args"], "--json"], standalone_mode=False)
    return {"seconds": time.perf_counter() - started}


def convert_fp32(spec: dict) -> dict:
    """hqexport's graph on the dequantized weights: every linear a fp32 MatMul, the head too (without the kernels,
    an fp head that is an exact int8 grid stays fp32: plain fp32 in stock onnxruntime ops)."""
    from hqexport.conversion import convert

    started = time.perf_counter()
    convert(dequantized(Path(spec["source"])), Path(spec["out"]), with_kernels=False, progress=False)
    return {"seconds": time.perf_counter() - started}


def hf_folder(spec: dict) -> dict:
    """A Hugging Face folder (config, fp32 safetensors, tokenizer) of the dequantized model, for the builder."""
    import shutil

    import transformers
    from safetensors.torch import save_file

    qmodel = dequantized(Path(spec["source"]))
    out = Path(spec["out"])
    out.mkdir(parents=True)
    config = {k: v for k, v in qmodel.config.items() if k != "quantization_config"}
    transformers.AutoConfig.for_model(**config).save_pretrained(out)
    tensors = {key: value.contiguous() for key, value in qmodel.tensors.items()}
    if config.get("tie_word_embeddings"):
        tensors.pop("lm_head.weight", None)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    for path in qmodel.tokenizer_files:
        shutil.copy2(path, out / path.name)
    return {}


def run_builder(spec: dict) -> dict:
    """onnxruntime-genai's model builder on the HF folder (its own process; its wall time)."""
    extra = ["hf_token=false", *spec["extra"]]
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", spec["hf"], "-o", spec["out"],
               *spec["precision"], "-e", "cpu", "-c", spec["out"] + ".cache", "--extra_options", *extra]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(done.stdout[-2000:] + done.stderr[-3000:])
    return {"seconds": time.perf_counter() - started, "command": " ".join(command[1:])}


def run_validate(spec: dict) -> dict:
    """hqexport validate on a (lossy) export: the loss figures."""
    from hqexport.validation import validate

    report_ = validate(Path(spec["path"]), progress=None)
    checks = {check.name: check for check in report_.checks}
    return {
        "passed": report_.passed,
        "top1_agreement": checks["logits"].figures.get("top1_agreement"),
        "perplexity_relative": checks["perplexity"].figures.get("relative_difference"),
        "messages": {name: check.message for name, check in checks.items()},
    }


# ---------------------------------------------------------------- running one variant


class TorchModel:
    """Greedy tokens of a transformers model with a DynamicCache, the same generator shape as the sample's Decoder."""

    def __init__(self, model) -> None:
        self.model = model

    def generate(self, prompt: list[int], max_new_tokens: int) -> Iterator[int]:
        import torch

        ids, cache = torch.tensor([prompt]), None
        for _ in range(max_new_tokens):
            with torch.inference_mode():
                out = self.model(input_ids=ids, cache=cache, use_cache=True)
            cache, token = out.cache, int(out.logits[0, -1].argmax())
            yield token
            ids = torch.tensor([[token]])


def onnx_tokens(decoder: Decoder, prompt: list[int], max_new_tokens: int, adapter: str | None = None) -> Iterator[int]:
    """Greedy tokens from samples/python_generate's Decoder (the user's path), EOS ignored."""
    return decoder.generate(prompt, max_new_tokens, greedy, adapter, stop_at_eos=False)


def timed(tokens: Iterator[int], steps: int) -> tuple[list[int], list[float]]:
    """The prompt's token (the prefill, untimed), then `steps` tokens, each timed."""
    generated, seconds = [next(tokens)], []
    for _ in range(steps):
        started = time.perf_counter()
        generated.append(next(tokens))
        seconds.append(time.perf_counter() - started)
    return generated, seconds


def genai_tokens(folder: Path, prompt: list[int], max_new_tokens: int) -> Iterator[int]:
    """The same greedy tokens through onnxruntime-genai's Generator (which registers the library genai_config.json
    names)."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + max_new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens([prompt])
    for _ in range(max_new_tokens):
        generator.generate_next_token()
        yield int(generator.get_next_tokens()[0])


def run_variant(spec: dict) -> dict:
    """Load one variant and time it; session peak from a high-water mark reset just before the load."""
    import numpy  # noqa: F401 - imported before the baseline so that imports are not counted
    import onnxruntime  # noqa: F401

    torch_variant = spec["variant"] == "pytorch-hqq"
    if torch_variant:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    baseline, load_average = _rss_bytes(), os.getloadavg()[0]
    folder = Path(spec["path"])
    tokens = spec["tokens"]
    if torch_variant:
        from hqexport.validation.reference import load_reference

        model = TorchModel(load_reference(folder).model)
        run = model.generate
    else:
        model = Decoder(folder)  # registers the kernel library the folder ships, as a user of the sample does
        run = partial(onnx_tokens, model)
    prefill = median_seconds(lambda: next(run(tokens[: spec["prefill"]], 1)), warmup=1, repeats=3)
    generated, seconds = timed(run(tokens[: spec["prompt"]], spec["decode"] + 1), spec["decode"])
    result = {
        "prefill_ms": prefill * 1e3,
        "decode_ms": statistics.median(seconds) * 1e3,
        "tokens": generated,
        "session_peak_mib": (status_kib("VmHWM") * 1024 - baseline) / 2**20,
        "load_average_1min": load_average,
    }
    if not torch_variant:
        del model
        generated, seconds = timed(genai_tokens(folder, tokens[: spec["prompt"]], spec["decode"] + 1), spec["decode"])
        result.update(genai_decode_ms=statistics.median(seconds) * 1e3, genai_tokens=generated)
    return result


def interleaved_prefill(spec: dict) -> dict:
    """Two folders' prefills in one process, alternated (which goes first alternates too): the ratio of their times
    pair by pair, so that a slow spell of the shared machine, which fresh processes a minute apart meet unequally,
    slows both sides of a pair alike. Each prefill waits INTERLEAVED_PAUSE first: the intra-op threads of the
    session that ran last spin for a while after its run, and without the pause took the cores from whichever
    session ran second (one folder against itself: pair ratios 0.71-0.89 and 0.93-1.22 by turns, median 0.91; with
    the pause 0.85-1.25 in no order, median 0.99)."""
    subject, baseline = (Decoder(Path(path)) for path in (spec["subject"], spec["baseline"]))
    prompt = spec["tokens"][: spec["prefill"]]

    def seconds(decoder: Decoder) -> float:
        time.sleep(INTERLEAVED_PAUSE)
        started = time.perf_counter()
        next(onnx_tokens(decoder, prompt, 1))
        return time.perf_counter() - started

    seconds(subject), seconds(baseline)  # warm-up
    pairs = []
    for pair in range(spec["pairs"]):
        if pair % 2:
            theirs, mine = seconds(baseline), seconds(subject)
        else:
            mine, theirs = seconds(subject), seconds(baseline)
        pairs.append((mine, theirs))
    return {
        "ratio": statistics.median(theirs / mine for mine, theirs in pairs),
        "subject_ms": statistics.median(mine for mine, _ in pairs) * 1e3,
        "baseline_ms": statistics.median(theirs for _, theirs in pairs) * 1e3,
        "pairs_ms": [[mine * 1e3, theirs * 1e3] for mine, theirs in pairs],
    }


# ---------------------------------------------------------------- orchestration


def graph_facts(folder: Path) -> dict:
    """Nodes per decoder layer (all nodes / layers) and file bytes of an ONNX folder; an hqexport folder's lossy
    choices (its manifest's model.lossy)."""
    import onnx

    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    layers = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]["num_hidden_layers"]
    files = [p for p in folder.iterdir() if p.name.startswith("model.onnx")]
    facts = {"nodes": len(model.graph.node), "nodes_per_layer": len(model.graph.node) / layers, "file_bytes": sum(p.stat().st_size for p in files)}
    manifest = folder / MANIFEST_FILE
    if manifest.is_file():
        facts["lossy"] = json.loads(manifest.read_text())["model"]["lossy"]
    return facts


def build(
    source: Path, work: Path, selected: list[str], group_size: int, reuse: bool, variants: dict[str, tuple] = VARIANTS
) -> tuple[dict[str, Path | str], dict]:
    """Build what the selected `variants` need: (variant -> folder, or why it is skipped; build facts per variant)."""
    paths: dict[str, Path | str] = {}
    facts: dict[str, dict] = {}
    builder_options = {"-p fp32": (["-p", "fp32"], []), "-p int4": (["-p", "int4"], []),
                       "-p int4 acc1": (["-p", "int4"], ["accuracy_level=1", f"block_size={group_size}"])}
    needs_hf = any(variants[v][1] and variants[v][1][0] == "builder" for v in selected)
    if needs_hf:
        run_task({"task": "hf-folder", "source": str(source), "out": str(work / "hf")}, work, reuse)
    for variant in selected:
        how = variants[variant][1]
        out = work / variant
        if how is None:
            paths[variant] = source
            continue
        kind, options = how
        if kind == "builder":
            precision, extra = builder_options[options]
            facts[variant] = run_task({"task": "builder", "variant": variant, "hf": str(work / "hf"), "out": str(out),
                                       "precision": precision, "extra": extra}, work, reuse)
        elif kind == "convert-fp32":
            facts[variant] = run_task({"task": "convert-fp32", "variant": variant, "source": str(source), "out": str(out)}, work, reuse)
        else:
            facts[variant] = run_task({"task": "convert", "variant": variant, "source": str(source), "out": str(out), "args": options}, work, reuse)
        paths[variant] = out
    return paths, {"variants": facts}


def source_model(tiny: bool, work: Path, reuse: bool, compute_dtype: str = "float32") -> tuple[Path, str, int]:
    """(hqq source folder, its name for the table, its group size): SmolLM2 (cached) or a tiny sample in `work`,
    quantized by hqq with `compute_dtype`."""
    if tiny:
        source = work / "source" if reuse and (work / "source").is_dir() else tiny_source(work / "source", compute_dtype)
        return source, f"tiny hqexport.sample llama (hqq 4-bit g32 axis 1, {compute_dtype} compute)", 32
    from tests.smollm2 import QUANT, smollm2_hqq

    return smollm2_hqq(compute_dtype), f"SmolLM2-135M-Instruct (hqq 4-bit g64 axis 1, {compute_dtype} compute)", QUANT["group_size"]


def in_work_folder(work: Path | None, prefix: str, run: Callable[[Path], None]) -> None:
    """run(folder): in `work` (created if missing), or in a temporary folder removed afterwards."""
    if work is not None:
        work.mkdir(parents=True, exist_ok=True)
        run(work)
    else:
        with tempfile.TemporaryDirectory(prefix=prefix) as scratch:
            run(Path(scratch))


def source_tokens(source: Path, count: int) -> list[int]:
    import transformers

    from hqexport.sample import corpus_text

    tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    ids = tokenizer(corpus_text(), add_special_tokens=False).input_ids
    if len(ids) < count:
        raise RuntimeError(f"the corpus gives only {len(ids)} tokens, {count} needed")
    return ids[:count]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a tiny hqexport.sample llama instead of SmolLM2-135M")
    parser.add_argument("--compute-dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                        help="hqq's compute dtype for the source model (float16 is hqq's default on GPUs)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of: " + ", ".join(VARIANTS))
    parser.add_argument("--prompt", type=int, default=26, help="prompt tokens before the timed decode steps")
    parser.add_argument("--decode", type=int, default=64, help="timed decode steps")
    parser.add_argument("--prefill", type=int, default=128, help="tokens of the timed prefill")
    parser.add_argument("--rounds", type=int, default=3, help="timed runs of every variant, interleaved; the table shows medians")
    parser.add_argument("--no-validate", action="store_true", help="skip validating the lossy variants")
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
    os.environ.setdefault("COLUMNS", "200")  # rich would squeeze the table to 80 columns without a terminal
    out = args.out or RESULTS / ("e2e-tiny.json" if args.tiny else "e2e.json")
    if args.work and not args.reuse and args.work.is_dir() and any(args.work.iterdir()):
        parser.error(f"--work {args.work} is not empty: pass --reuse to reuse the models in it, or name an empty folder")
    in_work_folder(args.work, "hqexport-bench-", lambda work: benchmark(args, work, selected, out))


def benchmark(args: argparse.Namespace, work: Path, selected: list[str], out: Path) -> None:
    started, load_start = time.perf_counter(), os.getloadavg()
    source, model_name, group_size = source_model(args.tiny, work, args.reuse, args.compute_dtype)
    paths, built = build(source, work, selected, group_size, args.reuse)
    tokens = source_tokens(source, max(args.prefill, args.prompt))
    runnable = [variant for variant in selected if not isinstance(paths[variant], str)]
    results: dict[str, dict] = {variant: {"skipped": paths[variant]} for variant in selected if variant not in runnable}
    rounds: dict[str, list[dict]] = {variant: [] for variant in runnable}
    for round_ in range(args.rounds):  # every variant once per round, so that a slow spell of the machine hits them all
        for variant in runnable:
            spec = {"task": "run", "variant": variant, "round": f"round{round_}", "path": str(paths[variant]), "tokens": tokens,
                    "prompt": args.prompt, "decode": args.decode, "prefill": args.prefill}
            rounds[variant].append(run_task(spec, work))
    for variant in selected:
        if variant not in runnable:
            continue
        path = paths[variant]
        results[variant] = median_of_rounds(rounds[variant])
        if variant != "pytorch-hqq":
            results[variant].update(graph_facts(path))
        if variant in built["variants"]:
            results[variant]["build_seconds"] = built["variants"][variant]["seconds"]
            results[variant]["build_peak_mib"] = built["variants"][variant]["process_peak_mib"]
        if results[variant].get("lossy") and not args.no_validate:
            results[variant]["validate"] = run_task({"task": "validate", "variant": variant, "path": str(path)}, work)

    _, subject, baseline, _ = INTERLEAVED
    interleaved = None
    if subject in runnable and baseline in runnable:
        interleaved = run_task({"task": "prefill-ab", "subject": str(paths[subject]), "baseline": str(paths[baseline]),
                                "tokens": tokens, "prefill": args.prefill, "pairs": INTERLEAVED_PAIRS}, work)
    rows = table_rows(results)
    targets = target_rows(results, interleaved)
    extra = {
        "model": model_name,
        "source": str(source),
        "settings": {"prompt": args.prompt, "decode": args.decode, "prefill": args.prefill, "rounds": args.rounds, "batch": 1,
                     "compute_dtype": args.compute_dtype,
                     "threads": "onnxruntime defaults", "cpu_count": os.cpu_count()},
        "load_average": {"start": load_start, "end": os.getloadavg()},
        "build": built,
        "variants": results,
        "interleaved_prefill": interleaved,
        "targets": targets,
        "seconds": time.perf_counter() - started,
    }
    report(
        f"{model_name} on CPU ({os.cpu_count()} cores), batch 1 greedy",
        ["variant", "exact", "decode tok/s ort", "decode tok/s genai", "vs builder-int4-acc1", "prefill ms", "nodes/layer",
         "file MB", "peak MiB", "build s", "same tokens ort", "same tokens genai", "top-1 agreement"],
        rows, out, extra,
    )
    targets_table = Table(title=f"targets (one run; ratios of the baseline's time to the subject's, {SUBJECT} = exact default)")
    for column in ("target", "required", "measured", "reached"):
        targets_table.add_column(column)
    for target in targets:
        measured = "n/a" if target["measured"] is None else f"{target['measured']:.2f}"
        targets_table.add_row(target["target"], f"{target['required']:g}", measured, target["reached"] or "n/a")
    Console().print(targets_table)


def median_of_rounds(runs: list[dict]) -> dict:
    """One variant's result: the first round's, with each timing the median over the rounds (all rounds kept)."""
    result = dict(runs[0])
    for metric in ("decode_ms", "prefill_ms", "genai_decode_ms"):
        if metric in result:
            result[metric] = statistics.median(run[metric] for run in runs)
    result["rounds"] = [{metric: run.get(metric) for metric in ("decode_ms", "prefill_ms", "genai_decode_ms", "load_average_1min")} for run in runs]
    if any(run["tokens"] != result["tokens"] for run in runs):
        raise RuntimeError("greedy tokens differ between rounds of one variant")
    return result


def _same(tokens: list[int] | None, reference: list[int] | None) -> str | None:
    if tokens is None or reference is None:
        return None
    return f"{sum(a == b for a, b in zip(tokens, reference))}/{len(reference)}"


def table_rows(results: dict[str, dict]) -> list[dict]:
    reference = results.get("pytorch-hqq", {}).get("tokens")
    baseline = results.get("builder-int4-acc1", {}).get("decode_ms")
    rows = []
    for variant, result in results.items():
        if "skipped" in result:
            rows.append({"variant": variant, "what": VARIANTS[variant][0], "note": result["skipped"]})
            continue
        genai = result.get("genai_decode_ms")
        rows.append({
            "variant": variant,
            "what": VARIANTS[variant][0],
            "exact": "no" if result.get("lossy") or variant.startswith("builder-int4") else "yes",
            "decode tok/s ort": 1e3 / result["decode_ms"],
            "decode tok/s genai": 1e3 / genai if genai else None,
            "vs builder-int4-acc1": baseline / result["decode_ms"] if baseline else None,
            "prefill ms": result["prefill_ms"],
            "nodes/layer": result.get("nodes_per_layer"),
            "file MB": result["file_bytes"] / 1e6 if "file_bytes" in result else None,
            "peak MiB": result["session_peak_mib"],
            "build s": result.get("build_seconds"),
            "same tokens ort": _same(result["tokens"], reference),
            "same tokens genai": _same(result.get("genai_tokens"), reference),
            "top-1 agreement": result.get("validate", {}).get("top1_agreement"),
        })
    return rows


def _target(what: str, required: float, measured: float | None, at_most: bool = False) -> dict:
    """One target row: reached when `measured` is at least (or, at_most, at most) `required`; None when not run."""
    reached = None if measured is None else ("yes" if (measured <= required if at_most else measured >= required) else "no")
    return {"target": what, "required": required, "measured": measured, "reached": reached}


def target_rows(results: dict[str, dict], interleaved: dict | None) -> list[dict]:
    rows = []
    for what, subject, baseline, metric, required in TARGETS:
        mine, theirs = results.get(subject, {}).get(metric), results.get(baseline, {}).get(metric)
        rows.append(_target(what, required, theirs / mine if mine and theirs else None))
    layers = results.get(SUBJECT, {}).get("nodes_per_layer")
    rows.append(_target("nodes per decoder layer (exact default) <= 15", 15, layers, at_most=True))
    top1 = results.get("hqexport-fast-int4", {}).get("validate", {}).get("top1_agreement")
    rows.append(_target("lossy int4 top-1 agreement with PyTorch-hqq >= 0.95", 0.95, top1))
    if interleaved is not None:
        what, _, _, required = INTERLEAVED
        rows.append(_target(what, required, interleaved["ratio"]))
    return rows


if __name__ == "__main__":
    main()

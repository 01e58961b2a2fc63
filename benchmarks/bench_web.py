"""Decode speed in the browser: onnxruntime-web (WASM, 1 and N threads; WebGPU on a hardware adapter) in headless
Chromium, hqexport's exports next to onnxruntime-genai's model builder int4 models of the same weights.

    python benchmarks/bench_web.py                      # SmolLM2-135M (about 15 minutes)
    python benchmarks/bench_web.py --tiny --decode 4    # a tiny hqexport.sample llama (the smoke test)

Needs `npm ci` in samples/js and Debian's chromium. The models are built as bench_e2e.py builds them (same
variant names; `--work DIR --reuse` shares a work folder with it). Each folder is served by samples/js/serve.mjs
(cross-origin isolated, so WASM threads work) and decoded by the web sample's page through
samples/js/browser_run.mjs: a fresh browser per run, rounds interleaved; the page times every step (median of the
decode steps; the prompt's run is the prefill; load = creating the session: download, then onnxruntime's
optimizations). Ratios are to the builder's default int4 model at the same thread count, in the same run; tokens
are compared position by position with the default export's in the same browser.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlencode

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_e2e import VARIANTS as E2E_VARIANTS
from bench_e2e import build, in_work_folder, source_model
from common import RESULTS, report

JS = Path(__file__).resolve().parents[1] / "samples" / "js"
#: bench_e2e's variants, plus the HQQMatMul function bodies (the kernels library is of no use in a browser)
BUILDS = {
    **E2E_VARIANTS,
    "hqexport-hqq": ("convert --ops hqq --no-kernels (HQQMatMul function bodies, folded to fp32 at load)", ("convert", ["--ops", "hqq", "--no-kernels"])),
}
VARIANTS = ("builder-int4", "builder-int4-acc1", "hqexport-fp32", "hqexport", "hqexport-portable", "hqexport-hqq")
BASELINE = "builder-int4"
EXACT = "hqexport"  # the default export, whose tokens bench_e2e.py and validate check against PyTorch-hqq natively
PROMPT = "The old lighthouse keeper climbed the stairs every evening"


def page_run(folder: Path, query: dict[str, str | int], timeout: int = 1200) -> dict:
    """One run of the web sample on `folder` in a fresh headless Chromium: its window.hqexportRun."""
    server = subprocess.Popen(["node", str(JS / "serve.mjs"), str(folder), "--port", "0"], stdout=subprocess.PIPE, text=True)
    try:
        url = server.stdout.readline().strip()
        done = subprocess.run(["node", str(JS / "browser_run.mjs"), f"{url}?{urlencode({'autorun': 1, **query})}",
                               "--timeout", str(timeout)], capture_output=True, text=True)
    finally:
        server.terminate()
        server.wait()
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        raise RuntimeError(f"the page failed on {folder}: {done.stdout[-2000:]}{done.stderr[-2000:]}")
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a tiny hqexport.sample llama instead of SmolLM2-135M")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of: " + ", ".join(VARIANTS))
    parser.add_argument("--threads", default="1,2", help="WASM thread counts, comma-separated")
    parser.add_argument("--decode", type=int, default=16, help="timed decode steps per run")
    parser.add_argument("--rounds", type=int, default=2, help="runs of every row, interleaved; the table shows medians")
    parser.add_argument("--work", type=Path, help="keep the built models here (default: a temporary folder)")
    parser.add_argument("--reuse", action="store_true", help="reuse the models already in --work")
    parser.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/web.json, or web-tiny.json)")
    args = parser.parse_args()
    selected = args.variants.split(",")
    if set(selected) - set(VARIANTS):
        parser.error(f"unknown variants {sorted(set(selected) - set(VARIANTS))}")
    if not (JS / "node_modules" / "onnxruntime-web").is_dir():
        parser.error("run `npm ci` in samples/js first (samples/js/README.md)")
    os.environ.setdefault("COLUMNS", "200")
    out = args.out or RESULTS / ("web-tiny.json" if args.tiny else "web.json")
    in_work_folder(args.work, "hqexport-web-", lambda work: benchmark(args, work, selected, out))


def benchmark(args: argparse.Namespace, work: Path, selected: list[str], out: Path) -> None:
    started = time.perf_counter()
    source, model_name, group_size = source_model(args.tiny, work, args.reuse)
    paths, facts = build(source, work, selected, group_size, args.reuse, BUILDS)
    threads = [int(t) for t in args.threads.split(",")]
    query = {"prompt": PROMPT, "tokens": args.decode + 1, "ignore_eos": 1}

    probe = page_run(paths[selected[0]], {**query, "tokens": 1})  # "auto": WebGPU only on a hardware adapter
    backends = [("wasm", t) for t in threads] + ([("webgpu", 0)] if probe["backend"] == "webgpu" else [])
    runs: dict[tuple[str, str, int], list[dict]] = {}
    for _ in range(args.rounds):
        for variant in selected:
            for backend, count in backends:
                result = page_run(paths[variant], {**query, "backend": backend, "threads": count})
                runs.setdefault((variant, backend, count), []).append(result)

    rows, results = [], {}
    for (variant, backend, count), variant_runs in runs.items():
        decode_ms = statistics.median(r["msPerToken"] for r in variant_runs)
        prefill_ms = statistics.median(r["prefillMs"] for r in variant_runs)
        load_ms = statistics.median(r["loadMs"] for r in variant_runs)
        results[f"{variant} {backend} {count}"] = {
            "decode_ms": decode_ms, "prefill_ms": prefill_ms, "load_ms": load_ms, "tokens": variant_runs[0]["tokens"],
            "rounds": [{"decode_ms": r["msPerToken"], "prefill_ms": r["prefillMs"], "load_ms": r["loadMs"]} for r in variant_runs],
        }
    for (variant, backend, count) in runs:
        result = results[f"{variant} {backend} {count}"]
        baseline = results.get(f"{BASELINE} {backend} {count}")
        exact = results.get(f"{EXACT} {backend} {count}")
        rows.append({
            "variant": variant,
            "what": BUILDS[variant][0],
            "backend": backend if backend == "webgpu" else f"wasm {count} thread{'s' if count > 1 else ''}",
            "decode ms": round(result["decode_ms"], 1),
            "tok/s": round(1000 / result["decode_ms"], 2),
            f"speed vs {BASELINE}": round(baseline["decode_ms"] / result["decode_ms"], 2) if baseline else None,
            "prefill ms": round(result["prefill_ms"]),
            "load ms": round(result["load_ms"]),
            f"same tokens as {EXACT}": sum(a == b for a, b in zip(result["tokens"], exact["tokens"])) if exact else None,
        })
    notes = {"webgpu": "measured" if probe["backend"] == "webgpu" else "no hardware WebGPU adapter in this Chromium (not measured)"}
    report(
        f"onnxruntime-web in headless Chromium, {model_name}: {args.decode} greedy steps after a {len(probe['promptIds'])}-token prompt",
        list(rows[0]),
        rows,
        out,
        {"model": model_name, "variants": results, "build": facts, "notes": notes, "seconds": round(time.perf_counter() - started, 1),
         "chromium": subprocess.run(["/usr/bin/chromium", "--version"], capture_output=True, text=True).stdout.strip(),
         "onnxruntime_web": json.loads((JS / "node_modules" / "onnxruntime-web" / "package.json").read_text())["version"]},
    )


if __name__ == "__main__":
    main()

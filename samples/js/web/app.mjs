// The page's logic: load the folder, pick a backend, stream greedy tokens into #answer. The outcome of each run is
// also left in window.hqexportRun ({status, backend, loadMs, promptIds, tokens, text, prefillMs, msPerToken, error}) for
// tests and benchmarks/bench_web.py.
import { Tokenizer } from "@huggingface/tokenizers";
import * as ort from "onnxruntime-web";

import { checkAdapterRequest, describeFolder, generate } from "/decoder.mjs";

const params = new URLSearchParams(location.search);
const modelUrl = new URL(params.get("model") ?? "/model/", location.href);
const $ = (id) => document.getElementById(id);
window.hqexportRun = { status: "loading" };

/** A JSON file of the folder; null for a missing optional one. */
async function fetchJson(name, { optional = false } = {}) {
  const response = await fetch(new URL(name, modelUrl));
  if (response.status === 404 && optional) return null;
  if (!response.ok) throw new Error(`${new URL(name, modelUrl)}: HTTP ${response.status}`);
  return response.json();
}

/** Whether the folder has a file (HEAD request). */
async function exists(name) {
  return (await fetch(new URL(name, modelUrl), { method: "HEAD" })).ok;
}

/**
 * "webgpu" when asked for, or (auto) when the browser has a hardware WebGPU adapter; else "wasm". A fallback
 * (software) adapter such as SwiftShader is slower than WASM and decoded other tokens than PyTorch in our tests.
 */
async function chooseBackend(requested) {
  if (requested === "wasm") return "wasm";
  const adapter = navigator.gpu ? await navigator.gpu.requestAdapter() : null;
  if (requested === "webgpu") {
    if (!adapter) throw new Error("backend=webgpu: this browser has no WebGPU adapter");
    return "webgpu";
  }
  return adapter && !adapter.info?.isFallbackAdapter ? "webgpu" : "wasm";
}

async function load() {
  const [genaiConfig, manifest, tokenizerJson, tokenizerConfig] = await Promise.all([
    fetchJson("genai_config.json"),
    fetchJson("hqexport.json", { optional: true }),
    fetchJson("tokenizer.json"),
    fetchJson("tokenizer_config.json"),
  ]);
  const folder = describeFolder(genaiConfig, manifest);
  checkAdapterRequest(folder, params.get("adapter"));
  const backend = await chooseBackend(params.get("backend") ?? "auto");
  ort.env.wasm.numThreads = Number(params.get("threads") ?? 0); // 0: onnxruntime's choice (1 without cross-origin isolation)
  const externalData = (await exists("model.onnx.data"))
    ? [{ path: "model.onnx.data", data: new URL("model.onnx.data", modelUrl).href }]
    : [];
  const started = performance.now();
  const session = await ort.InferenceSession.create(new URL("model.onnx", modelUrl).href, {
    executionProviders: backend === "webgpu" ? ["webgpu", "wasm"] : ["wasm"],
    externalData,
    logSeverityLevel: 3,
  });
  const loadMs = performance.now() - started; // download, then onnxruntime's optimizations (constant folding)
  return { folder, backend, session, loadMs, tokenizer: new Tokenizer(tokenizerJson, tokenizerConfig) };
}

async function run(loaded) {
  const { folder, backend, session, loadMs, tokenizer } = loaded;
  const promptIds = tokenizer.encode($("prompt").value, { add_special_tokens: false }).ids;
  const tokens = [];
  const times = [];
  window.hqexportRun = { status: "running", backend, loadMs, promptIds, tokens };
  $("answer").textContent = "";
  let last = performance.now();
  for await (const token of generate(ort, session, folder, promptIds, Number($("tokens").value), { stopAtEos: !params.has("ignore_eos") })) {
    const now = performance.now();
    times.push(now - last);
    last = now;
    tokens.push(token);
    const text = tokenizer.decode(tokens);
    if (!text.endsWith("\ufffd")) $("answer").textContent = text;
  }
  const decodeTimes = times.slice(1).sort((a, b) => a - b); // the first is the prompt's run
  const msPerToken = decodeTimes.length ? decodeTimes[Math.floor(decodeTimes.length / 2)] : null;
  const text = tokenizer.decode(tokens);
  $("answer").textContent = text;
  window.hqexportRun = { status: "done", backend, loadMs, promptIds, tokens, text, prefillMs: times[0], msPerToken };
  $("status").textContent = `${backend}: ${tokens.length} tokens` + (msPerToken ? `, ${msPerToken.toFixed(1)} ms per token` : "");
}

function fail(error) {
  window.hqexportRun = { status: "error", error: String(error.message ?? error) };
  $("status").textContent = `error: ${error.message ?? error}`;
}

if (params.has("prompt")) $("prompt").value = params.get("prompt");
if (params.has("tokens")) $("tokens").value = params.get("tokens");
load().then((loaded) => {
  $("status").textContent = `ready (${loaded.backend})`;
  window.hqexportRun = { status: "ready", backend: loaded.backend, loadMs: loaded.loadMs };
  $("generate").disabled = false;
  $("generate").onclick = () => run(loaded).catch(fail);
  if (params.has("autorun")) return run(loaded);
}).catch(fail);

// Greedy decoding of an hqexport folder with onnxruntime's JavaScript API: the same code runs on onnxruntime-node
// (Node.js) and onnxruntime-web (browser: WebGPU or WASM). The caller passes the `ort` module it imported.
//
// The folder is self-describing: model.onnx (+ model.onnx.data), genai_config.json (layers, KV heads, head size,
// EOS), hqexport.json (activation dtype, adapters; optional) and tokenizer.json / tokenizer_config.json. Inputs: input_ids,
// attention_mask, position_ids (when the graph has it) and past_key_values.{i}.key/value; outputs logits and
// present.{i}.key/value, which become the next step's past.

/**
 * What a folder's JSON files say about its decoder. `manifest` (hqexport.json) may be null: a folder of another
 * tool with a genai_config.json (onnxruntime-genai's model builder) runs too, as fp32 without adapters.
 */
export function describeFolder(genaiConfig, manifest) {
  const decoder = genaiConfig.model.decoder;
  const eos = genaiConfig.model.eos_token_id;
  return {
    layers: decoder.num_hidden_layers,
    kvHeads: decoder.num_key_value_heads,
    headDim: decoder.head_size,
    eos: new Set(Array.isArray(eos) ? eos : [eos]),
    cacheType: manifest?.model?.dtype === "fp16" ? "float16" : "float32",
    adapters: Object.keys(manifest?.adapters ?? {}),
  };
}

/**
 * Refuse what onnxruntime's JavaScript API cannot do: it has no LoRA adapter API, so a folder's separate
 * adapters (adapters/NAME.onnx_adapter) cannot be activated; the model itself runs as the base model.
 */
export function checkAdapterRequest(folder, adapter) {
  if (adapter === undefined || adapter === null || adapter === "" || adapter === "base") return;
  throw new Error(
    `adapter '${adapter}': onnxruntime's JavaScript API (node, web) cannot activate separate LoRA adapters; ` +
      "export one model per adapter with `hqexport convert --adapter NAME=PATH --adapters bake` and load that folder" +
      (folder.adapters.length ? ` (this folder's separate adapters: ${folder.adapters.join(", ")})` : ""),
  );
}

/** float16 bits -> number (logits of an fp16 export where the runtime has no Float16Array, e.g. Node 20). */
function halfToNumber(bits) {
  const sign = bits & 0x8000 ? -1 : 1;
  const exponent = (bits >> 10) & 0x1f;
  const fraction = bits & 0x3ff;
  if (exponent === 0) return sign * fraction * 2 ** -24;
  if (exponent === 31) return fraction ? NaN : sign * Infinity;
  return sign * (1 + fraction / 1024) * 2 ** (exponent - 15);
}

/** Index of the largest of the last position's logits [1, positions, vocab] (first one on ties, as numpy). */
export function argmaxLast(logits) {
  const [, positions, vocab] = logits.dims;
  const offset = (positions - 1) * vocab;
  // float16 data is a Float16Array where the JavaScript engine has one (Chromium), else the raw bits
  const bits = logits.type === "float16" && logits.data instanceof Uint16Array;
  const value = bits ? (i) => halfToNumber(logits.data[offset + i]) : (i) => logits.data[offset + i];
  let best = 0;
  let bestValue = value(0);
  for (let i = 1; i < vocab; i++) {
    const v = value(i);
    if (v > bestValue) {
      best = i;
      bestValue = v;
    }
  }
  return best;
}

function int64Tensor(ort, values, dims) {
  return new ort.Tensor("int64", BigInt64Array.from(values, (v) => BigInt(v)), dims);
}

/**
 * Yield greedy tokens one by one: one run over the prompt, then one run per token on the cache.
 * `session` is an ort.InferenceSession over the folder's model.onnx.
 */
export async function* generate(ort, session, folder, promptIds, maxNewTokens, { stopAtEos = true } = {}) {
  const empty = folder.cacheType === "float16" ? new Uint16Array(0) : new Float32Array(0);
  let past = {};
  for (let i = 0; i < folder.layers; i++) {
    for (const kind of ["key", "value"]) {
      past[`past_key_values.${i}.${kind}`] = new ort.Tensor(folder.cacheType, empty, [1, folder.kvHeads, 0, folder.headDim]);
    }
  }
  const usesPositionIds = session.inputNames.includes("position_ids");
  let ids = promptIds;
  let length = 0;
  for (let n = 0; n < maxNewTokens; n++) {
    const step = ids.length;
    const feeds = {
      input_ids: int64Tensor(ort, ids, [1, step]),
      attention_mask: int64Tensor(ort, new Array(length + step).fill(1), [1, length + step]),
      ...past,
    };
    if (usesPositionIds) feeds.position_ids = int64Tensor(ort, Array.from({ length: step }, (_, i) => length + i), [1, step]);
    const results = await session.run(feeds);
    past = {};
    for (const [name, value] of Object.entries(results)) {
      if (name.startsWith("present.")) past[name.replace("present.", "past_key_values.")] = value;
    }
    length += step;
    const token = argmaxLast(results.logits);
    yield token;
    if (stopAtEos && folder.eos.has(token)) return;
    ids = [token];
  }
}

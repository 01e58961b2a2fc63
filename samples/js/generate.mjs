// Generate text from an hqexport folder in Node.js with onnxruntime-node (greedy, streamed).
//
//   node generate.mjs FOLDER --prompt "Once upon a time" [--max-new-tokens 32] [--token-ids] [--ignore-eos]
//
// onnxruntime-node loads no custom-op library here, so hqexport's ops run as their ONNX function bodies: export
// with `hqexport convert --no-kernels` for a folder that runs at full speed on stock onnxruntime.
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { parseArgs } from "node:util";

import { Tokenizer } from "@huggingface/tokenizers";
import * as ort from "onnxruntime-node";

import { checkAdapterRequest, describeFolder, generate } from "./decoder.mjs";

const USAGE = "usage: node generate.mjs FOLDER --prompt TEXT [--max-new-tokens N] [--token-ids] [--ignore-eos] [--adapter base]";

function readJson(folder, name) {
  return JSON.parse(readFileSync(join(folder, name), "utf8"));
}

async function main() {
  const { values, positionals } = parseArgs({
    allowPositionals: true,
    options: {
      prompt: { type: "string" },
      "max-new-tokens": { type: "string", default: "32" },
      "token-ids": { type: "boolean", default: false },
      "ignore-eos": { type: "boolean", default: false },
      adapter: { type: "string" },
      threads: { type: "string", default: "0" },
    },
  });
  if (positionals.length !== 1 || values.prompt === undefined) throw new Error(USAGE);
  const [path] = positionals;
  const folder = describeFolder(readJson(path, "genai_config.json"), readJson(path, "hqexport.json"));
  checkAdapterRequest(folder, values.adapter);
  const tokenizer = new Tokenizer(readJson(path, "tokenizer.json"), readJson(path, "tokenizer_config.json"));
  const session = await ort.InferenceSession.create(join(path, "model.onnx"), {
    executionProviders: ["cpu"],
    intraOpNumThreads: Number(values.threads),
    logSeverityLevel: 3, // LoRA parameters are overridable initializers: onnxruntime warns about each one
  });
  const promptIds = tokenizer.encode(values.prompt, { add_special_tokens: false }).ids;
  const tokens = [];
  let shown = "";
  const options = { stopAtEos: !values["ignore-eos"] };
  for await (const token of generate(ort, session, folder, promptIds, Number(values["max-new-tokens"]), options)) {
    tokens.push(token);
    if (values["token-ids"]) continue;
    const text = tokenizer.decode(tokens);
    if (!text.endsWith("\ufffd")) {
      process.stdout.write(text.slice(shown.length));
      shown = text;
    }
  }
  if (values["token-ids"]) process.stdout.write(JSON.stringify({ prompt: promptIds, tokens }) + "\n");
  else process.stdout.write(tokenizer.decode(tokens).slice(shown.length) + "\n");
}

main().catch((error) => {
  process.stderr.write(`error: ${error.message}\n`);
  process.exit(1);
});

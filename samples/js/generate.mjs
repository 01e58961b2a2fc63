// Generate text from an hqexport folder in Node.js with onnxruntime-node (greedy, streamed).
//
//   node generate.mjs FOLDER --prompt "Once upon a time" [--max-new-tokens 32] [--token-ids] [--ignore-eos]
//
// onnxruntime-node loads no custom-op library here, so hqexport's ops run as their ONNX function bodies: export
// with `hqexport convert --no-kernels` for a folder that runs at full speed on stock onnxruntime.
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { parseArgs } from "node:util";

import { Tokenizer } from "@huggingface/tokenizers";
import * as ort from "onnxruntime-node";

import { checkAdapterRequest, describeFolder, generate } from "./decoder.mjs";

const USAGE = "usage: node generate.mjs FOLDER --prompt TEXT [--max-new-tokens N] [--token-ids] [--ignore-eos] [--threads N] [--adapter base]";

/** A JSON file of the folder; null for a missing optional one (hqexport.json: other tools' folders run too). */
function readJson(folder, name, { optional = false } = {}) {
  const file = join(folder, name);
  if (optional && !existsSync(file)) return null;
  return JSON.parse(readFileSync(file, "utf8"));
}

/** A mistake in the command line or the folder: exit code 2, as the hqexport CLI. */
class UserError extends Error {}

/** The arguments and the folder's description, tokenizer and session; a UserError for what the user got wrong. */
async function open() {
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
  if (positionals.length !== 1 || values.prompt === undefined) throw new UserError(USAGE);
  const [path] = positionals;
  try {
    const folder = describeFolder(readJson(path, "genai_config.json"), readJson(path, "hqexport.json", { optional: true }));
    checkAdapterRequest(folder, values.adapter);
    const tokenizer = new Tokenizer(readJson(path, "tokenizer.json"), readJson(path, "tokenizer_config.json"));
    const session = await ort.InferenceSession.create(join(path, "model.onnx"), {
      executionProviders: ["cpu"],
      intraOpNumThreads: Number(values.threads),
      logSeverityLevel: 3, // LoRA parameters are overridable initializers: onnxruntime warns about each one
    });
    return { values, folder, tokenizer, session };
  } catch (error) {
    throw new UserError(`${path}: ${error.message}`);
  }
}

async function main() {
  const { values, folder, tokenizer, session } = await open();
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
  process.exit(error instanceof UserError ? 2 : 1);
});

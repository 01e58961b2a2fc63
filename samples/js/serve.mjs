// A static server for the web sample: this folder at / (the page at /, web/, decoder.mjs, node_modules/) and an
// exported folder at /model/. It sends the cross-origin isolation headers that WASM threads need.
//
//   node serve.mjs FOLDER [--port 8000] [--host 127.0.0.1]      then open http://127.0.0.1:8000/
import { createReadStream, statSync } from "node:fs";
import { createServer } from "node:http";
import { dirname, extname, join, normalize, resolve, sep } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";

const HERE = dirname(fileURLToPath(import.meta.url));
const TYPES = {
  ".html": "text/html; charset=utf-8",
  ".mjs": "text/javascript",
  ".js": "text/javascript",
  ".json": "application/json",
  ".jinja": "text/plain",
  ".wasm": "application/wasm",
  ".onnx": "application/octet-stream",
  ".data": "application/octet-stream",
  ".map": "application/json",
};

/** The file a URL path names under `root`, or null when it leaves root or is not a file. */
function fileUnder(root, path) {
  const file = normalize(join(root, decodeURIComponent(path)));
  if (file !== root && !file.startsWith(root + sep)) return null;
  try {
    return statSync(file).isFile() ? file : null;
  } catch {
    return null;
  }
}

const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: { port: { type: "string", default: "8000" }, host: { type: "string", default: "127.0.0.1" } },
});
if (positionals.length !== 1) {
  process.stderr.write("usage: node serve.mjs FOLDER [--port 8000] [--host 127.0.0.1]\n");
  process.exit(2);
}
const model = resolve(positionals[0]);
try {
  statSync(join(model, "model.onnx"));
} catch {
  process.stderr.write(`error: ${model} has no model.onnx (an hqexport output folder?)\n`);
  process.exit(2);
}

const server = createServer((request, response) => {
  const path = new URL(request.url, "http://x").pathname;
  const file = path === "/" ? join(HERE, "web", "index.html")
    : path.startsWith("/model/") ? fileUnder(model, path.slice("/model/".length))
    : fileUnder(HERE, path.slice(1));
  const headers = { "Cross-Origin-Opener-Policy": "same-origin", "Cross-Origin-Embedder-Policy": "require-corp" };
  if (file === null) {
    response.writeHead(404, headers).end("not found");
    return;
  }
  response.writeHead(200, { ...headers, "Content-Type": TYPES[extname(file)] ?? "application/octet-stream", "Content-Length": statSync(file).size });
  if (request.method === "HEAD") response.end();
  else createReadStream(file).pipe(response);
});
server.listen(Number(values.port), values.host, () => {
  const { address, port } = server.address();
  process.stdout.write(`http://${address}:${port}/\n`);
});

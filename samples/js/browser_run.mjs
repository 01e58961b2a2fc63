// Open the web sample in headless Chromium (Debian's /usr/bin/chromium through playwright-core, no browser
// download), wait for its run, print window.hqexportRun as one JSON line; exit 1 when the page reports an error.
//
//   node browser_run.mjs "http://127.0.0.1:8000/?prompt=Hello&tokens=16&autorun=1" [--chromium PATH] [--timeout S]
import { parseArgs } from "node:util";

import { chromium } from "playwright-core";

const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: { chromium: { type: "string", default: "/usr/bin/chromium" }, timeout: { type: "string", default: "600" } },
});
if (positionals.length !== 1) {
  process.stderr.write("usage: node browser_run.mjs URL [--chromium PATH] [--timeout SECONDS]\n");
  process.exit(2);
}
const browser = await chromium.launch({
  executablePath: values.chromium,
  args: ["--no-sandbox", "--enable-unsafe-webgpu"], // no sandbox: containers run Chromium as root
});
try {
  const page = await browser.newPage();
  const console_errors = [];
  page.on("pageerror", (error) => console_errors.push(String(error)));
  await page.goto(positionals[0]);
  await page.waitForFunction(() => ["done", "error"].includes(window.hqexportRun?.status), null, { timeout: Number(values.timeout) * 1000 });
  const result = await page.evaluate(() => window.hqexportRun);
  if (console_errors.length) result.pageErrors = console_errors;
  process.stdout.write(JSON.stringify(result) + "\n");
  process.exitCode = result.status === "done" ? 0 : 1;
} finally {
  await browser.close();
}

// Drive headless Chromium (Debian's, not a downloaded build) to render.html and save the frame.
//
//   node render.mjs '{"url": "http://127.0.0.1:PORT/render.html?...", "out": "frame.png",
//                     "chromium": "/usr/bin/chromium", "timeoutMs": 240000}'
//
// Prints one JSON line: {"numSplats": N, "timings": {...}, "console": [...]} on success; exits 1 with the page's
// error and console otherwise. tests/viewers.py serves the page and calls this script.
import { writeFileSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

const spec = JSON.parse(process.argv[2]);
const timeout = spec.timeoutMs ?? 240000;
const profile = mkdtempSync(join(tmpdir(), "sharp-chromium-"));
const messages = [];

// No GPU here: WebGL2 through ANGLE on SwiftShader, Chromium's CPU Vulkan. No network but
// loopback, no background services.
const args = [
  "--headless=new",
  "--no-sandbox",
  "--disable-gpu-sandbox",
  "--use-gl=angle",
  "--use-angle=swiftshader",
  "--enable-unsafe-swiftshader",
  "--ignore-gpu-blocklist",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
  "--disable-dev-shm-usage",
  `--user-data-dir=${profile}`,
];

let context;
let code = 0;
try {
  // launchPersistentContext: Playwright would otherwise pass a user-data-dir of its own.
  context = await chromium.launchPersistentContext(profile, {
    executablePath: spec.chromium ?? "/usr/bin/chromium",
    headless: true,
    args: args.filter((a) => !a.startsWith("--user-data-dir") && a !== "--headless=new"),
    timeout: 60000,
    viewport: null,
  });
  const page = context.pages()[0] ?? (await context.newPage());
  page.on("console", (m) => messages.push(`${m.type()}: ${m.text()}`));
  // An error outside render()'s promise (a module that fails to load) ends the wait at once.
  const failed = new Promise((_, reject) => {
    page.on("pageerror", (e) => {
      messages.push(`pageerror: ${e}`);
      reject(new Error(`page error: ${e}`));
    });
  });
  await page.goto(spec.url, { timeout: 60000 });
  await Promise.race([
    page.waitForFunction(() => window.renderResult !== undefined, null, { timeout }),
    failed,
  ]);
  const result = await page.evaluate(() => window.renderResult);
  if (!result.ok) {
    throw new Error(result.error);
  }
  const prefix = "data:image/png;base64,";
  if (!result.png.startsWith(prefix)) {
    throw new Error(`canvas gave no PNG: ${result.png.slice(0, 40)}`);
  }
  writeFileSync(spec.out, Buffer.from(result.png.slice(prefix.length), "base64"));
  console.log(
    JSON.stringify({ numSplats: result.numSplats, timings: result.timings, console: messages }),
  );
} catch (error) {
  console.error(String(error && error.stack || error));
  console.error(JSON.stringify({ console: messages }));
  code = 1;
} finally {
  if (context) {
    await context.close().catch(() => {});
  }
  rmSync(profile, { recursive: true, force: true });
}
process.exit(code);

// Drive headless Chromium through sharp-runpod's viewer page (engine/viewer/page.html), as a
// user would: pick a photo (or open a file's page), wait until the splat is shown, and save
// the canvas.
//
//   node page.mjs '{"url": "http://127.0.0.1:PORT/", "photo": "coffee.jpg", "out": "frame.png",
//                   "width": 200, "height": 300, "chromium": "/usr/bin/chromium", "timeoutMs": 600000}'
//
// Prints one JSON line, window.sharpViewer and the console, on success; exits 1 otherwise.
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

const spec = JSON.parse(process.argv[2]);
const timeout = spec.timeoutMs ?? 600000;
const profile = mkdtempSync(join(tmpdir(), "sharp-page-"));
const messages = [];
// As render.mjs: WebGL2 on SwiftShader, loopback only.
const args = [
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
];

let context;
let code = 0;
try {
  context = await chromium.launchPersistentContext(profile, {
    executablePath: spec.chromium ?? "/usr/bin/chromium",
    headless: true,
    args,
    timeout: 60000,
    viewport: { width: spec.width, height: spec.height },
    deviceScaleFactor: 1,
  });
  const page = context.pages()[0] ?? (await context.newPage());
  page.on("console", (m) => messages.push(`${m.type()}: ${m.text()}`));
  page.on("pageerror", (e) => messages.push(`pageerror: ${e}`));
  await page.goto(spec.url, { timeout: 60000 });
  if (spec.photo) {
    await page.setInputFiles("#photo", spec.photo);
  }
  await page.waitForFunction(
    () => ["shown", "error"].includes(window.sharpViewer?.state),
    null,
    { timeout, polling: 500 },
  );
  const viewer = await page.evaluate(() => window.sharpViewer);
  if (viewer.state !== "shown") {
    throw new Error(`the page says: ${JSON.stringify(viewer)}`);
  }
  // A few more frames, then the page as the user sees it: the canvas fills the viewport.
  await page.evaluate(() => new Promise((done) => {
    let frames = 0;
    const next = () => (++frames >= 5 ? done() : requestAnimationFrame(next));
    requestAnimationFrame(next);
  }));
  await page.screenshot({ path: spec.out, timeout: 120000 });
  console.log(JSON.stringify({ viewer, console: messages }));
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

// Loads the ops dashboard in headless Chromium (Debian's `chromium` through playwright-core) and prints, as
// JSON on stdout, the numbers the page shows: the tiles, the funnel, each bank's bar for each function
// (clicking the toggle, as a person would), the loss states. Saves a screenshot.
//
// usage: node dashboard.mjs <dashboard url> <screenshot.png>
import { chromium } from "playwright-core";

const [url, screenshot] = process.argv.slice(2);
if (!url || !screenshot) {
  console.error("usage: node dashboard.mjs <dashboard url> <screenshot.png>");
  process.exit(2);
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM_PATH || "/usr/bin/chromium",
  headless: true,
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
});
try {
  const page = await browser.newPage({ viewport: { width: 1440, height: 960 } });
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  page.on("requestfailed", (r) => errors.push(`request failed: ${r.url()}`));
  // No external resource may be needed: the page works offline.
  const origin = new URL(url).origin;
  const external = [];
  page.on("request", (r) => {
    if (new URL(r.url()).origin !== origin) external.push(r.url());
  });
  await page.goto(url, { waitUntil: "load" });
  // The first poll has rendered.
  await page.waitForSelector("body[data-generated-at]", { timeout: 30000 });

  const shown = { tiles: {}, funnel: [], banks: {}, loss_states: {}, errors, external_requests: external };
  for (const el of await page.$$("[data-metric]")) {
    shown.tiles[await el.getAttribute("data-metric")] = (await el.textContent()).trim();
  }
  shown.funnel = await page.$$eval("#funnel g[data-stage]", (gs) =>
    gs.map((g) => ({
      stage: g.dataset.stage,
      count: g.querySelector("text.count").textContent.trim(),
      median_micros: g.querySelector("text.median")?.dataset.medianMicros ?? null,
    })),
  );
  for (const fn of ["physical", "social", "financial"]) {
    await page.click(`.toggle button[data-function="${fn}"]`);
    shown.banks[fn] = await page.$$eval("#banks g[data-bank]", (gs) =>
      gs.map((g) => ({
        bank: g.dataset.bank,
        total: g.querySelector("text.total").textContent.trim(),
        states: Object.fromEntries([...g.querySelectorAll("rect[data-state]")].map((r) => [r.dataset.state, r.dataset.count])),
      })),
    );
  }
  shown.loss_states = Object.fromEntries(
    await page.$$eval("#loss g[data-loss-state]", (gs) =>
      gs.map((g) => [g.dataset.lossState, g.querySelector("text.count").textContent.trim()]),
    ),
  );
  await page.click('.toggle button[data-function="physical"]');
  await page.waitForTimeout(1200);
  await page.screenshot({ path: screenshot, fullPage: true });
  process.stdout.write(JSON.stringify(shown));
} finally {
  await browser.close();
}

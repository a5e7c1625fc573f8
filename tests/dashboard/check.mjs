// Opens the agent's dashboard in headless Chromium, waits until it shows the given
// service and at least one live connection, and saves a screenshot.
// usage: node check.mjs URL SERVICE SCREENSHOT.png
import { chromium } from "playwright-core";

const [url, service, shot] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 800 } });
  const errors = [];
  page.on("pageerror", e => errors.push(String(e)));
  await page.goto(url);
  await page.waitForFunction(s => document.querySelector("#services tbody")?.textContent.includes(s), service, { timeout: 15000 });
  await page.waitForFunction(() => document.querySelectorAll("#conns tbody tr").length > 0, null, { timeout: 15000 });
  // Let a few samples accumulate so the traffic chart has a line.
  await page.waitForTimeout(2500);
  await page.screenshot({ path: shot, fullPage: true });
  const result = {
    summary: await page.textContent("#summary"),
    services: await page.textContent("#services tbody"),
    conns: await page.locator("#conns tbody tr").count(),
    charts: await page.locator("#charts canvas").count(),
    errors,
  };
  console.log(JSON.stringify(result));
} finally {
  await browser.close();
}

// Drives the agent's dashboard in headless Chromium for tests/tests/observability.rs and
// reports what it shows; the test asserts on the values.
//
// usage: node check.mjs URL SCREENSHOT.png TCP_SERVICE HTTP_SERVICE WORKLOAD REQUESTS TAPPED
//
// Waits until the page shows TCP_SERVICE (opaque, a connection open from WORKLOAD) and
// HTTP_SERVICE with REQUESTS requests, reads the signals, the service map, the workload
// and connection tables, then starts the tap filtered to HTTP_SERVICE and prints
// `tap-started` on a line of its own: the test then makes TAPPED requests, which the
// check waits to see in the tap. Last, it stops the tap and prints one JSON document.
import { chromium } from "playwright-core";

const [url, shot, tcp, http, workload, requests, tapped] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const wait = (what, fn, arg, timeout = 20000) =>
  page.waitForFunction(fn, arg, { timeout }).catch(e => { throw new Error(`waiting for ${what}: ${e.message}`); });

let page;
const errors = [], offsite = [], failed = [];
try {
  page = await browser.newPage({ viewport: { width: 1280, height: 800 } });
  const origin = new URL(url).origin;
  page.on("pageerror", e => errors.push("page error: " + e));
  page.on("console", m => { if (m.type() === "error" || m.type() === "warning") errors.push(`console ${m.type()}: ${m.text()}`); });
  page.on("request", r => { if (!r.url().startsWith(origin + "/") && !r.url().startsWith("data:")) offsite.push(r.url()); });
  page.on("requestfailed", r => failed.push({ url: r.url().slice(origin.length), error: r.failure()?.errorText ?? "" }));
  await page.goto(url);

  await wait("the TCP service in #services", s => document.querySelector("#services tbody")?.textContent.includes(s), tcp);
  await wait("its connection in #conns, by workload",
    ([s, w]) => [...document.querySelectorAll(`#conns tbody tr[data-service="${s}"] td.client`)].some(td => td.dataset.workload === w),
    [tcp, workload]);
  await wait(`${http} with ${requests} requests in #signals`,
    ([s, n]) => document.querySelector(`#signals tr[data-service="${s}"] td.requests`)?.dataset.value === n, [http, requests]);
  await wait("the map's edges to and from the HTTP service",
    ([w, s]) => [...document.querySelectorAll("#map g.edge")].some(e => e.dataset.kind === "route" && e.dataset.from === w && e.dataset.to === s)
             && [...document.querySelectorAll("#map g.edge")].some(e => e.dataset.kind === "endpoint" && e.dataset.from === s),
    [workload, http]);

  const seen = await page.evaluate(() => {
    const number = v => (v === undefined || v === "" ? null : Number(v));
    const cells = tr => Object.fromEntries([...tr.querySelectorAll("td[data-value]")].map(td => [td.classList[0], number(td.dataset.value)]));
    return {
      summary: document.querySelector("#summary").textContent,
      signals: Object.fromEntries([...document.querySelectorAll("#signals tbody tr[data-service]")].map(tr => [tr.dataset.service, {
        ...cells(tr),
        health: ["ok", "warn", "bad", "idle"].find(c => tr.querySelector("td.success")?.classList.contains(c)) ?? null,
        text: tr.textContent,
      }])),
      workloads: Object.fromEntries([...document.querySelectorAll("#workloads tbody tr[data-workload]")].map(tr => [tr.dataset.workload, cells(tr)])),
      nodes: [...document.querySelectorAll("#map g.node")].map(g => ({ kind: g.dataset.kind, name: g.dataset.name, label: g.querySelector("text")?.textContent ?? "" })),
      edges: [...document.querySelectorAll("#map g.edge")].map(g => ({
        kind: g.dataset.kind, from: g.dataset.from, to: g.dataset.to, rps: number(g.dataset.rps), cps: number(g.dataset.cps),
        success: number(g.dataset.success), requests: number(g.dataset.requests), open: number(g.dataset.open),
        class: g.getAttribute("class"), label: g.querySelector("text")?.textContent ?? "",
      })),
      conns: [...document.querySelectorAll("#conns tbody tr")].map(tr => ({
        service: tr.dataset.service, workload: tr.querySelector("td.client")?.dataset.workload, client: tr.querySelector("td.client")?.textContent,
      })),
      services: document.querySelector("#services tbody").textContent,
    };
  });

  // The tap, filtered to the HTTP service.
  await wait("the HTTP service among the tap's choices", s => [...document.querySelectorAll("#tap-service option")].some(o => o.value === s), http);
  await page.selectOption("#tap-service", http);
  await page.click("#tap-toggle");
  await wait("the tap to start", () => document.querySelector("#tap-status")?.dataset.state === "streaming", null, 10000);
  console.log("tap-started");
  await wait(`${tapped} requests in the tap`, n => document.querySelectorAll("#tap tbody tr[data-kind=request]").length >= Number(n), tapped, 30000);
  // Another poll or two, so the charts have the latest point.
  await page.waitForTimeout(2500);
  await page.screenshot({ path: shot, fullPage: true });

  const tap = await page.evaluate(() => [...document.querySelectorAll("#tap tbody tr")].map(tr => ({
    kind: tr.dataset.kind, service: tr.dataset.service, path: tr.dataset.path, status: Number(tr.dataset.status),
    endpoint: tr.dataset.endpoint, workload: tr.querySelector("td.client")?.dataset.workload, text: tr.textContent,
  })));
  // Pixels of each line on the HTTP service's latency chart (p50 blue, p99 red).
  const chart = await page.evaluate(s => {
    const canvases = document.querySelectorAll("#charts canvas").length;
    const cv = document.querySelector(`#charts .card[data-service="${s}"] canvas.latency`);
    if (!cv) return { canvases, p50: 0, p99: 0 };
    const px = cv.getContext("2d").getImageData(0, 0, cv.width, cv.height).data;
    let p50 = 0, p99 = 0;
    for (let i = 0; i < px.length; i += 4) {
      const [r, g, b, a] = [px[i], px[i + 1], px[i + 2], px[i + 3]];
      if (a > 128 && b > 180 && r < 90 && g < 140) p50++;
      if (a > 128 && r > 180 && g < 90 && b < 90) p99++;
    }
    return { canvases, p50, p99 };
  }, http);

  await page.click("#tap-toggle");
  await wait("the tap to stop", () => document.querySelector("#tap-status")?.dataset.state === "stopped", null, 5000);
  // The browser reports the aborted stream a moment later: wait for it, 5 s at most.
  const tapAborted = () => failed.some(f => f.url.startsWith("/tap?") && f.error.includes("ABORTED"));
  for (const until = Date.now() + 5000; !tapAborted() && Date.now() < until;) await page.waitForTimeout(100);
  const stopped = { button: await page.getAttribute("#tap-toggle", "data-state"), aborted: tapAborted() };
  console.log(JSON.stringify({ ...seen, tap, chart, stopped, failed, offsite, errors }));
} catch (e) {
  // What the page said, to tell a broken page from a slow one.
  console.error(`${e.message}\npage errors: ${JSON.stringify(errors)}\nfailed requests: ${JSON.stringify(failed)}`);
  await page?.screenshot({ path: shot, fullPage: true }).catch(() => {});
  process.exitCode = 1;
} finally {
  await browser.close();
}

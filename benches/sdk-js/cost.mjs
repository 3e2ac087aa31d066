// What a tracking call costs the page's main thread, in headless Chromium:
// `trailmark.track()` at growing depths of the persisted queue (the server
// unreachable, so nothing leaves it), against two baselines measured in the
// same page and run:
//   - build: the same message built and JSON-encoded, nothing stored;
//   - append: that, plus one localStorage.setItem of the single event, the
//     least any persisted queue must do.
// Run from the repository root after `npm ci && npm run build` in sdk-js:
//   node benches/sdk-js/cost.mjs            (CHROMIUM=/path overrides)
// Results go to benches/RESULTS.md by hand.

import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';

const require = createRequire(new URL('../../sdk-js/package.json', import.meta.url));
const { chromium } = require('playwright-core');
const sdk = readFileSync(new URL('../../sdk-js/dist/trailmark.min.js', import.meta.url), 'utf8');
const ORIGIN = 'https://site.example';
const ROUNDS = Number(process.env.ROUNDS || 5);

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  args: ['--no-sandbox', '--disable-dev-shm-usage'],
});
const page = await browser.newPage();
// The page and the SDK come from routes; the API host refuses connections.
await page.route(`${ORIGIN}/`, (r) => r.fulfill({ contentType: 'text/html', body: '<!doctype html><title>bench</title>' }));
await page.route(`${ORIGIN}/sdk.js`, (r) => r.fulfill({ contentType: 'text/javascript', body: sdk }));
await page.route('https://api.example/**', (r) => r.abort('connectionrefused'));
await page.goto(`${ORIGIN}/`);
await page.addScriptTag({ url: `${ORIGIN}/sdk.js` });

const result = await page.evaluate(async (rounds) => {
  const props = { sku: 'SKU-0001', name: 'Trail running shoe', price: 129.95, currency: 'EUR', quantity: 1 };
  for (let i = 0; i < 20; i++) props[`attr_${i}`] = `value number ${i}`;
  const median = (xs) => xs.slice().sort((a, b) => a - b)[xs.length >> 1];
  const perCall = (n, f) => {
    const t = performance.now();
    for (let i = 0; i < n; i++) f(i);
    return ((performance.now() - t) * 1000) / n; // µs per call
  };
  const tm = window.trailmark;
  tm.load('wk_bench', { apiHost: 'https://api.example', flushAt: 1e9, flushInterval: 1e9, maxQueueSize: 500 });
  const out = { build: [], append: [], track: { 0: [], 250: [], 475: [] }, eventBytes: 0 };
  for (let r = 0; r < rounds; r++) {
    out.build.push(
      perCall(200, (i) => JSON.stringify({ type: 'track', event: 'Product Added', properties: props, messageId: String(i), timestamp: new Date().toISOString(), context: { page: { url: location.href } } })),
    );
    out.append.push(
      perCall(200, (i) => localStorage.setItem(`bench.${i % 25}`, JSON.stringify({ type: 'track', event: 'Product Added', properties: props, messageId: String(i), timestamp: new Date().toISOString(), context: { page: { url: location.href } } }))),
    );
    for (let i = 0; i < 25; i++) localStorage.removeItem(`bench.${i}`);
    // Fill the queue in steps, timing 25 calls at each depth.
    tm.setConsent('denied');
    tm.setConsent('granted');
    let depth = 0;
    for (const at of [0, 250, 475]) {
      while (depth < at) {
        tm.track('Filler', props);
        depth++;
      }
      out.track[at].push(perCall(25, () => tm.track('Product Added', props)));
      depth += 25;
    }
    await new Promise((w) => setTimeout(w, 0));
  }
  const keys = Object.keys(localStorage).filter((k) => k.includes('.q.'));
  const total = keys.reduce((n, k) => n + new TextEncoder().encode(localStorage.getItem(k)).length, 0);
  out.eventBytes = Math.round(total / keys.length);
  return {
    eventBytes: out.eventBytes,
    build: median(out.build),
    append: median(out.append),
    track0: median(out.track[0]),
    track250: median(out.track[250]),
    track475: median(out.track[475]),
  };
}, ROUNDS);
await browser.close();

const f = (x) => `${x.toFixed(1)} µs`;
console.log(`chromium ${browser.version?.() ?? ''}; median of ${ROUNDS} rounds; ~${result.eventBytes} bytes per queued event`);
console.log(`baseline build (message + JSON, no storage): ${f(result.build)}`);
console.log(`baseline append (+ one localStorage.setItem of the event): ${f(result.append)}`);
for (const d of [0, 250, 475]) {
  const t = result[`track${d}`];
  console.log(`track() at queue depth ${d}: ${f(t)}  (${(t / result.append).toFixed(1)}x append)`);
}

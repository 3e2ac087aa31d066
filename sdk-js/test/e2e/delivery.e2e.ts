// Browser → Trailmark delivery, end to end: page exit mid-batch, a server
// that is unavailable for a while, a reload while offline, another tab
// taking over the queue of a tab that went away, and one visitor crossing
// to another of the site's domains.

import type { Browser, Request } from 'playwright-core';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { close, configured, eventsOf, launch, sdkReady, startFlakyProxy, startSite, startTrailmark, type PageSdk, type Trailmark } from './harness';

type Sent = { batch?: { messageId: string; userId?: string; type: string }[] };

/** messageIds the page sent (of identified users only, unless `all`), from
 * the requests Chromium made. */
function recorder(all = false) {
  const ids = new Set<string>();
  return {
    ids,
    on: (req: Request) => {
      if (req.method() !== 'POST' || !req.url().endsWith('/v1/batch')) return;
      for (const m of (JSON.parse(req.postData() || '{}') as Sent).batch || []) if (all || m.userId) ids.add(m.messageId);
    },
  };
}

describe.skipIf(!configured)('trailmark.js against a real server', () => {
  let tm: Trailmark;
  let browser: Browser;

  beforeAll(async () => {
    tm = await startTrailmark();
    browser = await launch();
  });
  afterAll(async () => {
    // Unset when beforeAll failed; that failure is the one to report.
    await (browser as Browser | undefined)?.close();
    await (tm as Trailmark | undefined)?.stop();
  });

  it('delivers every event exactly once when the visitor navigates away mid-batch', async () => {
    const site = await startSite(tm.url, tm.writeKey);
    const ctx = await browser.newContext();
    const page = await ctx.newPage();
    const rec = recorder();
    page.on('request', rec.on);
    const uid = `e2e-nav-${Date.now()}`;
    await page.goto(site.url);
    await sdkReady(page);
    await page.evaluate((id) => {
      const t = (window as unknown as { trailmark: PageSdk }).trailmark;
      t.identify(id, { plan: 'e2e' });
      for (let i = 0; i < 5; i++) t.track('Step', { i });
    }, uid);
    // Well before the 2 s flush: only the page-exit path can deliver these.
    await page.goto(`${site.url}/away`);
    const rows = await eventsOf(tm, uid, (r) => r.filter((x) => x.type === 'track').length >= 5);
    const ids = rows.map((r) => r.message_id);
    expect(rows.filter((r) => r.type === 'track')).toHaveLength(5);
    expect(rows.filter((r) => r.type === 'identify')).toHaveLength(1);
    expect(new Set(ids).size).toBe(ids.length); // none twice
    for (const id of rec.ids) expect(ids).toContain(id);
    await ctx.close();
    await close(site.server);
  });

  it('retries through a 503 spell, honouring Retry-After, and delivers once it recovers', async () => {
    const proxy = await startFlakyProxy(tm.url, 3);
    const site = await startSite(proxy.url, tm.writeKey, { flushInterval: 200 });
    const ctx = await browser.newContext();
    const page = await ctx.newPage();
    const uid = `e2e-503-${Date.now()}`;
    await page.goto(site.url);
    await page.evaluate((id) => {
      const t = (window as unknown as { trailmark: PageSdk }).trailmark;
      t.identify(id);
      t.track('During outage');
    }, uid);
    const rows = await eventsOf(tm, uid, (r) => r.some((x) => x.event === 'During outage'), 30_000);
    expect(proxy.state.failed).toBe(3);
    expect(proxy.state.passed).toBeGreaterThanOrEqual(1);
    expect(rows.filter((r) => r.event === 'During outage')).toHaveLength(1);
    await ctx.close();
    await close(site.server);
    await close(proxy.server);
  });

  it('keeps the queue across a reload while offline and delivers when back online', async () => {
    const proxy = await startFlakyProxy(tm.url, 0);
    const site = await startSite(proxy.url, tm.writeKey);
    const ctx = await browser.newContext();
    const page = await ctx.newPage();
    // Serve the site from the test while the network is off, so the page
    // itself can reload. setOffline flips navigator.onLine and fires the
    // offline/online events; the proxy going down makes the API really
    // unreachable, including for keepalive requests sent during the reload.
    const html = await (await fetch(site.url)).text();
    const sdk = await (await fetch(`${site.url}/sdk.js`)).text();
    await page.route(`${site.url}/`, (r) => r.fulfill({ contentType: 'text/html', body: html }));
    await page.route(`${site.url}/sdk.js`, (r) => r.fulfill({ contentType: 'text/javascript', body: sdk }));
    const uid = `e2e-offline-${Date.now()}`;
    await page.goto(site.url);
    await sdkReady(page);
    await ctx.setOffline(true);
    proxy.state.down = true;
    await page.evaluate((id) => {
      const t = (window as unknown as { trailmark: PageSdk }).trailmark;
      t.identify(id);
      t.track('Offline 1');
      t.track('Offline 2');
    }, uid);
    await page.waitForTimeout(2500); // the flush fails: nothing reaches the server
    await page.reload();
    await sdkReady(page);
    // One key per queued event (page, identify and the two tracks).
    const queued = await page.evaluate(() => Object.keys(localStorage).filter((k) => k.includes('.q.')).length);
    expect(queued).toBeGreaterThanOrEqual(4);
    expect((await eventsOf(tm, uid, () => false, 500)).length).toBe(0);
    proxy.state.down = false;
    await ctx.setOffline(false);
    const rows = await eventsOf(tm, uid, (r) => r.filter((x) => x.type === 'track').length >= 2, 30_000);
    expect(rows.filter((r) => r.type === 'track').map((r) => r.event).sort()).toEqual(['Offline 1', 'Offline 2']);
    const ids = rows.map((r) => r.message_id);
    expect(new Set(ids).size).toBe(ids.length);
    await ctx.close();
    await close(site.server);
    await close(proxy.server);
  });

  it('has another open tab deliver the queue of a tab closed while the API was unreachable', async () => {
    const proxy = await startFlakyProxy(tm.url, 0);
    const site = await startSite(proxy.url, tm.writeKey);
    const ctx = await browser.newContext();
    const open = async () => {
      const p = await ctx.newPage();
      await p.goto(site.url);
      await sdkReady(p);
      return p;
    };
    const survivor = await open();
    const rec = recorder(true);
    survivor.on('request', rec.on);
    proxy.state.down = true;
    const doomed = await open();
    const uid = `e2e-tabs-${Date.now()}`;
    const ids = await doomed.evaluate((id) => {
      const t = (window as unknown as { trailmark: PageSdk }).trailmark;
      t.identify(id);
      t.track('From the closed tab');
      t.track('From the closed tab');
      return Object.keys(localStorage).filter((k) => k.includes('.q.')).map((k) => k.slice(k.lastIndexOf('.') + 1));
    }, uid);
    await doomed.waitForTimeout(2500); // its flush fails
    await doomed.close(); // its page-exit requests fail too
    // Stay down until the closing tab has given up: its keepalive request,
    // the beacon it falls back to, and any retry the browser makes on its
    // own. Coming back while one is still in flight lets the closed tab
    // deliver, which is not what this test is about.
    const quietSince = async () => {
      for (let waited = 0; waited < 10_000; waited += 100) {
        if (Date.now() - proxy.state.refusedAt >= 1500) return;
        await survivor.waitForTimeout(100);
      }
    };
    await quietSince();
    proxy.state.down = false;
    // The survivor adopts the queue on its next lease round (every 5 s).
    const rows = await eventsOf(tm, uid, (r) => r.filter((x) => x.type === 'track').length >= 2, 30_000);
    expect(rows.filter((r) => r.type === 'track')).toHaveLength(2);
    expect(rows.filter((r) => r.type === 'identify')).toHaveLength(1);
    const got = rows.map((r) => r.message_id);
    expect(new Set(got).size).toBe(got.length);
    // And it was the surviving tab that sent them.
    const sentByA = ids.filter((id) => got.includes(id));
    expect(sentByA.length).toBeGreaterThanOrEqual(4); // page, identify, two tracks
    for (const id of sentByA) expect(rec.ids).toContain(id);
    await ctx.close();
    await close(site.server);
    await close(proxy.server);
  });

  it('keeps one anonymousId across a click to another of the site\'s domains', async () => {
    // 127.0.0.1 and localhost are two sites to the browser: separate cookies
    // and localStorage, so only the decorated link can carry the identity.
    const site = await startSite(tm.url, tm.writeKey, { crossDomains: ['localhost', '127.0.0.1'] }, (origin) =>
      origin.includes('127.0.0.1') ? `<a id="hop" href="${origin.replace('127.0.0.1', 'localhost')}/next?from=a">next</a>` : 'landed',
    );
    const ctx = await browser.newContext();
    const page = await ctx.newPage();
    await page.goto(site.url);
    await sdkReady(page);
    const before = await page.evaluate(() => {
      const t = (window as unknown as { trailmark: PageSdk }).trailmark;
      t.track('Before hop');
      return t.anonymousId();
    });
    await Promise.all([page.waitForURL(/localhost/), page.click('#hop')]);
    await sdkReady(page);
    const uid = `e2e-xd-${Date.now()}`;
    const after = await page.evaluate((id) => {
      const t = (window as unknown as { trailmark: PageSdk }).trailmark;
      t.identify(id);
      t.track('After hop');
      return t.anonymousId();
    }, uid);
    expect(after).toBe(before);
    // The parameter is gone from the address bar; the page's own is kept.
    expect(new URL(page.url()).search).toBe('?from=a');
    // The anonymous event from the first domain joins the user's timeline.
    const rows = await eventsOf(tm, uid, (r) => ['Before hop', 'After hop'].every((e) => r.some((x) => x.event === e)), 30_000);
    expect(rows.filter((r) => r.type === 'track').map((r) => r.event).sort()).toEqual(['After hop', 'Before hop']);
    await ctx.close();
    await close(site.server);
  });
});

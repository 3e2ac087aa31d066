// Owns the e2e fixtures: the Trailmark server (started from TRAILMARK_BIN, or
// an already running one at TRAILMARK_URL), a tiny origin serving the test
// page and the built bundle, a fault-injecting proxy, and Chromium.

import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { createServer, request, type Server } from 'node:http';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { createInterface } from 'node:readline';
import { chromium, type Browser, type Page } from 'playwright-core';

export interface Trailmark {
  url: string;
  writeKey: string;
  token: string;
  stop(): Promise<void>;
}

const ROOT = resolve(__dirname, '../..');

/** True when the environment says where a Trailmark server is or comes from. */
export const configured = Boolean(process.env.TRAILMARK_BIN || process.env.TRAILMARK_URL);

export async function startTrailmark(): Promise<Trailmark> {
  const writeKey = process.env.TRAILMARK_WRITE_KEY || 'wk_e2e';
  const token = process.env.TRAILMARK_TOKEN || 'tok_e2e';
  const bin = process.env.TRAILMARK_BIN;
  if (!bin) return { url: process.env.TRAILMARK_URL!.replace(/\/+$/, ''), writeKey, token, stop: async () => {} };
  const dir = mkdtempSync(join(tmpdir(), 'trailmark-e2e-'));
  const child: ChildProcess = spawn(bin, ['serve', '--listen', '127.0.0.1:0', '--data-dir', dir], {
    env: { ...process.env, TRAILMARK_BOOTSTRAP_WRITE_KEY: writeKey, TRAILMARK_BOOTSTRAP_TOKEN: token },
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  const url = await new Promise<string>((ok, fail) => {
    const t = setTimeout(() => fail(new Error('trailmark did not report its address in 30 s')), 30_000);
    child.once('exit', (c) => fail(new Error(`trailmark exited with ${c}`)));
    createInterface({ input: child.stdout! }).on('line', (line) => {
      const m = /^trailmark listening on (http:\/\/\S+)/.exec(line);
      if (m) {
        clearTimeout(t);
        ok(m[1]!);
      }
    });
  });
  return {
    url,
    writeKey,
    token,
    stop: async () => {
      child.kill('SIGTERM');
      await new Promise((r) => child.once('exit', r));
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

const listen = (s: Server) =>
  new Promise<string>((ok) => s.listen(0, '127.0.0.1', () => ok(`http://127.0.0.1:${(s.address() as { port: number }).port}`)));

export const close = (s: Server) => new Promise<void>((ok) => s.close(() => ok()));

/** The site under test: `/` embeds the snippet pointed at `apiHost`, with the
 * SDK loaded from this origin's `/sdk.js`: the bundle Trailmark itself serves
 * at `/sdk/v1/trailmark.min.js`, fetched once here so that a page can still
 * load it while the tests cut the network to Trailmark. */
export async function startSite(
  apiHost: string,
  writeKey: string,
  loadOptions = {},
  /** The page's body, given the origin it was requested on. */
  body: (origin: string) => string = () => 'e2e',
): Promise<{ url: string; server: Server }> {
  const snippet = readFileSync(join(ROOT, 'snippet.js'), 'utf8');
  const served = await fetch(`${apiHost}/sdk/v1/trailmark.min.js`);
  if (!served.ok) throw new Error(`Trailmark did not serve the SDK: ${served.status}`);
  const sdk = Buffer.from(await served.arrayBuffer());
  const server = createServer((req, res) => {
    const origin = `http://${req.headers.host}`;
    if (req.url === '/sdk.js') {
      res.writeHead(200, { 'content-type': 'text/javascript' });
      res.end(sdk);
    } else if (req.url?.startsWith('/away')) {
      res.writeHead(200, { 'content-type': 'text/html' });
      res.end('<!doctype html><title>away</title><p>no tracking here</p>');
    } else {
      const opts = JSON.stringify({ apiHost, sdkUrl: `${origin}/sdk.js`, ...loadOptions });
      const s = snippet.replace("tm.load('WRITE_KEY', { apiHost: 'API_HOST' });", `tm.load(${JSON.stringify(writeKey)}, ${opts});`);
      res.writeHead(200, { 'content-type': 'text/html' });
      res.end(`<!doctype html><html><head><title>e2e</title><script>${s}</script></head><body>${body(origin)}</body></html>`);
    }
  });
  return { url: await listen(server), server };
}

/** A proxy to Trailmark that answers the first `failures` batch POSTs with
 * 503 and Retry-After: 1 (exposed to the page via CORS), then passes through.
 * While `state.down` is set it drops connections, like a dead network: the
 * only outage Chromium's keepalive requests (which bypass Playwright's
 * routing and offline emulation) cannot get around. */
export async function startFlakyProxy(target: string, failures: number) {
  const state = { failed: 0, passed: 0, down: false, refused: 0, refusedAt: 0 };
  const t = new URL(target);
  const server = createServer((req, res) => {
    if (state.down) {
      state.refused++;
      state.refusedAt = Date.now();
      req.socket.destroy();
      return;
    }
    if (req.method === 'POST' && state.failed < failures) {
      state.failed++;
      req.resume();
      res.writeHead(503, {
        'retry-after': '1',
        'access-control-allow-origin': '*',
        'access-control-expose-headers': 'Retry-After',
        'content-type': 'application/json',
      });
      res.end('{"error":{"code":"unavailable","message":"injected by the e2e proxy"}}');
      return;
    }
    if (req.method === 'POST') state.passed++;
    const up = request(
      { host: t.hostname, port: t.port, path: req.url, method: req.method, headers: { ...req.headers, host: t.host } },
      (r) => {
        res.writeHead(r.statusCode || 502, r.headers);
        r.pipe(res);
      },
    );
    up.on('error', () => res.destroy());
    req.pipe(up);
  });
  return { url: await listen(server), server, state };
}

export function launch(): Promise<Browser> {
  return chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: [
      '--no-sandbox',
      '--disable-dev-shm-usage',
      // The offline test serves the page through page.route, which Chromium
      // places in the "public" address space; Local Network Access would then
      // block its fetches to the loopback Trailmark. Real sites are public
      // and talk to a public Trailmark, so the check is irrelevant here.
      '--disable-features=LocalNetworkAccessChecks,PrivateNetworkAccessRespectPreflightResults',
    ],
  });
}

type Row = { message_id: string; type: string; event?: string };

/** Polls the query API until `done(rows)` holds (the projector is
 * asynchronous), then returns the rows. */
export async function eventsOf(tm: Trailmark, userId: string, done: (rows: Row[]) => boolean, ms = 20_000): Promise<Row[]> {
  const until = Date.now() + ms;
  let rows: Row[] = [];
  for (;;) {
    const r = await fetch(`${tm.url}/v1/profiles/user_id:${encodeURIComponent(userId)}/events?limit=200`, {
      headers: { authorization: `Bearer ${tm.token}` },
    });
    if (r.ok) rows = ((await r.json()) as { data: Row[] }).data;
    if (done(rows) || Date.now() > until) return rows;
    await new Promise((w) => setTimeout(w, 250));
  }
}

/** The page's `window.trailmark`, as the tests call it inside page.evaluate. */
export type PageSdk = {
  initialize?: boolean;
  anonymousId(): string;
  track(event: string, properties?: object): void;
  identify(userId: string, traits?: object): void;
};

/** Waits until the SDK has replaced the snippet's stub on `page`. */
export async function sdkReady(page: Page): Promise<void> {
  await page.waitForFunction(() => (window as unknown as { trailmark: PageSdk }).trailmark.initialize);
}

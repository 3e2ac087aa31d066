// The snippet is run as a page runs it: as source text, hence Function().
/* eslint-disable @typescript-eslint/no-implied-eval, @typescript-eslint/no-unsafe-call */
import { readFileSync } from 'node:fs';
import { resolve } from 'node:path';
import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';

const SNIPPET = readFileSync(resolve(__dirname, '../../snippet.js'), 'utf8')
  .replace("'WRITE_KEY'", "'wk_snip'")
  .replace("'API_HOST'", "'https://api.example.net/'");
type W = { trailmark?: unknown[] & Record<string, unknown> };
const w = window as unknown as W;

beforeEach(() => {
  delete w.trailmark;
  document.head.innerHTML = '<script></script>';
  vi.stubGlobal('fetch', vi.fn(() => Promise.resolve(new Response('{}'))));
});
afterEach(() => {
  vi.unstubAllGlobals();
  vi.restoreAllMocks();
});

describe('snippet', () => {
  it('defines a stub that queues calls and injects the SDK script', () => {
    new Function(SNIPPET)();
    const tm = w.trailmark!;
    (tm.track as (...a: unknown[]) => unknown)('Clicked', { a: 1 });
    expect(tm._writeKey).toBe('wk_snip');
    expect([...tm]).toEqual([['page'], ['track', 'Clicked', { a: 1 }]]);
    const s = document.querySelector('script[src]') as HTMLScriptElement;
    expect(s.src).toBe('https://api.example.net/sdk/v1/trailmark.min.js');
    expect(s.async).toBe(true);
  });

  it('guards against double inclusion', () => {
    const err = vi.spyOn(console, 'error').mockImplementation(() => {});
    new Function(SNIPPET)();
    new Function(SNIPPET)();
    expect(document.querySelectorAll('script[src]')).toHaveLength(1);
    expect(w.trailmark!.length).toBe(1);
    expect(err).toHaveBeenCalledOnce();
  });

  it('is replaced by the SDK, which replays the queued calls in order', async () => {
    new Function(SNIPPET)();
    (w.trailmark!.identify as (...a: unknown[]) => unknown)('u1');
    vi.resetModules();
    await import('../../src/browser');
    const tm = w.trailmark as unknown as { user(): { id(): string | null }; initialize: boolean };
    expect(tm.initialize).toBe(true);
    expect(tm.user().id()).toBe('u1');
    // Loading the bundle again is a no-op.
    vi.resetModules();
    await import('../../src/browser');
    expect(w.trailmark).toBe(tm);
  });
});

import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import { Analytics } from '../../src/analytics';
import type { Message } from '../../src/queue';

type Body = { batch: Message[]; sentAt: string; writeKey: string };
let fetchMock: ReturnType<typeof vi.fn>;
let answers: (() => Promise<Response>)[];
let n = 0;

/** Each test uses its own write key, because instances from earlier tests
 * keep their listeners on the shared jsdom window. */
const wk = () => `wk${++n}`;
const bodies = (key: string): Body[] =>
  fetchMock.mock.calls.map((c) => JSON.parse((c[1] as RequestInit).body as string) as Body).filter((b) => b.writeKey === key);
const sent = (key: string) => bodies(key).flatMap((b) => b.batch);
const ok = () => Promise.resolve(new Response('{"success":true}', { status: 200 }));

beforeEach(() => {
  vi.useFakeTimers();
  localStorage.clear();
  for (const c of document.cookie.split('; ')) document.cookie = `${c.split('=')[0]}=; max-age=0; path=/; domain=example.com`;
  answers = [];
  fetchMock = vi.fn(() => (answers.shift() || ok)());
  vi.stubGlobal('fetch', fetchMock);
});
afterEach(() => {
  vi.useRealTimers();
  vi.unstubAllGlobals();
  vi.restoreAllMocks();
});

describe('messages', () => {
  it('builds Segment messages with v7 ids, timestamps and automatic context', async () => {
    const key = wk();
    const a = new Analytics().load(key, { apiHost: 'https://api.example.net/' });
    a.track('Clicked', { x: 1 }, { context: { ip: '1.2.3.4' }, integrations: { All: false } });
    await vi.advanceTimersByTimeAsync(2000);
    expect(fetchMock.mock.calls[0]![0]).toBe('https://api.example.net/v1/batch');
    const b = bodies(key)[0]!;
    expect(b.sentAt).toMatch(/Z$/);
    const m = b.batch[0]!;
    expect(m).toMatchObject({ type: 'track', event: 'Clicked', properties: { x: 1 }, integrations: { All: false } });
    expect(m.messageId).toMatch(/^[0-9a-f]{8}-[0-9a-f]{4}-7/);
    expect(m.anonymousId).toBe(a.anonymousId());
    expect(m.originalTimestamp).toBe(m.timestamp);
    expect(m.context).toMatchObject({
      ip: '1.2.3.4',
      page: { path: '/shop', search: '?utm_source=news&utm_campaign=spring&gclid=g1', url: location.href },
      campaign: { source: 'news', name: 'spring', gclid: 'g1' },
      library: { name: 'trailmark.js' },
      locale: navigator.language,
    });
    expect((m.context as { timezone?: string }).timezone).toBeTruthy();
  });

  it('normalises analytics.js argument shapes', async () => {
    const key = wk();
    const a = new Analytics().load(key, { apiHost: 'https://h' });
    const cb = vi.fn();
    a.page();
    a.page('Docs', 'Install', { v: 1 });
    a.page('Pricing', { plan: 'pro' });
    a.page({ only: 'props' }, cb);
    a.page('Home', null, { context: { ip: '9.9.9.9' } });
    a.page(null, { title: 'T' });
    a.identify({ email: 'a@b.c' });
    a.identify('u1', { plan: 'pro' }, { timestamp: '2024-01-02T03:04:05Z' });
    a.group('g1', { size: 3 });
    a.alias('u2');
    await vi.advanceTimersByTimeAsync(2000);
    const ms = sent(key);
    expect(ms.map((m) => m.type)).toEqual(['page', 'page', 'page', 'page', 'page', 'page', 'identify', 'identify', 'group', 'alias']);
    // As analytics.js resolves them: one string is the name, and the first
    // and second objects are the properties and the options.
    const [home, nul] = ms.splice(4, 2);
    expect(home).toMatchObject({ name: 'Home', properties: { name: 'Home' }, context: { ip: '9.9.9.9' } });
    expect(home!.category).toBeUndefined();
    expect(nul).toMatchObject({ properties: { title: 'T' } });
    expect(ms[1]).toMatchObject({ category: 'Docs', name: 'Install', properties: { v: 1, name: 'Install', category: 'Docs', path: '/shop' } });
    expect(ms[2]).toMatchObject({ name: 'Pricing', properties: { plan: 'pro' } });
    expect(ms[3]!.properties).toMatchObject({ only: 'props' });
    expect(cb).toHaveBeenCalledOnce();
    expect(ms[4]).toMatchObject({ traits: { email: 'a@b.c' } });
    expect(ms[4]!.userId).toBeUndefined();
    expect(ms[5]).toMatchObject({ userId: 'u1', traits: { email: 'a@b.c', plan: 'pro' }, timestamp: '2024-01-02T03:04:05.000Z' });
    expect(ms[6]).toMatchObject({ groupId: 'g1', traits: { size: 3 }, userId: 'u1' });
    expect(ms[7]).toMatchObject({ userId: 'u2', previousId: 'u1' });
  });

  it('queues calls made before load', async () => {
    const key = wk();
    const a = new Analytics();
    a.track('Early');
    const ready = vi.fn();
    a.ready(ready);
    a.load(key, { apiHost: 'https://h' });
    await vi.advanceTimersByTimeAsync(2000);
    expect(sent(key).map((m) => m.event)).toEqual(['Early']);
    expect(ready).toHaveBeenCalled();
  });

  it('drops an event over 32 KB with a warning', async () => {
    const warn = vi.spyOn(console, 'warn').mockImplementation(() => {});
    const key = wk();
    new Analytics().load(key, { apiHost: 'https://h' }).track('Big', { s: 'x'.repeat(40_000) });
    await vi.advanceTimersByTimeAsync(2000);
    expect(sent(key)).toEqual([]);
    expect(warn).toHaveBeenCalled();
  });
});

describe('batching', () => {
  it('sends at flushAt events or after flushInterval', async () => {
    const key = wk();
    const a = new Analytics().load(key, { apiHost: 'https://h', flushAt: 3, flushInterval: 500 });
    a.track('1');
    a.track('2');
    expect(bodies(key)).toHaveLength(0);
    a.track('3');
    await vi.advanceTimersByTimeAsync(0);
    expect(bodies(key).map((b) => b.batch.length)).toEqual([3]);
    a.track('4');
    await vi.advanceTimersByTimeAsync(499);
    expect(bodies(key)).toHaveLength(1);
    await vi.advanceTimersByTimeAsync(1);
    expect(bodies(key).map((b) => b.batch.length)).toEqual([3, 1]);
  });
});

describe('batching while a request is slow', () => {
  it('keeps flushing when the flush timer fires during a request', async () => {
    const key = wk();
    answers = [() => new Promise((r) => setTimeout(() => r(new Response('{}')), 3000))];
    const a = new Analytics().load(key, { apiHost: 'https://h', flushInterval: 500 });
    a.track('E1');
    await vi.advanceTimersByTimeAsync(600); // E1 out, answered at 3,500 ms
    a.track('E2');
    await vi.advanceTimersByTimeAsync(1000); // E2's timer fires while E1 is out
    expect(bodies(key)).toHaveLength(1);
    await vi.advanceTimersByTimeAsync(2500);
    expect(sent(key).map((m) => m.event)).toEqual(['E1', 'E2']);
  });
});

describe('retries', () => {
  it('honours Retry-After on 503 and 429, then delivers', async () => {
    const key = wk();
    answers = [
      () => Promise.resolve(new Response('', { status: 503, headers: { 'Retry-After': '3' } })),
      () => Promise.resolve(new Response('', { status: 429, headers: { 'Retry-After': '1' } })),
    ];
    new Analytics().load(key, { apiHost: 'https://h' }).track('E');
    await vi.advanceTimersByTimeAsync(2000);
    expect(bodies(key)).toHaveLength(1);
    await vi.advanceTimersByTimeAsync(2999);
    expect(bodies(key)).toHaveLength(1);
    await vi.advanceTimersByTimeAsync(1);
    expect(bodies(key)).toHaveLength(2);
    await vi.advanceTimersByTimeAsync(1000);
    expect(bodies(key)).toHaveLength(3);
    // The same messageId each time: safe, the server de-duplicates.
    expect(new Set(sent(key).map((m) => m.messageId)).size).toBe(1);
    expect(localStorage.length === 0 || !Object.keys(localStorage).some((k) => k.startsWith(`tm.${key}.q.`))).toBe(true);
  });

  it('backs off exponentially on network errors and 5xx', async () => {
    const key = wk();
    vi.spyOn(Math, 'random').mockReturnValue(1);
    answers = [() => Promise.reject(new TypeError('offline')), () => Promise.resolve(new Response('', { status: 500 }))];
    new Analytics().load(key, { apiHost: 'https://h', retryBase: 100 }).track('E');
    await vi.advanceTimersByTimeAsync(2000);
    await vi.advanceTimersByTimeAsync(100); // attempt 0: 100 ms
    expect(bodies(key)).toHaveLength(2);
    await vi.advanceTimersByTimeAsync(199);
    expect(bodies(key)).toHaveLength(2);
    await vi.advanceTimersByTimeAsync(1); // attempt 1: 200 ms
    expect(bodies(key)).toHaveLength(3);
  });

  it.each([400, 401, 413])('drops on HTTP %i with a warning', async (status) => {
    const warn = vi.spyOn(console, 'warn').mockImplementation(() => {});
    const key = wk();
    answers = [() => Promise.resolve(new Response('{}', { status }))];
    const a = new Analytics().load(key, { apiHost: 'https://h' });
    a.track('E');
    await vi.advanceTimersByTimeAsync(2000);
    await vi.advanceTimersByTimeAsync(60_000);
    expect(bodies(key)).toHaveLength(1);
    expect(warn).toHaveBeenCalledWith(expect.stringContaining(String(status)));
  });
});

describe('persistence and identity', () => {
  it('keeps the unsent queue across a reload', async () => {
    const key = wk();
    answers = [() => Promise.reject(new TypeError('offline'))];
    const a = new Analytics().load(key, { apiHost: 'https://h' });
    a.track('Offline');
    await vi.advanceTimersByTimeAsync(2000);
    expect(Object.keys(localStorage).filter((k) => k.startsWith(`tm.${key}.q.`))).toHaveLength(1); // one event
    dispatchEvent(new Event('pagehide')); // releases the lease
    new Analytics().load(key, { apiHost: 'https://h' });
    await vi.advanceTimersByTimeAsync(2000);
    const events = sent(key).filter((m) => m.event === 'Offline');
    expect(events.length).toBeGreaterThanOrEqual(2);
    expect(new Set(events.map((m) => m.messageId)).size).toBe(1);
  });

  it('persists userId and traits in a cookie on the registrable domain and localStorage; reset clears', () => {
    const key = wk();
    const a = new Analytics().load(key, { apiHost: 'https://h' });
    a.identify('u9', { plan: 'pro' });
    expect(document.cookie).toContain('tm_uid=u9');
    expect(document.cookie).toContain(`tm_aid=${a.anonymousId()}`);
    // Traits are not sent to the site's servers with every request.
    expect(document.cookie).not.toContain('tm_traits');
    expect(localStorage.getItem('tm_traits')).toBe('["u9",{"plan":"pro"}]'); // [owner, traits]
    const b = new Analytics().load(wk(), { apiHost: 'https://h' });
    expect(b.user().id()).toBe('u9');
    expect(b.user().traits()).toEqual({ plan: 'pro' });
    expect(b.anonymousId()).toBe(a.anonymousId());
    const old = b.anonymousId();
    b.reset();
    expect(b.user().id()).toBeNull();
    expect(b.anonymousId()).not.toBe(old);
    expect(document.cookie).not.toContain('tm_uid');
    // The other "tab" sees the reset at once instead of writing u9 back.
    expect(a.user().id()).toBeNull();
    expect(a.user().traits()).toEqual({});
    expect(a.anonymousId()).toBe(b.anonymousId());
  });

  it('cookies: false keeps everything in memory', async () => {
    const key = wk();
    answers = [() => Promise.reject(new TypeError('offline'))];
    const a = new Analytics().load(key, { apiHost: 'https://h', cookies: false });
    a.identify('mem');
    await vi.advanceTimersByTimeAsync(2000);
    expect(document.cookie).toBe('');
    expect(localStorage.length).toBe(0);
  });
});

describe('consent', () => {
  it('pending queues without sending or storing; granted releases', async () => {
    const key = wk();
    const a = new Analytics().load(key, { apiHost: 'https://h', consent: 'pending' });
    a.track('Before');
    await vi.advanceTimersByTimeAsync(10_000);
    expect(bodies(key)).toHaveLength(0);
    expect(document.cookie).toBe('');
    expect(localStorage.length).toBe(0);
    a.setConsent('granted');
    await vi.advanceTimersByTimeAsync(2000);
    expect(sent(key).map((m) => m.event)).toEqual(['Before']);
    expect(document.cookie).toContain('tm_aid=');
  });

  it('denied clears the queue and stops', async () => {
    const key = wk();
    const a = new Analytics().load(key, { apiHost: 'https://h', consent: 'pending' });
    a.track('Before');
    a.setConsent('denied');
    const cb = vi.fn();
    a.track('After', {}, cb);
    await vi.advanceTimersByTimeAsync(0);
    expect(cb).toHaveBeenCalledOnce(); // callers that wait on it are not stuck
    await vi.advanceTimersByTimeAsync(10_000);
    dispatchEvent(new Event('pagehide'));
    expect(bodies(key)).toHaveLength(0);
    expect(document.cookie).toBe('');
  });
});

describe('never breaks the host page', () => {
  it('takes null options, a bad timestamp and nulls in argument lists', async () => {
    const key = wk();
    const a = new Analytics().load(key, { apiHost: 'https://h' });
    expect(() => {
      a.track('T', {}, null as never);
      a.page('P', {}, null);
      a.identify('u', {}, null);
      a.track('Late', {}, { timestamp: 'not a date' });
      a.alias('u2', null as never);
    }).not.toThrow();
    await vi.advanceTimersByTimeAsync(2000);
    expect(sent(key).map((m) => m.type)).toEqual(['track', 'page', 'identify', 'track', 'alias']);
    expect(Number.isNaN(Date.parse(sent(key)[3]!.timestamp as string))).toBe(false);
  });

  it('loads in a sandboxed iframe, where touching document.cookie throws', async () => {
    const key = wk();
    Object.defineProperty(document, 'cookie', {
      configurable: true,
      get: () => {
        throw new DOMException('The document is sandboxed', 'SecurityError');
      },
      set: () => {
        throw new DOMException('The document is sandboxed', 'SecurityError');
      },
    });
    try {
      const a = new Analytics().load(key, { apiHost: 'https://h' });
      a.identify('sandboxed');
      await vi.advanceTimersByTimeAsync(2000);
      expect(sent(key).map((m) => m.userId)).toEqual(['sandboxed']);
    } finally {
      delete (document as { cookie?: string }).cookie; // back to Document.prototype's
    }
  });

  it('drops an event whose properties cannot be JSON, with a warning', async () => {
    const warn = vi.spyOn(console, 'warn').mockImplementation(() => {});
    const key = wk();
    const a = new Analytics().load(key, { apiHost: 'https://h' });
    const loop: Record<string, unknown> = {};
    loop.self = loop;
    expect(() => a.track('Loop', loop)).not.toThrow();
    expect(() => a.track('Big', { n: 10n })).not.toThrow();
    a.track('Fine');
    await vi.advanceTimersByTimeAsync(2000);
    expect(sent(key).map((m) => m.event)).toEqual(['Fine']);
    expect(warn).toHaveBeenCalledTimes(2);
  });

  it('takes traits that cannot be JSON without throwing, and ignores them', async () => {
    const warn = vi.spyOn(console, 'warn').mockImplementation(() => {});
    for (const cookies of [true, false]) {
      const key = wk();
      const a = new Analytics().load(key, { apiHost: 'https://h', cookies, consent: 'pending' });
      const loop: Record<string, unknown> = { ok: 1 };
      loop.self = loop;
      expect(() => a.identify('u', loop)).not.toThrow();
      expect(() => a.setConsent('granted')).not.toThrow();
      expect(a.user().traits()).toEqual({});
      await vi.advanceTimersByTimeAsync(2000);
      expect(sent(key).find((m) => m.type === 'identify')).toMatchObject({ userId: 'u', traits: {} });
    }
    expect(warn).toHaveBeenCalled();
  });

  it('queues a snapshot: later changes to the caller\'s objects do not reach it', async () => {
    const key = wk();
    const a = new Analytics().load(key, { apiHost: 'https://h' });
    const props: Record<string, unknown> = { n: 1 };
    a.track('Snap', props);
    props.n = 2;
    props.self = props; // a cycle after the call must not stall the queue
    await vi.advanceTimersByTimeAsync(2000);
    expect(sent(key).map((m) => m.properties)).toEqual([{ n: 1 }]);
  });

  it('survives odd input: a negative queue size, a lone surrogate in a userId', async () => {
    const key = wk();
    const a = new Analytics().load(key, { apiHost: 'https://h', maxQueueSize: -1 });
    vi.spyOn(console, 'warn').mockImplementation(() => {});
    expect(() => a.track('E')).not.toThrow();
    const b = new Analytics().load(wk(), { apiHost: 'https://h' });
    expect(() => b.identify('bad\ud800id')).not.toThrow();
    expect(b.user().id()).toBe('bad\ud800id');
  });

  it('does nothing before load', async () => {
    await expect(new Analytics().flush()).resolves.toBeUndefined();
  });

  it('leaves SVG links alone', () => {
    new Analytics().load(wk(), { apiHost: 'https://h', crossDomains: ['example.net'] });
    document.body.innerHTML = '<svg><a id="s" href="https://app.example.net/"><text>go</text></a></svg>';
    expect(() => document.getElementById('s')!.dispatchEvent(new MouseEvent('mousedown', { bubbles: true }))).not.toThrow();
    document.body.innerHTML = '';
  });
});

describe('identity shared with other tabs', () => {
  it('a tab granted consent later adopts the stored identity instead of overwriting it', () => {
    const pending = new Analytics().load(wk(), { apiHost: 'https://h', consent: 'pending' });
    const other = new Analytics().load(wk(), { apiHost: 'https://h' });
    other.identify('logged-in', { plan: 'pro' });
    pending.setConsent('granted');
    expect(other.user().id()).toBe('logged-in');
    expect(pending.user().id()).toBe('logged-in');
    expect(pending.user().traits()).toEqual({ plan: 'pro' });
  });

  it('replays only what it was told while pending over the stored identity', () => {
    const pending = new Analytics().load(wk(), { apiHost: 'https://h', consent: 'pending' });
    const other = new Analytics().load(wk(), { apiHost: 'https://h' });
    other.identify('logged-in', { plan: 'pro' });
    pending.identify({ theme: 'dark' }); // traits only: no say about who
    pending.setConsent('granted');
    expect(other.user().id()).toBe('logged-in');
    expect(other.user().traits()).toEqual({ plan: 'pro', theme: 'dark' });
  });

  it('a reset while pending wins on grant, with the anonymousId its events used', async () => {
    const key = wk();
    new Analytics().load(wk(), { apiHost: 'https://h' }).identify('someone');
    const pending = new Analytics().load(key, { apiHost: 'https://h', consent: 'pending' });
    pending.reset();
    pending.track('After logout');
    const aid = pending.anonymousId();
    pending.setConsent('granted');
    expect(pending.user().id()).toBeNull();
    expect(pending.anonymousId()).toBe(aid);
    await vi.advanceTimersByTimeAsync(2000);
    expect(sent(key).map((m) => m.anonymousId)).toEqual([aid]);
  });

  it('but keeps what it was told while consent was pending', () => {
    new Analytics().load(wk(), { apiHost: 'https://h' }).identify('before');
    const pending = new Analytics().load(wk(), { apiHost: 'https://h', consent: 'pending' });
    pending.identify('told-while-pending');
    pending.setConsent('granted');
    expect(new Analytics().load(wk(), { apiHost: 'https://h' }).user().id()).toBe('told-while-pending');
  });

  it('stops reading a cookie that does not keep what it is given', async () => {
    const key = wk();
    // A stale cookie on the parent domain shadows the one this page writes.
    document.cookie = 'tm_uid=stale; path=/; domain=example.com';
    document.cookie = 'tm_aid=stale-aid; path=/; domain=example.com';
    const a = new Analytics().load(key, { apiHost: 'https://h', cookieDomain: 'www.example.com' });
    a.identify('fresh');
    a.track('E');
    expect(a.user().id()).toBe('fresh');
    await vi.advanceTimersByTimeAsync(2000);
    expect(sent(key).map((m) => m.userId)).toEqual(['fresh', 'fresh']);
    document.cookie = 'tm_uid=; max-age=0; path=/; domain=www.example.com';
    document.cookie = 'tm_aid=; max-age=0; path=/; domain=www.example.com';
  });

  it('keeps new traits in memory when localStorage refuses them', () => {
    const a = new Analytics().load(wk(), { apiHost: 'https://h' });
    a.identify('u1', { plan: 'free' });
    const set = Storage.prototype.setItem;
    vi.spyOn(Storage.prototype, 'setItem').mockImplementation(function (this: Storage, k: string, v: string) {
      if (k === 'tm_traits') throw new DOMException('full', 'QuotaExceededError');
      set.call(this, k, v);
    });
    a.identify('u1', { plan: 'professional' });
    expect(a.user().traits()).toEqual({ plan: 'professional' });
  });
});

describe('identity when consent is withdrawn', () => {
  it('denied then granted starts a new visitor instead of restoring the old one', () => {
    const a = new Analytics().load(wk(), { apiHost: 'https://h' });
    a.identify('u1', { email: 'a@b.c' });
    const before = a.anonymousId();
    a.setConsent('denied');
    a.setConsent('granted');
    expect(a.user().id()).toBeNull();
    expect(a.user().traits()).toEqual({});
    expect(a.anonymousId()).not.toBe(before);
    expect(document.cookie).not.toContain('u1');
    expect(localStorage.getItem('tm_traits')).not.toContain('a@b.c');
  });
});

describe('options', () => {
  it('treats null and undefined as the defaults', async () => {
    const key = wk();
    const a = new Analytics().load(key, {
      apiHost: 'https://h',
      maxQueueSize: null as never,
      flushAt: undefined,
      flushInterval: null as never,
      retryMax: null as never,
    });
    a.track('Kept');
    await vi.advanceTimersByTimeAsync(1999);
    expect(sent(key)).toEqual([]);
    await vi.advanceTimersByTimeAsync(1);
    expect(sent(key).map((m) => m.event)).toEqual(['Kept']);
  });
});

describe('consent changes', () => {
  it('denied then granted resumes delivery, even from the middle of a backoff', async () => {
    const key = wk();
    answers = [() => Promise.resolve(new Response('', { status: 503, headers: { 'Retry-After': '600' } }))];
    const a = new Analytics().load(key, { apiHost: 'https://h' });
    a.track('First');
    await vi.advanceTimersByTimeAsync(2000); // 503: backing off for 10 minutes
    a.setConsent('denied');
    a.setConsent('granted');
    a.track('Second');
    await vi.advanceTimersByTimeAsync(2000);
    expect(sent(key).map((m) => m.event)).toEqual(['First', 'Second']);
  });

  it('denied deletes every queue and lease of this write key, other tabs\' too, and stops decorating links', () => {
    const key = wk();
    localStorage.setItem(`tm.${key}.q.deadtab.0190a0a0-0000-7000-8000-000000000000`, '{"messageId":"x","traits":{"email":"a@b.c"}}');
    localStorage.setItem(`tm.${key}.hb.livetab`, String(Date.now()));
    localStorage.setItem('unrelated', 'kept');
    const a = new Analytics().load(key, { apiHost: 'https://h', crossDomains: ['example.org'] });
    a.setConsent('denied');
    expect(Object.keys(localStorage)).toEqual(['unrelated']);
    expect(a.decorate('https://shop.example.org/')).toBe('https://shop.example.org/');
  });
});

describe('page exit', () => {
  it('flushes with keepalive on page exit, the oldest first, within 64 KB in flight in all', async () => {
    const key = wk();
    const a = new Analytics().load(key, { apiHost: 'https://h', flushAt: 1000 });
    for (let i = 0; i < 30; i++) a.track('E', { i, s: 'x'.repeat(4000) });
    const size = (c: unknown[]) => new TextEncoder().encode((c[1] as RequestInit).body as string).length;
    const mine = () => fetchMock.mock.calls.filter((c) => (JSON.parse((c[1] as RequestInit).body as string) as Body).writeKey === key);
    dispatchEvent(new Event('pagehide'));
    const first = mine();
    expect(first.length).toBeGreaterThan(0);
    expect(first.every((c) => (c[1] as RequestInit).keepalive)).toBe(true);
    expect(first.reduce((n, c) => n + size(c), 0)).toBeLessThan(64 * 1024);
    expect(sent(key).map((m) => (m.properties as { i: number }).i)).toEqual([...Array(sent(key).length).keys()]);
    // Hidden again before those were answered: nothing more may go out.
    dispatchEvent(new Event('pagehide'));
    expect(mine()).toHaveLength(first.length);
    // Once answered, the next exit sends the next oldest, and so on.
    for (let round = 0; round < 10 && sent(key).length < 30; round++) {
      await vi.advanceTimersByTimeAsync(0);
      dispatchEvent(new Event('visibilitychange')); // jsdom stays visible: no-op
      dispatchEvent(new Event('pagehide'));
    }
    expect(sent(key).map((m) => (m.properties as { i: number }).i)).toEqual([...Array(30).keys()]);
    a.setConsent('denied'); // its listeners outlive the test: leave nothing queued
  });

  it('falls back to sendBeacon with a text/plain Blob carrying the write key', async () => {
    const key = wk();
    const beacon = vi.fn(() => true);
    Object.defineProperty(navigator, 'sendBeacon', { value: beacon, configurable: true });
    answers = [() => Promise.reject(new TypeError('keepalive quota'))];
    new Analytics().load(key, { apiHost: 'https://h' }).track('Bye');
    dispatchEvent(new Event('pagehide'));
    await vi.advanceTimersByTimeAsync(0);
    expect(beacon).toHaveBeenCalledOnce();
    const [url, blob] = beacon.mock.calls[0] as unknown as [string, Blob];
    expect(url).toBe('https://h/v1/batch');
    expect(blob.type).toBe('text/plain');
    vi.useRealTimers(); // FileReader completes on a real task
    const text = await new Promise<string>((r) => {
      const f = new FileReader();
      f.onload = () => r(f.result as string);
      f.readAsText(blob);
    });
    expect(JSON.parse(text)).toMatchObject({ writeKey: key, batch: [{ event: 'Bye' }] });
  });
});

describe('cross-domain and SPA', () => {
  it('decorates URLs on the other cross-domains only, with a timestamp', () => {
    vi.setSystemTime(new Date('2026-01-02T03:04:05Z'));
    const a = new Analytics().load(wk(), { apiHost: 'https://h', crossDomains: ['example.org', 'www.example.com'] });
    const t = Date.parse('2026-01-02T03:04:05Z') / 1000;
    expect(a.decorate('https://shop.example.org/cart?x=1')).toBe(`https://shop.example.org/cart?x=1&tm_aid=${a.anonymousId()}.${t}`);
    expect(a.decorate('https://evil.org/')).toBe('https://evil.org/');
    // This host shares the cookie already: no parameter.
    expect(a.decorate('https://www.example.com/x')).toBe('https://www.example.com/x');
    expect(a.decorate('not a url::')).toBe('not a url::');
  });

  it('adopts a fresh tm_aid on load, ignores a stale (shared) one, and strips both from the address bar', () => {
    const home = location.href;
    const now = Math.floor(Date.now() / 1000);
    history.replaceState(null, '', `/landing?tm_aid=shared-id-1.${now - 30}&q=2`);
    const b = new Analytics().load(wk(), { apiHost: 'https://h' });
    expect(b.anonymousId()).toBe('shared-id-1');
    expect(location.search).toBe('?q=2');
    history.replaceState(null, '', `/landing?tm_aid=copied-id.${now - 600}&q=3`);
    const c = new Analytics().load(wk(), { apiHost: 'https://h' });
    expect(c.anonymousId()).toBe('shared-id-1'); // the cookie's, not the stale link's
    expect(location.search).toBe('?q=3');
    history.replaceState(null, '', '/landing?tm_aid=no-timestamp');
    expect(new Analytics().load(wk(), { apiHost: 'https://h' }).anonymousId()).toBe('shared-id-1');
    expect(location.search).toBe('');
    history.replaceState(null, '', home);
  });

  it('decorates a cross-domain link when it is pressed, and leaves other links alone', () => {
    const a = new Analytics().load(wk(), { apiHost: 'https://h', crossDomains: ['example.net'] });
    document.body.innerHTML =
      '<a id="x" href="https://app.example.net/p?a=1"><span id="in">go</span></a><a id="y" href="https://other.org/">other</a>';
    const x = document.getElementById('x') as HTMLAnchorElement;
    const y = document.getElementById('y') as HTMLAnchorElement;
    document.getElementById('in')!.dispatchEvent(new MouseEvent('mousedown', { bubbles: true }));
    expect(new URL(x.href).searchParams.get('tm_aid')).toMatch(new RegExp(`^${a.anonymousId()}\\.\\d+$`));
    expect(new URL(x.href).searchParams.get('a')).toBe('1');
    y.dispatchEvent(new MouseEvent('click', { bubbles: true, cancelable: true }));
    expect(y.href).toBe('https://other.org/');
    // Text nodes and the document are not elements: nothing breaks.
    document.dispatchEvent(new MouseEvent('mousedown', { bubbles: true }));
    document.body.innerHTML = '';
  });

  it('trackHistory sends a page view per URL change, with the previous URL as referrer', async () => {
    const key = wk();
    const home = location.href;
    new Analytics().load(key, { apiHost: 'https://h', trackHistory: true });
    history.pushState(null, '', '/a');
    history.replaceState(null, '', '/a'); // same URL: no page view
    history.pushState(null, '', '/b');
    await vi.advanceTimersByTimeAsync(2000);
    const pages = sent(key).filter((m) => m.type === 'page');
    expect(pages.map((m) => (m.properties as { path: string }).path)).toEqual(['/a', '/b']);
    expect((pages[1]!.properties as { referrer: string }).referrer).toBe('https://www.example.com/a');
    history.replaceState(null, '', home);
  });
});

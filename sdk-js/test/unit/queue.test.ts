import { afterEach, describe, expect, it, vi } from 'vitest';
import { bytes, chunks, LEASE_MS, MAX_CHARS, Queue, type Message } from '../../src/queue';
import { uuidv7 } from '../../src/uuid';

function keyed() {
  const m = new Map<string, string>();
  return {
    m,
    get: (k: string) => m.get(k) ?? null,
    set: (k: string, v: string) => void m.set(k, v),
    del: (k: string) => void m.delete(k),
    keys: () => [...m.keys()],
  };
}
const msg = (extra: Record<string, unknown> = {}): Message => ({ messageId: uuidv7(), type: 'track', ...extra });

afterEach(() => vi.restoreAllMocks());

describe('Queue', () => {
  it('is bounded and drops the oldest with a warning', () => {
    const warn = vi.spyOn(console, 'warn').mockImplementation(() => {});
    const q = new Queue(3, 'tm.wk.', 'tab', null);
    const ms = [msg(), msg(), msg(), msg(), msg()];
    ms.forEach((m) => q.push(m));
    expect(q.items).toEqual(ms.slice(2));
    expect(warn).toHaveBeenCalledTimes(2);
  });

  it('persists each event under its own key, so a push is one write however long the queue', () => {
    const s = keyed();
    const set = vi.spyOn(s, 'set');
    const q = new Queue(10, 'tm.wk.', 'A', s);
    const a = msg();
    const b = msg();
    q.push(a);
    q.push(b);
    expect(set).toHaveBeenCalledTimes(2);
    expect(JSON.parse(s.get(`tm.wk.q.A.${a.messageId}`)!)).toEqual(a);
    q.remove(new Set([a.messageId]));
    expect(s.keys()).toEqual([`tm.wk.q.A.${b.messageId}`]);
    q.clear();
    expect(s.keys()).toEqual([]);
  });

  it('removes the keys of events dropped when full', () => {
    vi.spyOn(console, 'warn').mockImplementation(() => {});
    const s = keyed();
    const q = new Queue(2, 'tm.wk.', 'A', s);
    const ms = [msg(), msg(), msg()];
    ms.forEach((m) => q.push(m));
    expect(s.keys().sort()).toEqual(ms.slice(1).map((m) => `tm.wk.q.A.${m.messageId}`));
  });

  it('adopts the queue of a tab whose lease lapsed or was released, in call order, once', () => {
    const s = keyed();
    const now = 1_000_000;
    const dead = new Queue(10, 'tm.wk.', 'dead', s);
    const gone = new Queue(10, 'tm.wk.', 'gone', s);
    const live = new Queue(10, 'tm.wk.', 'live', s);
    const other = new Queue(10, 'tm.other.', 'x', s);
    const m1 = msg(), m2 = msg(), m3 = msg(), m4 = msg(), m5 = msg();
    dead.push(m1);
    gone.push(m3);
    gone.push(m5);
    live.push(m2);
    other.push(m4);
    dead.beat(now - LEASE_MS - 1);
    gone.release(); // pagehide
    live.beat(now - 10);
    const me = new Queue(10, 'tm.wk.', 'me', s);
    me.push(m2); // already known: not duplicated
    me.reclaim(now);
    expect(me.items.map((m) => m.messageId)).toEqual([m1, m2, m3, m5].map((m) => m.messageId));
    const own = (tab: string) => s.keys().filter((k) => k.startsWith(`tm.wk.q.${tab}.`));
    expect(own('dead')).toEqual([]);
    expect(own('gone')).toEqual([]);
    expect(s.get('tm.wk.hb.gone')).toBeNull();
    expect(own('live')).toHaveLength(1); // its lease is fresh
    expect(s.get(`tm.other.q.x.${m4.messageId}`)).not.toBeNull(); // another write key
    expect(own('me')).toHaveLength(4); // written under this tab before the others were deleted
  });

  it('forgets the lapsed leases of tabs that queued nothing, and keeps live ones', () => {
    const s = keyed();
    const now = 1_000_000;
    new Queue(10, 'tm.wk.', 'idle', s).release();
    new Queue(10, 'tm.wk.', 'old', s).beat(now - LEASE_MS);
    new Queue(10, 'tm.wk.', 'live', s).beat(now - 1000);
    const me = new Queue(10, 'tm.wk.', 'me', s);
    me.beat(now);
    me.reclaim(now);
    expect(s.keys().sort()).toEqual(['tm.wk.hb.live', 'tm.wk.hb.me']);
  });

  it('bounds the stored characters too, dropping the oldest', () => {
    vi.spyOn(console, 'warn').mockImplementation(() => {});
    const s = keyed();
    const q = new Queue(1000, 'tm.wk.', 'A', s);
    const big = () => msg({ s: 'x'.repeat(30_000) });
    for (let i = 0; i < 50; i++) q.push(big());
    const chars = [...s.m.values()].reduce((n, v) => n + v.length, 0);
    expect(chars).toBeLessThanOrEqual(MAX_CHARS);
    expect(chars).toBeGreaterThan(MAX_CHARS - 31_000);
    expect(s.keys()).toHaveLength(q.items.length);
    q.remove(new Set(q.items.slice(0, 10).map((m) => m.messageId)));
    for (let i = 0; i < 10; i++) q.push(big()); // room again: nothing more dropped
    expect(q.items).toHaveLength(s.keys().length);
  });

  it('leaves a dead tab\'s event in place when it cannot store its own copy', () => {
    const s = keyed();
    const m = msg();
    new Queue(10, 'tm.wk.', 'dead', s).push(m);
    const set = s.set;
    s.set = (k: string, v: string) => {
      if (!k.startsWith('tm.wk.q.me.')) set(k, v); // this tab's writes fail (quota)
    };
    const me = new Queue(10, 'tm.wk.', 'me', s);
    me.reclaim(LEASE_MS);
    expect(me.items).toEqual([m]); // in memory, sent from here
    expect(s.get(`tm.wk.q.dead.${m.messageId}`)).not.toBeNull(); // and still stored
    me.reclaim(LEASE_MS + 5000); // the next round too
    expect(me.items).toEqual([m]);
    expect(s.get(`tm.wk.q.dead.${m.messageId}`)).not.toBeNull();
  });

  it('drops corrupt and malformed foreign entries', () => {
    const s = keyed();
    s.set('tm.wk.q.bad.0190a0a0-0000-7000-8000-000000000000', '{nope');
    s.set('tm.wk.q.old-format-tab', '[{"messageId":"x"}]');
    s.set('tm.wk.q.bad.no-id', '{"type":"track"}');
    const me = new Queue(10, 'tm.wk.', 'me', s);
    me.reclaim(Date.now());
    expect(s.keys()).toEqual([]);
    expect(me.items).toEqual([]);
  });
});

describe('chunks', () => {
  const body = (c: Message[]) => bytes(JSON.stringify({ batch: c, sentAt: new Date().toISOString(), writeKey: 'wk' }));
  const overhead = body([]);

  it('splits by count', () => {
    const items = Array.from({ length: 45 }, () => msg());
    const cs = chunks(items, 20, 1e9, overhead);
    expect(cs.map((c) => c.length)).toEqual([20, 20, 5]);
    expect(cs.flat()).toEqual(items);
  });

  it('splits by bytes, each body under the limit, multi-byte characters counted as bytes', () => {
    const items = Array.from({ length: 50 }, () => msg({ properties: { s: 'é€'.repeat(300) } }));
    const cs = chunks(items, 1000, 10_000, overhead);
    expect(cs.length).toBeGreaterThan(1);
    for (const c of cs) expect(body(c)).toBeLessThanOrEqual(10_000);
    expect(cs.flat()).toEqual(items);
  });

  it('sends an event bigger than the budget alone instead of looping', () => {
    const big = msg({ s: 'x'.repeat(5000) });
    const cs = chunks([msg(), big, msg()], 100, 2000, overhead);
    expect(cs.map((c) => c.length)).toEqual([1, 1, 1]);
  });

  it('keeps server limits for a large backlog (500 KB, 2,500 events)', () => {
    const items = Array.from({ length: 3000 }, () => msg({ properties: { s: 'x'.repeat(400) } }));
    for (const c of chunks(items, 2500, 500_000, overhead)) {
      expect(c.length).toBeLessThanOrEqual(2500);
      expect(body(c)).toBeLessThanOrEqual(500_000);
    }
  });
});

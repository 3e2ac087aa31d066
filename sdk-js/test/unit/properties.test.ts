// Property tests (fast-check) of the SDK's pure parts: how the queue is cut
// into request bodies, the backoff policy, message-id ordering, cookie-domain
// candidates, and the persisted queue against a model of it.

import fc from 'fast-check';
import { describe, expect, it, vi } from 'vitest';
import { bytes, chunks, LEASE_MS, Queue, type Message } from '../../src/queue';
import { backoff } from '../../src/retry';
import { levels } from '../../src/storage';
import { uuidv7 } from '../../src/uuid';

const message = fc.record({
  messageId: fc.uuid(),
  type: fc.constantFrom('track', 'page', 'identify'),
  properties: fc.dictionary(fc.string({ maxLength: 8 }), fc.string({ unit: 'grapheme', maxLength: 200 })),
}) as fc.Arbitrary<Message>;

describe('chunks', () => {
  it('keeps every event once, in order, within the count and byte limits', () => {
    fc.assert(
      fc.property(
        fc.array(message, { maxLength: 60 }),
        fc.integer({ min: 1, max: 30 }),
        fc.integer({ min: 200, max: 20_000 }),
        (items, maxCount, maxBytes) => {
          const body = (c: Message[]) => bytes(JSON.stringify({ batch: c, sentAt: '2026-01-01T00:00:00.000Z', writeKey: 'wk' }));
          const cs = chunks(items, maxCount, maxBytes, body([]));
          expect(cs.flat()).toEqual(items);
          for (const c of cs) {
            expect(c.length).toBeGreaterThan(0);
            expect(c.length).toBeLessThanOrEqual(maxCount);
            // Only an event that is too big on its own may exceed the budget.
            if (c.length > 1) expect(body(c)).toBeLessThanOrEqual(maxBytes);
          }
        },
      ),
    );
  });
});

describe('backoff', () => {
  it('waits between half and all of min(cap, base·2^attempt)', () => {
    fc.assert(
      fc.property(
        fc.nat(60),
        fc.integer({ min: 1, max: 10_000 }),
        fc.integer({ min: 1, max: 600_000 }),
        fc.double({ min: 0, max: 1, maxExcluded: true, noNaN: true }),
        (attempt, base, max, r) => {
          const step = Math.min(max, base * 2 ** attempt);
          const d = backoff(attempt, null, base, max, () => r);
          expect(d).toBeGreaterThanOrEqual(step / 2);
          expect(d).toBeLessThanOrEqual(step);
        },
      ),
    );
  });

  it('follows a numeric Retry-After up to ten times the cap', () => {
    fc.assert(
      fc.property(fc.nat(1_000_000), fc.integer({ min: 1, max: 600_000 }), (s, max) => {
        expect(backoff(3, String(s), 1000, max)).toBe(Math.min(s * 1000, 10 * max));
      }),
    );
  });
});

describe('uuidv7', () => {
  it('is strictly increasing whatever the clock does', () => {
    fc.assert(
      fc.property(fc.array(fc.integer({ min: 1e12, max: 3e12 }), { minLength: 2, maxLength: 300 }), (clock) => {
        const ids = clock.map((t) => uuidv7(t));
        for (let i = 1; i < ids.length; i++) expect(ids[i]! > ids[i - 1]!).toBe(true);
      }),
    );
  });
});

describe('levels', () => {
  it('lists the host and its parents, shortest first, never a single label', () => {
    const label = fc.stringMatching(/^[a-z][a-z0-9-]{0,10}$/);
    fc.assert(
      fc.property(fc.array(label, { minLength: 2, maxLength: 6 }), (labels) => {
        const host = labels.join('.');
        const ls = levels(host);
        expect(ls).toHaveLength(labels.length - 1);
        expect(ls[ls.length - 1]).toBe(host);
        for (const d of ls) {
          expect(d.split('.').length).toBeGreaterThanOrEqual(2);
          expect(host === d || host.endsWith('.' + d)).toBe(true);
        }
        for (let i = 1; i < ls.length; i++) expect(ls[i]!.length).toBeGreaterThan(ls[i - 1]!.length);
      }),
    );
  });
});

describe('persisted queue', () => {
  type Op = { push: number } | { remove: number[] } | { clear: true };
  const op: fc.Arbitrary<Op> = fc.oneof(
    fc.record({ push: fc.nat(3) }),
    fc.record({ remove: fc.array(fc.nat(20), { maxLength: 4 }) }),
    fc.constant({ clear: true as const }),
  );

  it('always stores exactly the queue, and another tab adopts all of it, in order', () => {
    vi.spyOn(console, 'warn').mockImplementation(() => {});
    fc.assert(
      fc.property(fc.array(op, { maxLength: 60 }), fc.integer({ min: 1, max: 12 }), (ops, max) => {
        const m = new Map<string, string>();
        const store = {
          get: (k: string) => m.get(k) ?? null,
          set: (k: string, v: string) => void m.set(k, v),
          del: (k: string) => void m.delete(k),
          keys: () => [...m.keys()],
        };
        const q = new Queue(max, 'tm.wk.', 'tab1', store);
        let model: Message[] = [];
        for (const o of ops) {
          if ('push' in o) {
            for (let i = 0; i <= o.push; i++) {
              const msg: Message = { messageId: uuidv7(), type: 'track' };
              q.push(msg);
              model.push(msg);
              model = model.slice(Math.max(0, model.length - max)); // oldest dropped
            }
          } else if ('remove' in o) {
            const ids = new Set(o.remove.map((i) => model[i]?.messageId).filter((x): x is string => !!x));
            q.remove(ids);
            model = model.filter((x) => !ids.has(x.messageId));
          } else {
            q.clear();
            model = [];
          }
          expect(q.items).toEqual(model);
          const stored = [...m.keys()].filter((k) => k.startsWith('tm.wk.q.tab1.')).sort();
          expect(stored).toEqual(model.map((x) => `tm.wk.q.tab1.${x.messageId}`).sort());
        }
        q.release();
        const next = new Queue(max, 'tm.wk.', 'tab2', store);
        next.reclaim(LEASE_MS);
        expect(next.items).toEqual(model);
        expect([...m.keys()].filter((k) => k.includes('tab1'))).toEqual([]);
      }),
    );
  });
});

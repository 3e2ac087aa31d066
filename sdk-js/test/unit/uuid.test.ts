import { describe, expect, it } from 'vitest';
import { uuidv4, uuidv7 } from '../../src/uuid';

const V7 = /^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/;
const V4 = /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/;

describe('uuidv7', () => {
  it('has the v7 layout and encodes the millisecond timestamp', () => {
    const now = Date.now() + 10_000;
    const id = uuidv7(now);
    expect(id).toMatch(V7);
    expect(parseInt(id.replace(/-/g, '').slice(0, 12), 16)).toBe(now);
  });

  it('is strictly increasing within one millisecond, past the counter, and when the clock steps back', () => {
    const t = Date.now() + 20_000;
    const ids = [uuidv7(t)];
    for (let i = 0; i < 10_000; i++) ids.push(uuidv7(t)); // > 4096: forces counter overflow
    for (let i = 0; i < 100; i++) ids.push(uuidv7(t - 5_000));
    for (let i = 1; i < ids.length; i++) expect(ids[i]! > ids[i - 1]!).toBe(true);
    expect(new Set(ids).size).toBe(ids.length);
    ids.forEach((id) => expect(id).toMatch(V7));
  });
});

describe('uuidv4', () => {
  it('is random v4, also where crypto.randomUUID is missing (plain http)', () => {
    const orig = crypto.randomUUID;
    try {
      (crypto as { randomUUID?: unknown }).randomUUID = undefined;
      const ids = Array.from({ length: 1000 }, () => uuidv4());
      ids.forEach((id) => expect(id).toMatch(V4));
      expect(new Set(ids).size).toBe(ids.length);
    } finally {
      crypto.randomUUID = orig;
    }
  });
});

import { describe, expect, it } from 'vitest';
import { backoff, verdict } from '../../src/retry';

describe('verdict', () => {
  it.each([
    [200, 'ok'], [204, 'ok'],
    [400, 'drop'], [401, 'drop'], [403, 'drop'], [413, 'drop'], [404, 'drop'],
    [0, 'retry'], [408, 'retry'], [429, 'retry'], [500, 'retry'], [502, 'retry'], [503, 'retry'],
  ])('HTTP %i → %s', (status, v) => expect(verdict(status)).toBe(v));
});

describe('backoff', () => {
  it('doubles per attempt, with equal jitter between half and all of the step', () => {
    expect(backoff(0, null, 1000, 60000, () => 0)).toBe(500);
    expect(backoff(0, null, 1000, 60000, () => 1)).toBe(1000);
    expect(backoff(3, null, 1000, 60000, () => 0)).toBe(4000);
    expect(backoff(3, null, 1000, 60000, () => 1)).toBe(8000);
    const d = backoff(2, null, 1000, 60000);
    expect(d).toBeGreaterThanOrEqual(2000);
    expect(d).toBeLessThanOrEqual(4000);
  });

  it('is capped', () => {
    expect(backoff(30, null, 1000, 60000, () => 1)).toBe(60000);
  });

  it('honours Retry-After in seconds and as an HTTP date, capped at ten times the cap', () => {
    expect(backoff(5, '1', 1000, 60000, () => 1)).toBe(1000);
    expect(backoff(5, '0', 1000, 60000, () => 1)).toBe(0);
    const now = Date.parse('2025-01-01T00:00:00Z');
    expect(backoff(0, new Date(now + 7000).toUTCString(), 1000, 60000, () => 1, now)).toBe(7000);
    expect(backoff(0, '999999', 1000, 60000)).toBe(600000);
  });

  it('ignores a malformed Retry-After', () => {
    expect(backoff(1, 'soon', 1000, 60000, () => 0)).toBe(1000);
  });
});

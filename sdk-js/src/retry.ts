// Owns the delivery verdict for one HTTP answer and the wait before the next
// attempt. Kept pure (status in, verdict and milliseconds out) so the policy
// is tested without timers or a network.

export type Verdict = 'ok' | 'drop' | 'retry';

/** 0 stands for a network error (fetch rejected). 400/401/413 and other 4xx
 * will never succeed as sent, so retrying them only blocks the queue; 408,
 * 429 and 5xx are transient. */
export function verdict(status: number): Verdict {
  if (status >= 200 && status < 300) return 'ok';
  return status === 0 || status === 408 || status === 429 || status >= 500 ? 'retry' : 'drop';
}

/** Milliseconds to wait before attempt `attempt + 1`. A server's Retry-After
 * (seconds or an HTTP date) wins over our own guess; otherwise exponential
 * backoff with "equal jitter" (half fixed, half random), so a fleet of
 * browsers that failed together does not come back together. */
export function backoff(
  attempt: number,
  retryAfter: string | null,
  base = 1000,
  max = 60000,
  random: () => number = Math.random,
  now: number = Date.now(),
): number {
  if (retryAfter) {
    const s = Number(retryAfter);
    const ms = s >= 0 ? s * 1000 : Date.parse(retryAfter) - now;
    // Capped: a typo'd header must not park the queue for a day.
    if (ms >= 0) return Math.min(ms, 10 * max);
  }
  const d = Math.min(max, base * 2 ** attempt);
  return d / 2 + (random() * d) / 2;
}

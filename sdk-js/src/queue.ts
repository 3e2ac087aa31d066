// Owns the unsent events: a bounded FIFO mirrored to localStorage so events
// survive reloads, crashes and offline spells, and the split of that FIFO
// into request bodies the server accepts.
//
// Each tab writes its own key (`tm.<writeKey>.q.<tab>`) and renews a lease
// (`….hb.<tab>`, a timestamp). A tab whose lease has lapsed is presumed dead
// and any live tab adopts its events. Two tabs may adopt the same dead queue
// at once, and a throttled background tab may lose its lease while alive;
// both only cause re-sends, which the server drops by messageId. That is why
// there are no locks here: delivery is at-least-once, de-duplicated upstream.

export interface Message {
  messageId: string;
  [k: string]: unknown;
}

/** A tab that has not renewed its lease for this long is presumed dead. Over
 * a minute, because Chrome runs timers in long-hidden tabs only once a minute. */
export const LEASE_MS = 75000;

type KeyedStore = {
  get(k: string): string | null;
  set(k: string, v: string): void;
  del(k: string): void;
  keys(): string[];
};

const enc = new TextEncoder();
export const bytes = (s: string): number => enc.encode(s).length;

export class Queue {
  items: Message[] = [];
  private key: string;

  constructor(
    private max: number,
    private prefix: string,
    private tab: string,
    /** null while persistence is off (no localStorage, cookies: false, or
     * consent pending); the queue then lives in memory only. */
    public store: KeyedStore | null,
  ) {
    this.key = prefix + 'q.' + tab;
  }

  push(m: Message): void {
    this.items.push(m);
    this.trim();
    this.save();
  }

  remove(ids: Set<string>): void {
    this.items = this.items.filter((m) => !ids.has(m.messageId));
    this.save();
  }

  clear(): void {
    this.items = [];
    this.save();
  }

  save(): void {
    const s = this.store;
    if (!s) return;
    if (this.items.length) s.set(this.key, JSON.stringify(this.items));
    else s.del(this.key);
  }

  beat(now: number): void {
    this.store?.set(this.prefix + 'hb.' + this.tab, String(now));
  }

  /** Marks this tab's lease as lapsed on pagehide, so the next page load can
   * adopt the queue at once instead of waiting LEASE_MS. */
  release(): void {
    this.beat(0);
  }

  /** Adopts the queues of tabs whose lease lapsed. */
  reclaim(now: number): void {
    const s = this.store;
    if (!s) return;
    const q = this.prefix + 'q.';
    let got = false;
    for (const k of s.keys()) {
      const tab = k.slice(q.length);
      if (!k.startsWith(q) || tab === this.tab) continue;
      const hb = this.prefix + 'hb.' + tab;
      if (now - (Number(s.get(hb)) || 0) < LEASE_MS) continue;
      try {
        const seen = new Set(this.items.map((m) => m.messageId));
        for (const m of JSON.parse(s.get(k) || '[]') as Message[]) if (!seen.has(m.messageId)) this.items.push(m);
        got = true;
      } catch {
        // A corrupt foreign queue is dropped below rather than retried forever.
      }
      s.del(k);
      s.del(hb);
    }
    if (got) {
      // messageIds are UUID v7, so sorting them restores call order across tabs.
      this.items.sort((a, b) => (a.messageId < b.messageId ? -1 : 1));
      this.trim();
      this.save();
    }
  }

  private trim(): void {
    const over = this.items.length - this.max;
    if (over > 0) {
      this.items.splice(0, over);
      console.warn(`trailmark: queue full, dropped ${over} oldest event(s)`);
    }
  }
}

/** Splits `items` into consecutive chunks of at most `maxCount` events whose
 * `{"batch":[…],…}` body stays under `maxBytes`; `overhead` is the size of the
 * body around the events. An event bigger than the budget travels alone. */
export function chunks(items: Message[], maxCount: number, maxBytes: number, overhead: number): Message[][] {
  const out: Message[][] = [];
  let cur: Message[] = [];
  let size = overhead;
  for (const m of items) {
    const n = bytes(JSON.stringify(m)) + 1; // +1 for the separating comma
    if (cur.length && (cur.length >= maxCount || size + n > maxBytes)) {
      out.push(cur);
      cur = [];
      size = overhead;
    }
    cur.push(m);
    size += n;
  }
  if (cur.length) out.push(cur);
  return out;
}

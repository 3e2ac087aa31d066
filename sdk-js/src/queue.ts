// Owns the unsent events: a bounded FIFO mirrored to localStorage so events
// survive reloads, crashes and offline spells, and the split of that FIFO
// into request bodies the server accepts.
//
// Each event is stored under its own key, `tm.<writeKey>.q.<tab>.<messageId>`,
// so queueing one costs one small write however long the queue is (a single
// JSON array would be re-encoded whole on every call: 12 ms per call at 500
// events, measured in benches/RESULTS.md). Each tab also renews a lease
// (`….hb.<tab>`, a timestamp). A tab whose lease has lapsed is presumed dead
// and any live tab adopts its events: it writes them under its own keys
// first, then deletes the dead tab's. Two tabs may adopt the same dead queue
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

/** Every warning the SDK gives goes through here, with one prefix. */
export const warn = (s: string): void => {
  console.warn('trailmark: ' + s);
};

const enc = new TextEncoder();
export const bytes = (s: string): number => enc.encode(s).length;

/** The queued events may take this many characters in all (localStorage
 * usually allows 5 million per origin), so the host page keeps its room and
 * our writes do not start failing. The count bound alone would allow 16 M:
 * 500 events of up to 32 KB. */
export const MAX_CHARS = 1000000;

export class Queue {
  items: Message[] = [];
  readonly #key: string;
  readonly #max: number;
  readonly #prefix: string;
  readonly #tab: string;
  /** Encoded length of each queued event, and their sum. */
  #sizes = new Map<string, number>();
  #chars = 0;

  constructor(
    max: number,
    prefix: string,
    tab: string,
    /** null while persistence is off (no localStorage, cookies: false, or
     * consent pending); the queue then lives in memory only. */
    public store: KeyedStore | null,
  ) {
    this.#max = max;
    this.#prefix = prefix;
    this.#tab = tab;
    this.#key = prefix + 'q.' + tab + '.';
  }

  /** `json` is `m` encoded, when the caller has it already. */
  push(m: Message, json?: string): void {
    this.items.push(m);
    this.put_(m, json);
    this.trim_();
  }

  remove(ids: Set<string>): void {
    this.items = this.items.filter((m) => !ids.has(m.messageId));
    ids.forEach((i) => {
      this.#chars -= this.#sizes.get(i) ?? 0;
      this.#sizes.delete(i);
      this.store?.del(this.#key + i);
    });
  }

  clear(): void {
    this.remove(new Set(this.items.map((m) => m.messageId)));
  }

  /** Writes every event; for when persistence starts (consent granted). */
  save(): void {
    this.items.forEach((m) => {
      this.put_(m);
    });
  }

  private put_(m: Message, json = JSON.stringify(m)): void {
    const i = m.messageId;
    this.#chars += json.length - (this.#sizes.get(i) ?? 0);
    this.#sizes.set(i, json.length);
    this.store?.set(this.#key + i, json);
  }

  /** Deletes every key under this write key's prefix in `s`: all tabs'
   * queues and leases (consent denied). */
  purge(s: KeyedStore): void {
    for (const k of s.keys()) if (k.startsWith(this.#prefix)) s.del(k);
  }

  beat(now: number): void {
    this.store?.set(this.#prefix + 'hb.' + this.#tab, String(now));
  }

  /** Marks this tab's lease as lapsed on pagehide, so the next page load can
   * adopt the queue at once instead of waiting LEASE_MS. */
  release(): void {
    this.beat(0);
  }

  /** Adopts the events of tabs whose lease lapsed. */
  reclaim(now: number): void {
    const s = this.store;
    if (!s) return;
    const q = this.#prefix + 'q.';
    const seen = new Set(this.items.map((m) => m.messageId));
    const dead = new Set<string>();
    const n = this.items.length;
    for (const k of s.keys()) {
      if (!k.startsWith(q)) continue;
      const dot = k.indexOf('.', q.length);
      // '' for a malformed key: no lease, so it is read (and dropped) below.
      const tab = dot < 0 ? '' : k.slice(q.length, dot);
      if (tab === this.#tab) continue;
      if (!dead.has(tab)) {
        if (now - (Number(s.get(this.#prefix + 'hb.' + tab)) || 0) < LEASE_MS) continue;
        dead.add(tab);
      }
      try {
        const m = JSON.parse(s.get(k) || '') as Message;
        if (typeof m.messageId == 'string') {
          if (!seen.has(m.messageId)) {
            seen.add(m.messageId);
            this.items.push(m);
            this.put_(m);
          }
          // Not stored under this tab (storage full): the dead tab's copy
          // stays, so the event survives if this tab dies too.
          if (!s.get(this.#key + m.messageId)) continue;
        }
      } catch {
        // A corrupt foreign event is dropped below rather than retried forever.
      }
      s.del(k);
    }
    // Forget lapsed leases, including those of tabs that queued nothing:
    // each page load is a new tab, so they would pile up otherwise.
    const hb = this.#prefix + 'hb.';
    for (const k of s.keys())
      if (k.startsWith(hb) && k !== hb + this.#tab && now - (Number(s.get(k)) || 0) >= LEASE_MS) s.del(k);
    if (this.items.length > n) {
      // messageIds are UUID v7, so sorting them restores call order across tabs.
      this.items.sort((a, b) => (a.messageId < b.messageId ? -1 : 1));
      this.trim_();
    }
  }

  private trim_(): void {
    // The oldest go first, until both bounds hold.
    let over = 0;
    for (let n = this.items.length, c = this.#chars; over < n && (n - over > this.#max || c > MAX_CHARS); over++)
      c -= this.#sizes.get(this.items[over]!.messageId) ?? 0;
    if (over > 0) {
      this.remove(new Set(this.items.slice(0, over).map((m) => m.messageId)));
      warn(`queue full: ${over} dropped`);
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

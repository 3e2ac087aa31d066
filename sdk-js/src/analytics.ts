// Owns the public API (analytics.js-compatible) and the delivery loop: turning
// calls into Segment messages, batching them to `/v1/batch`, retrying, flushing
// on page exit, and honouring consent. Storage, ids, context and the retry
// policy live in their own modules; this file wires them to browser events.
//
// Delivery is at-least-once: an event leaves the persisted queue only when
// the server has answered for it, so anything sent during page exit (whose
// answer we may never see) is sent again by the next page load or another
// tab. The server de-duplicates by messageId, which makes that safe.

import { context, pageInfo, type Dict } from './context.js';
import { Identity, type Traits } from './identity.js';
import { bytes, chunks, Queue, warn, type Message } from './queue.js';
import { backoff, verdict } from './retry.js';
import { cookieStore, localStore, topDomain, type Store } from './storage.js';
import { uuidv4, uuidv7 } from './uuid.js';

export type Consent = 'granted' | 'denied' | 'pending';
export type Callback = (msg?: Message) => void;

export interface CallOptions {
  timestamp?: Date | string;
  context?: Dict;
  anonymousId?: string;
  integrations?: Dict;
}

export interface LoadOptions {
  /** Ingest base URL; defaults to the origin the SDK was served from. */
  apiHost?: string;
  /** Send when this many events are queued (default 20). */
  flushAt?: number;
  /** …or this many ms after the first queued event (default 2000). */
  flushInterval?: number;
  /** Bound of the persisted queue; the oldest events go first (default 500). */
  maxQueueSize?: number;
  /** false: no cookie and no localStorage; identity and queue in memory. */
  cookies?: boolean;
  /** Overrides cookie-domain discovery ('' = host-only cookie). */
  cookieDomain?: string;
  /** 'pending' queues in memory without sending until setConsent. */
  consent?: Consent;
  /** Other domains of the site: links to them get `tm_aid` when clicked. */
  crossDomains?: string[];
  /** Send a page view on pushState/replaceState/popstate. */
  trackHistory?: boolean;
  /** Backoff base and cap in ms (default 1000 / 60000). */
  retryBase?: number;
  retryMax?: number;
}

// Server limits, with headroom: 32 KB per event, 500 KB per body, 2,500 per
// batch. 60 KB is under the 64 KB budget browsers give keepalive requests.
const MAX_EVENT = 32000;
const MAX_BODY = 500000;
const MAX_COUNT = 500;
const MAX_UNLOAD = 60000;
const DEFAULTS = { flushAt: 20, flushInterval: 2000, maxQueueSize: 500, retryBase: 1000, retryMax: 60000 };
const AID_PARAM = 'tm_aid';
/** A `tm_aid` older than this (seconds) is ignored: the link was decorated
 * at click time, so an old one was copied or shared, and adopting it would
 * merge two visitors. */
const AID_TTL = 120;

export interface User {
  id(): string | null;
  anonymousId(): string;
  traits(): Traits;
}

/** Pulls the (first) callback out of an argument list, as analytics.js
 * accepts it in any trailing position. */
function split(args: unknown[]): [unknown[], Callback | undefined] {
  const i = args.findIndex((a) => typeof a === 'function');
  return i < 0 ? [args, undefined] : [args.slice(0, i), args[i] as Callback];
}

const isObj = (x: unknown): x is Dict => typeof x === 'object' && x !== null;
// Ids may be numbers in analytics.js code; anything else is the caller's bug.
// eslint-disable-next-line @typescript-eslint/no-base-to-string
const str = (x: unknown): string | undefined => (x == null ? undefined : String(x));

export class Analytics {
  #wk = '';
  #loaded = false;
  #pre: [keyof Analytics, unknown[]][] = [];
  #consent: Consent = 'granted';
  #o: LoadOptions & typeof DEFAULTS = { ...DEFAULTS };
  #url = '';
  #persist: Store[] = [];
  #local: ReturnType<typeof localStore> = null;
  #id!: Identity;
  #q!: Queue;
  #timer: ReturnType<typeof setTimeout> | undefined;
  #blocked = false;
  #sending = false;
  #attempt = 0;
  /** messageIds in an unanswered page-exit request; not sent again meanwhile. */
  #flying = new Set<string>();
  /** Identity changes made while they could not be saved (consent not
   * granted yet). On grant they are replayed over the stored identity, so a
   * login or logout in another tab meanwhile stands where this page did not
   * override it. */
  #ops: ((id: Identity) => void)[] = [];
  /** Bytes of the page-exit requests in `#flying`: the browser allows 64 KB
   * in flight in all. */
  #inFlight = 0;
  #ref = '';
  #last = '';

  readonly #defaultHost?: string;

  constructor(defaultHost?: string) {
    this.#defaultHost = defaultHost;
  }

  load(writeKey: string, options: LoadOptions = {}): this {
    if (this.#loaded) return this;
    this.#wk = writeKey;
    const o = (this.#o = { ...options } as LoadOptions & typeof DEFAULTS);
    // Per field, so that an explicit null or undefined means the default too.
    for (const [k, v] of Object.entries(DEFAULTS)) (o as unknown as Dict)[k] ??= v;
    this.#consent = o.consent || 'granted';
    this.#url = (o.apiHost || this.#defaultHost || location.origin).replace(/\/+$/, '') + '/v1/batch';
    if (o.cookies !== false) {
      this.#local = localStore();
      try {
        // Throws in sandboxed iframes (opaque origins); if it reads once, it
        // keeps working.
        // eslint-disable-next-line @typescript-eslint/no-meaningless-void-operator
        void document.cookie;
        this.#persist = [cookieStore(document, o.cookieDomain ?? topDomain(document, location.hostname), location.protocol === 'https:')];
      } catch {
        // No cookies here: localStorage (if any) or memory.
      }
      if (this.#local) this.#persist.push(this.#local);
    }
    // Traits stay out of the cookie: see identity.ts.
    this.#id = new Identity(this.#persist, this.#local ? [this.#local] : []);
    this.#q = new Queue(o.maxQueueSize, `tm.${writeKey}.`, uuidv4(), null);

    // A visitor arriving from one of our other domains keeps their identity.
    const u = new URL(location.href);
    const p = /^([\w-]{1,64})\.(\d{1,12})$/.exec(u.searchParams.get(AID_PARAM) || '');
    if (p && Math.abs(Date.now() / 1000 - Number(p[2])) < AID_TTL)
      this.change_((id) => {
        id.aid = p[1]!;
      });
    if (u.searchParams.has(AID_PARAM)) {
      u.searchParams.delete(AID_PARAM);
      // Drop it from the address bar so it is neither shared nor tracked as part of the URL.
      history.replaceState(history.state, '', u.href);
    }
    this.#ref = document.referrer;
    this.#last = location.href;
    this.grant_();

    addEventListener('visibilitychange', () => {
      if (document.visibilityState === 'hidden') this.exit_();
    });
    addEventListener('pagehide', () => {
      this.exit_();
      this.#q.release();
    });
    addEventListener('online', () => {
      this.retryNow_();
    });
    if (o.crossDomains?.length) {
      // Decorate a cross-domain link as it is used, so its tm_aid is fresh:
      // mousedown covers the context menu and middle clicks, click covers the
      // keyboard and scripts. Capture phase, so a page handler that navigates
      // itself (and stops propagation) still sees the decorated href.
      const tag = (e: Event) => {
        // The target may be a text node or the document, which lack
        // closest(); SVG links have a read-only href and are left alone.
        const t = e.target as Partial<Element> | null;
        const a = t?.closest?.('a[href]');
        if (a instanceof HTMLAnchorElement) a.href = this.decorate(a.href);
      };
      addEventListener('mousedown', tag, true);
      addEventListener('click', tag, true);
    }
    // Renews our lease and adopts the queues of tabs that died. The period is
    // well under LEASE_MS, so a live tab never looks dead.
    setInterval(() => {
      if (this.#consent !== 'granted') return;
      const now = Date.now();
      this.#q.beat(now);
      this.#q.reclaim(now);
      this.schedule_();
    }, 5000);

    if (o.trackHistory) {
      const h = history;
      for (const k of ['pushState', 'replaceState'] as const) {
        const f = h[k].bind(h);
        h[k] = (...a: Parameters<History['pushState']>) => {
          f(...a);
          nav();
        };
      }
      const nav = () => {
        if (location.href === this.#last) return;
        this.#ref = this.#last;
        this.#last = location.href;
        this.page();
      };
      addEventListener('popstate', nav);
    }

    this.#loaded = true;
    for (const [m, a] of this.#pre.splice(0)) (this[m] as (...x: unknown[]) => unknown)(...a);
    return this;
  }

  /** Queues the call until `load`; true when it did. */
  private defer_(m: keyof Analytics, a: unknown[]): boolean {
    if (!this.#loaded) this.#pre.push([m, a]);
    return !this.#loaded;
  }

  page(...args: unknown[]): this {
    if (this.defer_('page', args)) return this;
    const [a, cb] = split(args);
    // As analytics.js resolves them: two strings are the category and the
    // name, one string is the name; the first object is the properties and
    // the second the options. Once there is a name, a null holds an object's
    // place, so page('Home', null, options) has options.
    const s = a.filter((x): x is string => typeof x === 'string');
    const [category, name] = s.length > 1 ? s : [undefined, s[0]];
    const [props, opts] = a.filter((x) => isObj(x) || (name && x === null)) as [Dict?, CallOptions?];
    const properties: Dict = { ...pageInfo(this.#ref), ...props };
    if (name) properties.name = name;
    if (category) properties.category = category;
    return this.enqueue_('page', { name, category, properties }, opts, cb);
  }

  track(event: string, properties?: Dict, options?: CallOptions | Callback, cb?: Callback): this;
  track(...args: unknown[]): this {
    if (this.defer_('track', args)) return this;
    const [[event, properties, opts], cb] = split(args);
    return this.enqueue_('track', { event: str(event), properties: properties || {} }, opts as CallOptions, cb);
  }

  identify(userId?: string | null | Traits, traits?: Traits | CallOptions | Callback, ...rest: unknown[]): this;
  identify(...args: unknown[]): this {
    if (this.defer_('identify', args)) return this;
    const [a, cb] = split(args);
    if (isObj(a[0])) a.unshift(null);
    const uid = str(a[0]);
    // A copy through JSON: later changes to the caller's object are not
    // ours, and traits that cannot be JSON are refused here, not later.
    let t: Traits = {};
    try {
      t = JSON.parse(JSON.stringify(a[1] ?? {})) as Traits;
    } catch {
      warn('traits not JSON: ignored');
    }
    this.change_((id) => {
      // A different user on this browser must not inherit the previous traits.
      if (uid && id.uid && uid !== id.uid) id.traits = {};
      if (uid) id.uid = uid;
      id.traits = { ...id.traits, ...t };
    });
    return this.enqueue_('identify', { traits: this.#id.traits }, a[2] as CallOptions, cb);
  }

  group(groupId: string, traits?: Traits | CallOptions | Callback, ...rest: unknown[]): this;
  group(...args: unknown[]): this {
    if (this.defer_('group', args)) return this;
    const [[groupId, traits, opts], cb] = split(args);
    return this.enqueue_('group', { groupId: str(groupId), traits: traits || {} }, opts as CallOptions, cb);
  }

  alias(userId: string, previousId?: string | CallOptions | Callback, ...rest: unknown[]): this;
  alias(...args: unknown[]): this {
    if (this.defer_('alias', args)) return this;
    const [a, cb] = split(args);
    if (isObj(a[1])) a.splice(1, 0, undefined);
    const id = this.who_();
    const previousId = str(a[1]) || id.uid || id.aid;
    return this.enqueue_('alias', { userId: str(a[0]), previousId }, a[2] as CallOptions, cb);
  }

  /** Forgets the user: clears userId and traits, starts a new anonymousId. */
  reset(): this {
    if (this.defer_('reset', [])) return this;
    const aid = uuidv4();
    this.change_((id) => {
      id.reset(aid);
    });
    return this;
  }

  user(): User {
    return { id: () => this.who_().uid, anonymousId: () => this.who_().aid, traits: () => this.who_().traits };
  }

  anonymousId(): string {
    return this.who_().aid;
  }

  /** The identity, re-read from its stores while they are in use: another
   * tab or subdomain may have changed it (see identity.ts). */
  private who_(): Identity {
    if (this.#consent === 'granted') this.#id.read();
    return this.#id;
  }

  ready(cb: () => void): this {
    if (!this.defer_('ready', [cb])) setTimeout(cb, 0);
    return this;
  }

  setConsent(c: Consent): this {
    if (this.defer_('setConsent', [c])) return this;
    this.#consent = c;
    if (c === 'denied') {
      // Forget everything we hold or wrote (other tabs' queues included), and
      // keep nothing from now on. The timer and backoff go too, so that a
      // later grant starts afresh.
      clearTimeout(this.#timer);
      this.#timer = undefined;
      this.#blocked = false;
      this.#attempt = 0;
      this.#q.clear();
      if (this.#local) this.#q.purge(this.#local);
      this.#q.store = null;
      this.#id.clear();
      // And this page forgets the visitor too, so a later grant starts anew.
      this.#id.reset();
      this.#ops = [];
    } else this.grant_();
    return this;
  }

  /** Adds `tm_aid=<anonymousId>.<unix seconds>` to a URL on one of the
   * `crossDomains` (other than this host), so the visitor keeps one
   * anonymousId there; the receiving page honours it for AID_TTL seconds.
   * Other URLs are returned unchanged. Links are decorated automatically when
   * clicked; call this for navigations made from script, just before them. */
  decorate(url: string): string {
    try {
      const u = new URL(url, location.href);
      const h = u.hostname;
      const ours = (this.#o.crossDomains || []).some((d) => h === d || h.endsWith('.' + d));
      // Without consent the visitor's id goes nowhere, links included.
      if (ours && h !== location.hostname && this.#consent === 'granted') {
        u.searchParams.set(AID_PARAM, `${this.who_().aid}.${Math.floor(Date.now() / 1000)}`);
        return u.href;
      }
    } catch {
      // Not a URL: leave it alone.
    }
    return url;
  }

  /** Sends the oldest queued batch now, without waiting for the flush timer
   * (a backoff still applies). Settles when that request is answered. */
  flush(): Promise<void> {
    return this.#loaded ? this.send_() : Promise.resolve();
  }

  /** Persistence starts only with consent; before that, memory only. */
  private grant_(): void {
    if (this.#consent !== 'granted') return;
    if (this.#local && this.#o.cookies !== false) this.#q.store = this.#local;
    // The stored identity (another tab may have logged in or out since this
    // page read it), then what this page was told meanwhile.
    this.#id.read();
    for (const f of this.#ops.splice(0)) f(this.#id);
    this.#id.save();
    const now = Date.now();
    this.#q.beat(now);
    this.#q.reclaim(now);
    this.#q.save();
    this.schedule_();
  }

  /** Applies an identity change, and saves it or keeps it for grant. */
  private change_(f: (id: Identity) => void): void {
    const id = this.who_();
    f(id);
    if (this.#consent === 'granted') id.save();
    else this.#ops.push(f);
  }

  /** Queues a message. The callback runs once the event is queued (and
   * persisted, where allowed), not on delivery: delivery survives navigation,
   * so code that navigates in the callback loses nothing. analytics.js runs
   * it after a fixed 300 ms for the same purpose. It runs even when the event
   * is not sent (consent denied, oversized), as analytics.js's does. */
  private enqueue_(type: string, fields: Dict, options?: CallOptions | null, cb?: Callback): this {
    const opts = options || {};
    const id = this.who_();
    // A timestamp that is not a date falls back to now rather than throw.
    const d = new Date(opts.timestamp || Date.now());
    const ts = (isNaN(d.getTime()) ? new Date() : d).toISOString();
    const m: Message = {
      type,
      ...fields,
      messageId: uuidv7(),
      anonymousId: opts.anonymousId || id.aid,
      timestamp: ts,
      originalTimestamp: ts,
      context: { ...context(this.#ref), ...opts.context },
      integrations: opts.integrations || {},
    };
    if (id.uid && !m.userId) m.userId = id.uid;
    let json = '';
    try {
      json = JSON.stringify(m);
    } catch {
      // Circular properties or a BigInt: dropped below, never thrown.
    }
    if (this.#consent === 'denied') {
      // Not kept: the visitor said no.
    } else if (!json || bytes(json) > MAX_EVENT) warn(`${type} dropped: not JSON or over 32 KB`);
    else {
      // A copy: the caller may change its objects after this call.
      this.#q.push(JSON.parse(json) as Message, json);
      this.schedule_();
    }
    if (cb)
      setTimeout(() => {
        cb(m);
      }, 0);
    return this;
  }

  private schedule_(): void {
    if (this.#consent !== 'granted' || !this.#q.items.length) return;
    if (this.#q.items.length >= this.#o.flushAt) void this.send_();
    else
      this.#timer ||= setTimeout(() => {
        // Cleared before sending: if a request is still in flight, send()
        // returns at once and its completion must be free to re-arm us.
        this.#timer = undefined;
        void this.send_();
      }, this.#o.flushInterval);
  }

  private body_(batch: Message[]): string {
    return JSON.stringify({ batch, sentAt: new Date().toISOString(), writeKey: this.#wk });
  }

  private pending_(): Message[] {
    return this.#q.items.filter((m) => !this.#flying.has(m.messageId));
  }

  /** One request at a time; on a transient failure, waits and tries again. */
  private async send_(): Promise<void> {
    if (this.#sending || this.#blocked || this.#consent !== 'granted') return;
    clearTimeout(this.#timer);
    this.#timer = undefined;
    const batch = chunks(this.pending_().slice(0, MAX_COUNT), MAX_COUNT, MAX_BODY, bytes(this.body_([])))[0];
    if (!batch) return;
    this.#sending = true;
    let status = 0;
    let retryAfter: string | null = null;
    try {
      // A string body goes as text/plain and there are no custom headers: a
      // "simple" CORS request, so no preflight round trip before each batch.
      const r = await fetch(this.#url, { method: 'POST', body: this.body_(batch), credentials: 'omit' });
      status = r.status;
      retryAfter = r.headers.get('Retry-After');
    } catch {
      // Network error or offline: status 0, retried below.
    }
    this.#sending = false;
    // Consent may have changed while the request was out.
    // eslint-disable-next-line @typescript-eslint/no-unnecessary-condition
    if (this.#consent !== 'granted') return;
    const v = verdict(status);
    if (v === 'retry') {
      this.#blocked = true;
      const o = this.#o;
      // A flush timer armed while the request was out is superseded.
      clearTimeout(this.#timer);
      this.#timer = setTimeout(() => this.retryNow_(), backoff(this.#attempt++, retryAfter, o.retryBase, o.retryMax));
      return;
    }
    if (v === 'drop') warn(`HTTP ${status}: ${batch.length} dropped`);
    this.#attempt = 0;
    this.#q.remove(new Set(batch.map((m) => m.messageId)));
    this.schedule_();
  }

  private retryNow_(): void {
    clearTimeout(this.#timer);
    this.#timer = undefined;
    this.#blocked = false;
    void this.send_();
  }

  /** Page exit (hidden or pagehide): hand the oldest events, up to the
   * browser's 64 KB keepalive budget, to keepalive requests, which outlive
   * the page. Events stay queued until a response comes back; if the page
   * dies first, the next load re-sends them. */
  private exit_(): void {
    if (this.#consent !== 'granted') return;
    for (const c of chunks(this.pending_(), MAX_COUNT, MAX_UNLOAD, bytes(this.body_([])))) {
      const body = this.body_(c);
      const n = bytes(body);
      // Oldest first, up to the shared budget; the rest stays persisted for
      // the next page load (or this one, if the visitor comes back).
      if (this.#inFlight + n > MAX_UNLOAD) break;
      this.#inFlight += n;
      const ids = new Set(c.map((m) => m.messageId));
      ids.forEach((i) => this.#flying.add(i));
      const done = (ok: boolean) => {
        this.#inFlight -= n;
        ids.forEach((i) => this.#flying.delete(i));
        if (ok) this.#q.remove(ids);
      };
      fetch(this.#url, { method: 'POST', body, keepalive: true, credentials: 'omit' }).then(
        (r) => done(verdict(r.status) !== 'retry'),
        () => {
          // keepalive refused (over the browser's 64 KB in-flight budget, or
          // unsupported): a beacon carries the write key in the body instead.
          done(false);
          // eslint-disable-next-line @typescript-eslint/no-unnecessary-condition -- absent in old WebViews
          navigator.sendBeacon?.(this.#url, new Blob([body], { type: 'text/plain' }));
        },
      );
    }
  }
}

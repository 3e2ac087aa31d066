// Owns where identity lives in the browser: first-party cookies on the
// registrable domain (discovered, not guessed), localStorage as a fallback and
// for data too big for a cookie, and memory when persistence is off or not yet
// consented to. Every access is wrapped: storage throws in private modes and
// sandboxed iframes, and analytics must never break the host page.

/** The `document.cookie` surface; tests inject a fake with domain rules. */
export interface CookieJar {
  cookie: string;
}

export interface Store {
  get(k: string): string | null;
  set(k: string, v: string): void;
  del(k: string): void;
}

const YEAR = 31536000;

/** Candidate domains from the top-most label pair down, as analytics.js does:
 * `a.b.example.co.uk` → `co.uk`, `example.co.uk`, `b.example.co.uk`, … */
export function levels(host: string): string[] {
  const p = host.split('.');
  // IPs and single-label hosts (localhost) only take host-only cookies.
  if (p.length < 2 || /^[\d.]+$|:/.test(host)) return [];
  const out: string[] = [];
  for (let i = p.length - 2; i >= 0; i--) out.push(p.slice(i).join('.'));
  return out;
}

export function readCookie(jar: CookieJar, k: string): string | null {
  for (const c of jar.cookie.split(/;\s*/)) {
    const i = c.indexOf('=');
    if (c.slice(0, i) === k) {
      try {
        return decodeURIComponent(c.slice(i + 1));
      } catch {
        return null;
      }
    }
  }
  return null;
}

/** The registrable domain: the shortest candidate on which the browser keeps
 * a test cookie. Public suffixes (`com`, `co.uk`) are refused by the browser,
 * so this needs no public-suffix list. '' means host-only cookies. */
export function topDomain(jar: CookieJar, host: string): string {
  for (const d of levels(host)) {
    jar.cookie = `tm_tld=1; path=/; domain=${d}`;
    if (readCookie(jar, 'tm_tld')) {
      jar.cookie = `tm_tld=; path=/; domain=${d}; max-age=0`;
      return d;
    }
  }
  return '';
}

export function cookieStore(jar: CookieJar, domain: string, secure: boolean): Store {
  const attrs = `; path=/${domain ? '; domain=' + domain : ''}; SameSite=Lax${secure ? '; Secure' : ''}`;
  return {
    get: (k) => readCookie(jar, k),
    set: (k, v) => {
      try {
        jar.cookie = `${k}=${encodeURIComponent(v)}; max-age=${YEAR}${attrs}`;
      } catch {
        // A lone surrogate (URIError): not kept, which save() notices.
      }
    },
    del: (k) => void (jar.cookie = `${k}=; max-age=0${attrs}`),
  };
}

export function memoryStore(): Store {
  const m = new Map<string, string>();
  return { get: (k) => m.get(k) ?? null, set: (k, v) => void m.set(k, v), del: (k) => void m.delete(k) };
}

/** localStorage, or null where it is missing or throws (Safari private mode,
 * storage disabled, opaque origins). */
export function localStore(): (Store & { keys(): string[] }) | null {
  try {
    const s = localStorage;
    s.setItem('tm_t', '1');
    s.removeItem('tm_t');
    const safe = <T>(f: () => T, d: T): T => {
      try {
        return f();
      } catch {
        return d; // quota exceeded or revoked mid-session: degrade quietly
      }
    };
    return {
      get: (k) => safe(() => s.getItem(k), null),
      set: (k, v) => safe(() => s.setItem(k, v), undefined),
      del: (k) => safe(() => s.removeItem(k), undefined),
      keys: () => safe(() => Object.keys(s), []),
    };
  } catch {
    return null;
  }
}

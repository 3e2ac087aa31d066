import { describe, expect, it } from 'vitest';
import { Identity } from '../../src/identity';
import { cookieStore, levels, memoryStore, readCookie, topDomain, type CookieJar } from '../../src/storage';

/** A cookie store with the browser's domain rule: a cookie may be set on the
 * host or a parent domain, never on a public suffix. */
class FakeJar implements CookieJar {
  jar = new Map<string, string>();
  writes: string[] = [];
  constructor(private host: string, private suffixes = ['com', 'uk', 'co.uk']) {}
  get cookie(): string {
    return [...this.jar].map(([k, v]) => `${k}=${v}`).join('; ');
  }
  set cookie(s: string) {
    this.writes.push(s);
    const [kv, ...attrs] = s.split(/;\s*/);
    const [k, v] = kv!.split('=') as [string, string];
    const domain = attrs.find((a) => a.startsWith('domain='))?.slice(7);
    if (domain && (this.suffixes.includes(domain) || !(this.host === domain || this.host.endsWith('.' + domain)))) return;
    if (attrs.includes('max-age=0')) this.jar.delete(k);
    else this.jar.set(k, v);
  }
}

describe('cookie domain discovery', () => {
  it('lists candidates from the top-most label pair down', () => {
    expect(levels('a.b.example.co.uk')).toEqual(['co.uk', 'example.co.uk', 'b.example.co.uk', 'a.b.example.co.uk']);
    expect(levels('localhost')).toEqual([]);
    expect(levels('127.0.0.1')).toEqual([]);
    expect(levels('::1')).toEqual([]);
  });

  it('finds the registrable domain and leaves no test cookie behind', () => {
    const jar = new FakeJar('shop.www.example.com');
    expect(topDomain(jar, 'shop.www.example.com')).toBe('example.com');
    expect(jar.jar.size).toBe(0);
    expect(jar.writes[0]).toContain('domain=example.com');
  });

  it('skips public suffixes with two labels', () => {
    const jar = new FakeJar('a.b.example.co.uk');
    expect(topDomain(jar, 'a.b.example.co.uk')).toBe('example.co.uk');
    expect(jar.writes.filter((w) => w.includes('domain=co.uk'))).toHaveLength(1);
  });

  it('falls back to a host-only cookie when nothing sticks', () => {
    expect(topDomain(new FakeJar('localhost'), 'localhost')).toBe('');
    const refusing = new FakeJar('x.example.com', ['com', 'example.com', 'x.example.com']);
    expect(topDomain(refusing, 'x.example.com')).toBe('');
  });

  it('writes cookies on the discovered domain and reads them back', () => {
    const jar = new FakeJar('www.example.com');
    const s = cookieStore(jar, 'example.com', true);
    s.set('tm_aid', 'a b;c');
    expect(jar.writes.at(-1)).toMatch(/domain=example\.com.*Secure/);
    expect(s.get('tm_aid')).toBe('a b;c');
    expect(readCookie(jar, 'missing')).toBeNull();
    s.del('tm_aid');
    expect(s.get('tm_aid')).toBeNull();
  });
});

describe('Identity', () => {
  it('prefers the cookie when cookie and localStorage disagree, and heals the copy', () => {
    const cookie = memoryStore();
    const local = memoryStore();
    cookie.set('tm_aid', 'from-cookie');
    cookie.set('tm_uid', 'u1');
    local.set('tm_aid', 'from-local');
    local.set('tm_uid', 'u0');
    const id = new Identity([cookie, local]);
    expect(id.aid).toBe('from-cookie');
    expect(id.uid).toBe('u1');
    id.save();
    expect(local.get('tm_aid')).toBe('from-cookie');
    expect(local.get('tm_uid')).toBe('u1');
  });

  it('takes both ids from the cookie: a reset on another subdomain is not undone by localStorage', () => {
    const cookie = memoryStore();
    const local = memoryStore(); // this subdomain's, still holding the old user
    cookie.set('tm_aid', 'after-reset');
    local.set('tm_aid', 'before');
    local.set('tm_uid', 'old-user');
    local.set('tm_traits', '["old-user",{"email":"old@example.com"}]');
    const id = new Identity([cookie, local], [local]);
    expect([id.aid, id.uid, id.traits]).toEqual(['after-reset', null, {}]);
  });

  it('falls back to localStorage when cookies were cleared, traits with it', () => {
    const local = memoryStore();
    local.set('tm_aid', 'kept');
    local.set('tm_uid', 'u7');
    local.set('tm_traits', '["u7",{"plan":"pro"}]');
    const id = new Identity([memoryStore(), local], [local]);
    expect([id.aid, id.uid, id.traits]).toEqual(['kept', 'u7', { plan: 'pro' }]);
  });

  it('drops a store that does not keep what is written, deleting its stale copy; clear() still empties it', () => {
    const local = memoryStore();
    const cookie = memoryStore();
    const id = new Identity([cookie, local], [local]);
    id.uid = 'old-user';
    id.save();
    // The browser now refuses this cookie's writes (too long, or blocked).
    const set = cookie.set;
    cookie.set = (k, v) => {
      if (k !== 'tm_uid') set(k, v);
    };
    id.uid = '长'.repeat(500);
    id.save();
    expect(cookie.get('tm_uid')).toBeNull(); // the old user is not left behind
    expect(new Identity([cookie, local], [local]).uid).toBe('长'.repeat(500)); // next page load: localStorage's
    cookie.set = set;
    cookie.set('tm_aid', 'written-elsewhere');
    id.clear();
    expect([cookie.get('tm_aid'), local.get('tm_aid'), local.get('tm_uid')]).toEqual([null, null, null]);
  });

  it('ignores unreadable traits', () => {
    const local = memoryStore();
    local.set('tm_aid', 'a');
    local.set('tm_traits', '{"not":"a pair"');
    expect(new Identity([local]).traits).toEqual({});
  });

  it('reset forgets the user and starts a new anonymous id', () => {
    const id = new Identity([memoryStore()]);
    const before = id.aid;
    id.uid = 'u';
    id.traits = { a: 1 };
    id.reset();
    expect(id.uid).toBeNull();
    expect(id.traits).toEqual({});
    expect(id.aid).not.toBe(before);
  });
});

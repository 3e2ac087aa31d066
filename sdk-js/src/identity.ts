// Owns who the visitor is: the anonymous id, the user id and user traits,
// and where they persist. The cookie is the source of truth for the ids (it
// is shared across subdomains); localStorage backs it up when cookies are
// blocked. Traits never go in a cookie: they can outgrow its 4 KB, and a
// cookie would send them (emails, names) to the site's servers on every
// request. They live in localStorage, or in memory when it is unavailable.
//
// The ids are re-read before every call (`read`), as analytics.js does, so a
// login or reset() in another tab or on another subdomain is seen at once
// instead of being overwritten by this page's stale copy.

import type { Store } from './storage.js';
import { uuidv4 } from './uuid.js';

const AID = 'tm_aid';
const UID = 'tm_uid';
const TRAITS = 'tm_traits';

export type Traits = Record<string, unknown>;

export class Identity {
  aid = '';
  uid: string | null = null;
  traits: Traits = {};

  /** `stores` is read in order (cookie first, so the cookie wins when the two
   * disagree) and written all at once by `save`; traits use `traitStores`. */
  #stores: Store[];
  #traitStores: Store[];
  /** Every store ever given, dropped or not: what `clear` must empty. */
  readonly #all: Store[];

  constructor(stores: Store[], traitStores: Store[] = stores) {
    this.#stores = stores;
    this.#traitStores = traitStores;
    this.#all = [...stores, ...traitStores];
    this.read();
  }

  /** Takes both ids from the first store that holds an anonymousId, so they
   * always come as a pair: a userId that localStorage on one subdomain still
   * holds after a reset() on another is not resurrected. Traits are kept
   * only when they were saved for this user. With nothing stored (first
   * visit, or persistence off) the ids in memory stand. */
  read(): void {
    const s = this.#stores.find((x) => x.get(AID));
    if (s) {
      this.aid = s.get(AID)!;
      this.uid = s.get(UID);
    }
    this.aid ||= uuidv4();
    for (const t of this.#traitStores) {
      const v = t.get(TRAITS);
      if (!v) continue;
      try {
        const [owner, traits] = JSON.parse(v) as [string, Traits];
        this.traits = owner === this.owner_() ? traits : {};
      } catch {
        this.traits = {};
      }
      break;
    }
  }

  private owner_(): string {
    return this.uid || this.aid;
  }

  /** Writes every store; skipped while persistence is not allowed. A store
   * that does not keep what was written (a cookie the browser or a consent
   * tool refused, or too long; localStorage over quota) has its copy deleted
   * and is dropped for the rest of the page, or `read` would bring back a
   * previous user. Traits are JSON-safe: identify() copies them through JSON. */
  save(): void {
    const traits = JSON.stringify([this.owner_(), this.traits]);
    const keep = (s: Store, ok: boolean, keys: string[]) => {
      if (!ok) for (const k of keys) s.del(k);
      return ok;
    };
    this.#stores = this.#stores.filter((s) => {
      s.set(AID, this.aid);
      if (this.uid) s.set(UID, this.uid);
      else s.del(UID);
      return keep(s, s.get(AID) === this.aid && s.get(UID) === this.uid, [AID, UID]);
    });
    this.#traitStores = this.#traitStores.filter((s) => {
      s.set(TRAITS, traits);
      return keep(s, s.get(TRAITS) === traits, [TRAITS]);
    });
  }

  clear(): void {
    for (const s of this.#all) for (const k of [AID, UID, TRAITS]) s.del(k);
  }

  /** Forgets the user; `aid` is the new anonymousId (given when the change
   * is replayed later and must come out the same). */
  reset(aid = uuidv4()): void {
    this.uid = null;
    this.traits = {};
    this.aid = aid;
  }
}

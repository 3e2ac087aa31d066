// Owns who the visitor is: the anonymous id, the user id and user traits,
// and where they persist. The cookie is the source of truth for the ids (it
// is shared across subdomains); localStorage backs it up when cookies are
// blocked. Traits never go in a cookie: they can outgrow its 4 KB, and a
// cookie would send them (emails, names) to the site's servers on every
// request. They live in localStorage, or in memory when it is unavailable.

import type { Store } from './storage';
import { uuidv4 } from './uuid';

const AID = 'tm_aid';
const UID = 'tm_uid';
const TRAITS = 'tm_traits';

export type Traits = Record<string, unknown>;

export class Identity {
  aid: string;
  uid: string | null;
  traits: Traits;

  /** `stores` is read in order (cookie first, so the cookie wins when the two
   * disagree) and written all at once by `save`; traits use `traitStores`. */
  constructor(
    private stores: Store[],
    private traitStores: Store[] = stores,
  ) {
    const get = (k: string, from = stores): string | null => {
      for (const s of from) {
        const v = s.get(k);
        if (v) return v;
      }
      return null;
    };
    this.aid = get(AID) || uuidv4();
    this.uid = get(UID);
    try {
      this.traits = JSON.parse(get(TRAITS, traitStores) || '{}') as Traits;
    } catch {
      this.traits = {};
    }
  }

  /** Writes every store; skipped while persistence is not allowed. */
  save(): void {
    for (const s of this.stores) {
      s.set(AID, this.aid);
      if (this.uid) s.set(UID, this.uid);
      else s.del(UID);
    }
    for (const s of this.traitStores) s.set(TRAITS, JSON.stringify(this.traits));
  }

  clear(): void {
    for (const s of this.stores) for (const k of [AID, UID, TRAITS]) s.del(k);
  }

  reset(): void {
    this.uid = null;
    this.traits = {};
    this.aid = uuidv4();
  }
}

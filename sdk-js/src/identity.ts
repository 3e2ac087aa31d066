// Owns who the visitor is: the anonymous id, the user id and user traits,
// and where they persist. The cookie is the source of truth (it is shared
// across subdomains); localStorage backs it up when cookies are blocked and
// holds the traits, which are too big for a cookie.

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
   * disagree) and written all at once by `save`. */
  constructor(private stores: Store[]) {
    const get = (k: string): string | null => {
      for (const s of stores) {
        const v = s.get(k);
        if (v) return v;
      }
      return null;
    };
    this.aid = get(AID) || uuidv4();
    this.uid = get(UID);
    try {
      this.traits = JSON.parse(get(TRAITS) || '{}') as Traits;
    } catch {
      this.traits = {};
    }
  }

  /** Writes every store; skipped while persistence is not allowed. */
  save(): void {
    for (const s of this.stores) {
      s.set(AID, this.aid);
      this.uid ? s.set(UID, this.uid) : s.del(UID);
      s.set(TRAITS, JSON.stringify(this.traits));
    }
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

// Owns identifier generation: UUID v4 for anonymous ids and UUID v7 for
// message ids. v7 is time-ordered, so the server's de-duplication index and
// the event log stay roughly sorted; a 12-bit counter in rand_a keeps ids
// strictly increasing within one millisecond (RFC 9562, method 1).

const rand = (n: number): Uint8Array => crypto.getRandomValues(new Uint8Array(n));
const hex = (b: Uint8Array): string => Array.from(b, (x) => (x + 256).toString(16).slice(1)).join('');

/** A random UUID v4. Built from getRandomValues rather than
 * crypto.randomUUID, which plain-http pages and older browsers lack: one
 * code path, and fewer bytes than two. */
export function uuidv4(): string {
  const b = rand(16);
  b[6] = (b[6]! & 15) | 64;
  b[8] = (b[8]! & 63) | 128;
  return dashed(hex(b));
}

/** 32 hex digits in the 8-4-4-4-12 layout. */
const dashed = (h: string): string => h.replace(/(.{8})(.{4})(.{4})(.{4})/, '$1-$2-$3-$4-');

let lastMs = 0;
let seq = 0;

/** A UUID v7; ids from one page are strictly increasing, even within 1 ms
 * and when the wall clock steps back (the last timestamp is reused). */
export function uuidv7(now: number = Date.now()): string {
  const b = rand(8);
  if (now > lastMs) {
    lastMs = now;
    // Start the counter in its lower half so a burst has room to count up.
    seq = ((b[0]! << 8) | b[1]!) & 0x7ff;
  } else if (++seq > 0xfff) {
    // Counter exhausted: borrow the next millisecond rather than repeat.
    lastMs++;
    seq = 0;
  }
  b[0] = (b[2]! & 63) | 128;
  return dashed(lastMs.toString(16).padStart(12, '0') + (0x7000 | seq).toString(16) + hex(b));
}

// Owns the script-tag entry point (the IIFE bundle): it replaces the snippet's
// stub `window.trailmark` with the real instance and replays the calls the
// stub queued, in order. Loading the bundle twice is a no-op.

import { Analytics } from './analytics.js';

type Stub = unknown[][] & { _writeKey?: string; _loadOptions?: object; initialize?: boolean };
const w = window as unknown as { trailmark?: Stub | Analytics };
const stub = w.trailmark as Stub | undefined;

if (!stub || !stub.initialize) {
  // The default apiHost is the server that served this file.
  const src = (document.currentScript as HTMLScriptElement | null)?.src;
  const a = new Analytics(src ? new URL(src).origin : undefined);
  (a as unknown as { initialize: boolean }).initialize = true;
  w.trailmark = a;
  if (Array.isArray(stub)) {
    if (stub._writeKey) a.load(stub._writeKey, stub._loadOptions);
    for (const [m, ...args] of stub) {
      const f = (a as unknown as Record<string, unknown>)[m as string];
      // One bad call must not stop the replay of the ones after it.
      try {
        if (typeof f === 'function') f.apply(a, args);
      } catch (e) {
        console.error(e);
      }
    }
  }
}

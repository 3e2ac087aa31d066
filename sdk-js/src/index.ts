// Owns the ESM entry point: the Analytics class and the helpers bundlers may
// want, with no side effects at import time (no global, no listeners).

export { Analytics } from './analytics.js';
export type { CallOptions, Callback, Consent, LoadOptions, User } from './analytics.js';
export type { Message } from './queue.js';
export { uuidv4, uuidv7 } from './uuid.js';
export { VERSION } from './context.js';

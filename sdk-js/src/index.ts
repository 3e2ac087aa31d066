// Owns the ESM entry point: the Analytics class and the helpers bundlers may
// want, with no side effects at import time (no global, no listeners).

export { Analytics } from './analytics';
export type { CallOptions, Callback, Consent, LoadOptions, User } from './analytics';
export type { Message } from './queue';
export { uuidv4, uuidv7 } from './uuid';
export { VERSION } from './context';

// Enforces the core bundle budget: dist/trailmark.min.js gzipped at level 9
// must stay under 5 KB, read strictly as 5,000 bytes, because it sits on
// every page of every customer.
import { readFileSync } from 'node:fs';
import { gzipSync } from 'node:zlib';

const LIMIT = 5000;
const file = new URL('../dist/trailmark.min.js', import.meta.url);
const raw = readFileSync(file);
const gz = gzipSync(raw, { level: 9 }).length;
const verdict = gz <= LIMIT ? 'ok' : 'OVER BUDGET';
console.log(`dist/trailmark.min.js: ${raw.length} bytes, ${gz} bytes gzipped (limit ${LIMIT}) ${verdict}`);
if (gz > LIMIT) process.exit(1);

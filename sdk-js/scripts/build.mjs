// Builds dist/: the IIFE bundle for <script> tags (minified and readable),
// the ESM entry for bundlers, and the minified snippet. Types come from tsc
// (see package.json "build"); esbuild does not emit declarations.
import { build } from 'esbuild';
import { readFileSync } from 'node:fs';

const { version } = JSON.parse(readFileSync(new URL('../package.json', import.meta.url), 'utf8'));
const common = {
  bundle: true,
  target: 'es2022',
  define: { __VERSION__: JSON.stringify(version) },
  legalComments: 'none',
  logLevel: 'warning',
};

// Internal property names the minifier may shorten in the script-tag bundle
// (60 bytes gzipped). Only names that nothing outside the SDK uses: no public
// API (`reset`), no message fields (`traits`), no built-in methods (`get`,
// `set`, `keys`, `push`). The end-to-end tests run this bundle.
const INTERNAL = /^(aid|uid|items|store|beat|reclaim|release|purge|read|del)$/;

await Promise.all([
  build({ ...common, entryPoints: ['src/browser.ts'], format: 'iife', minify: true, mangleProps: INTERNAL, outfile: 'dist/trailmark.min.js' }),
  build({ ...common, entryPoints: ['src/browser.ts'], format: 'iife', outfile: 'dist/trailmark.js' }),
  build({ ...common, entryPoints: ['src/index.ts'], format: 'esm', outfile: 'dist/index.mjs' }),
  build({ entryPoints: ['snippet.js'], minify: true, target: 'es5', outfile: 'dist/snippet.min.js', logLevel: 'warning' }),
]);

// Builds dist/: the IIFE bundle for <script> tags (minified and readable),
// the ESM entry for bundlers, and the minified snippet. Types come from tsc
// (see package.json "build"); esbuild does not emit declarations.
import { build } from 'esbuild';
import { readFileSync } from 'node:fs';

const { version } = JSON.parse(readFileSync(new URL('../package.json', import.meta.url), 'utf8'));
const common = {
  bundle: true,
  // The browsers we support, by name, so esbuild lowers whatever one of
  // them lacks (private methods need Safari 15, so the sources use
  // `#private` fields only, which Safari 14.1 has, and plain methods).
  target: ['chrome91', 'edge91', 'firefox90', 'safari14.1'],
  define: { __VERSION__: JSON.stringify(version) },
  legalComments: 'none',
  // Not tsconfig.json's: class fields with define semantics (standard since
  // ES2022, and shorter), and no "use strict" prologue (classes and modules
  // are strict anyway).
  tsconfigRaw: { compilerOptions: { useDefineForClassFields: true } },
  logLevel: 'warning',
};

// Internal property names the minifier may shorten in the script-tag bundle:
// private methods (named `…_`) and a few internal members. Only names that
// nothing outside the SDK uses: no public API (`reset`), no message fields
// (`traits`), no built-in methods (`get`, `set`, `keys`, `push`), and none
// that a future browser API call in the SDK would share (the regex matches
// every property access in the bundle). The end-to-end tests run this bundle.
const INTERNAL = /^(aid|uid|items|store|beat|reclaim|release|purge|read|del|\w+_)$/;

await Promise.all([
  build({ ...common, entryPoints: ['src/browser.ts'], format: 'iife', minify: true, mangleProps: INTERNAL, outfile: 'dist/trailmark.min.js' }),
  build({ ...common, entryPoints: ['src/browser.ts'], format: 'iife', outfile: 'dist/trailmark.js' }),
  build({ ...common, entryPoints: ['src/index.ts'], format: 'esm', outfile: 'dist/index.mjs' }),
  build({ entryPoints: ['snippet.js'], minify: true, target: 'es5', outfile: 'dist/snippet.min.js', logLevel: 'warning' }),
]);

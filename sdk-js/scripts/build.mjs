// Builds dist/: the IIFE bundle for <script> tags (minified and readable),
// the ESM entry for bundlers, and the minified snippet. Types come from tsc
// (see package.json "build"); esbuild does not emit declarations.
import { build } from 'esbuild';
import { readFileSync } from 'node:fs';

const { version } = JSON.parse(readFileSync(new URL('../package.json', import.meta.url), 'utf8'));
const common = {
  bundle: true,
  target: 'es2020',
  define: { __VERSION__: JSON.stringify(version) },
  legalComments: 'none',
  logLevel: 'warning',
};

await Promise.all([
  build({ ...common, entryPoints: ['src/browser.ts'], format: 'iife', minify: true, outfile: 'dist/trailmark.min.js' }),
  build({ ...common, entryPoints: ['src/browser.ts'], format: 'iife', outfile: 'dist/trailmark.js' }),
  build({ ...common, entryPoints: ['src/index.ts'], format: 'esm', outfile: 'dist/index.mjs' }),
  build({ entryPoints: ['snippet.js'], minify: true, target: 'es5', outfile: 'dist/snippet.min.js', logLevel: 'warning' }),
]);

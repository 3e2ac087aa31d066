// Lint rules for sdk-js: ESLint's recommended set plus typescript-eslint's
// strict, type-aware set, over the sources, the tests and the build scripts.
// `npm run check` (and so the README's test command) fails on any finding.

import js from '@eslint/js';
import tseslint from 'typescript-eslint';

export default tseslint.config(
  { ignores: ['dist/', 'node_modules/'] },
  js.configs.recommended,
  {
    files: ['**/*.ts'],
    extends: [...tseslint.configs.strictTypeChecked],
    languageOptions: { parserOptions: { projectService: true, tsconfigRootDir: import.meta.dirname } },
    rules: {
      // Numbers in messages read fine; objects and nullish values stay banned.
      '@typescript-eslint/restrict-template-expressions': ['error', { allowNumber: true }],
      // `() => void f()` style shorthands are idiomatic for listeners.
      '@typescript-eslint/no-confusing-void-expression': ['error', { ignoreArrowShorthand: true }],
      // tsconfig has noUncheckedIndexedAccess, so every array index is
      // `T | undefined`; `!` marks the indices known to be in range (byte
      // arrays of a fixed length, regex groups that matched).
      '@typescript-eslint/no-non-null-assertion': 'off',
    },
  },
  {
    files: ['test/**/*.ts'],
    rules: {
      // Test doubles: vitest mocks and partial browser objects.
      '@typescript-eslint/unbound-method': 'off',
      '@typescript-eslint/require-await': 'off',
    },
  },
  {
    // The snippet is ES5 that runs as pasted, in any browser.
    files: ['snippet.js'],
    languageOptions: { ecmaVersion: 5, sourceType: 'script', globals: { window: 'readonly', document: 'readonly', console: 'readonly' } },
  },
  {
    files: ['scripts/**/*.mjs', 'eslint.config.mjs'],
    languageOptions: { globals: { process: 'readonly', console: 'readonly', URL: 'readonly' } },
  },
);

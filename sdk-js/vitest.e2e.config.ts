import { defineConfig } from 'vitest/config';

// End-to-end: a real Chromium (via playwright-core) against a real Trailmark
// server. One file at a time: the machine has two cores.
export default defineConfig({
  test: {
    include: ['test/e2e/**/*.e2e.ts'],
    environment: 'node',
    fileParallelism: false,
    testTimeout: 60_000,
    hookTimeout: 60_000,
  },
});

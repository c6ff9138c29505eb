// Builds reward.js into a WebAssembly component for the `reward` world of wit/policy.wit.
//
//   node build.mjs [OUTPUT]        (default: ../../../target/polyglot-plugins/reward-js.wasm)
//
// Uses componentize-js's JavaScript API: its CLI (and `jco componentize`) is not needed.
// package.json pins @bytecodealliance/preview2-shim 0.25.0 beside componentize-js 0.23.0: the
// latter imports it without declaring it, and with 0.26 (which jco 1.35 brings) the WIT tooling,
// itself WebAssembly running on that shim, cannot read the host's files ("reading file .../wit:
// No such file or directory"), which is also how `jco componentize` 1.35 fails.
// All of componentize-js's optional WASI features are disabled, so the component imports
// nothing but the world's own interfaces (garage:policy/*): the gateway's sandbox gives no
// WASI. With them disabled, console.log, Math.random/crypto, Date.now/performance.now and
// fetch are unavailable: log through the `log` import, take time from the `clock` import.
import { componentize } from '@bytecodealliance/componentize-js';
import { mkdir, writeFile } from 'node:fs/promises';
import { dirname, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const output = resolve(process.argv[2] ?? resolve(here, '../../../target/polyglot-plugins/reward-js.wasm'));

const { component, imports } = await componentize({
  sourcePath: resolve(here, 'reward.js'),
  witPath: resolve(here, '../../../wit'),
  worldName: 'reward',
  disableFeatures: ['stdio', 'random', 'clocks', 'http', 'fetch-event'],
});

await mkdir(dirname(output), { recursive: true });
await writeFile(output, component);
console.log(`wrote ${output} (${component.length} bytes); imports: ${[...new Set(imports.map((i) => (Array.isArray(i) ? i[0] : i)))].join(", ")}`);

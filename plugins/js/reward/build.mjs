// Builds reward.js (policy.js on @garage/policy) into a WebAssembly component for the `reward`
// world of garage:policy@0.5.0 (wit/v0.5).
//
//   node build.mjs [OUTPUT]        (default: ../../../target/polyglot-plugins/reward-js.wasm)
//
// Two steps:
// 1. rolldown (pinned in package.json) bundles reward.js and what it imports, the library
//    included (`@garage/policy`, a file: dependency of package.json, linked into node_modules
//    by npm ci), into one ES module beside OUTPUT (OUTPUT with `.bundle.js`): componentize-js
//    runs the source in StarlingMonkey, which resolves relative imports only, not packages. The
//    world's interfaces (`garage:policy/...`) stay imports: they are the component's.
// 2. componentize-js's JavaScript API makes the component (its CLI and `jco componentize` are
//    not needed). package.json pins @bytecodealliance/preview2-shim 0.25.0 beside
//    componentize-js 0.23.0: the latter imports it without declaring it, and with 0.26 (which
//    jco 1.35 brings) the WIT tooling, itself WebAssembly running on that shim, cannot read the
//    host's files ("reading file .../wit: No such file or directory").
// All of componentize-js's optional WASI features are disabled, so the component imports
// nothing but the world's own interfaces (garage:policy/*): the gateway's sandbox gives no
// WASI. With them disabled, console.log, Math.random/crypto, Date.now/performance.now and
// fetch are unavailable: log through host.log, take time from host.nowMs.
import { componentize } from '@bytecodealliance/componentize-js';
import { rolldown } from 'rolldown';
import { mkdir, writeFile } from 'node:fs/promises';
import { dirname, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const output = resolve(process.argv[2] ?? resolve(here, '../../../target/polyglot-plugins/reward-js.wasm'));
const bundlePath = output.replace(/(\.wasm)?(\.tmp)?$/, '.bundle.js');
await mkdir(dirname(output), { recursive: true });

const bundle = await rolldown({
  input: resolve(here, 'reward.js'),
  external: [/^garage:policy\//],
  platform: 'neutral',
  logLevel: 'warn',
});
const { output: chunks } = await bundle.generate({ format: 'esm' });
await bundle.close();
if (chunks.length !== 1) throw new Error(`expected one bundled chunk, got ${chunks.length}`);
await writeFile(bundlePath, chunks[0].code);

const { component, imports } = await componentize({
  sourcePath: bundlePath,
  witPath: resolve(here, '../../../wit/v0.5'),
  worldName: 'reward',
  disableFeatures: ['stdio', 'random', 'clocks', 'http', 'fetch-event'],
});

await writeFile(output, component);
console.log(`wrote ${output} (${component.length} bytes) from ${bundlePath}; imports: ${[...new Set(imports.map((i) => (Array.isArray(i) ? i[0] : i)))].join(', ')}`);

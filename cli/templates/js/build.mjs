// Builds component.js (policy.js on @garage/policy) into a WebAssembly component of the
// `{{world}}` world:   node build.mjs WIT_FOLDER OUTPUT.wasm   (what `garage plugin build` runs)
//
// 1. rolldown bundles component.js with what it imports, the library included, into one ES
//    module (OUTPUT with .bundle.js): componentize-js runs it in StarlingMonkey, which resolves
//    relative imports only. The world's own interfaces (garage:policy/...) stay imports.
// 2. componentize-js makes the component, with every optional WASI feature disabled: the
//    gateway's sandbox offers none, so no console.log, Math.random, Date.now or fetch; log
//    through host.log and read time from host.nowMs.
import { componentize } from '@bytecodealliance/componentize-js';
import { rolldown } from 'rolldown';
import { mkdir, writeFile } from 'node:fs/promises';
import { dirname, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const [witPath, outputArg] = process.argv.slice(2);
if (!witPath || !outputArg) throw new Error('usage: node build.mjs WIT_FOLDER OUTPUT.wasm');
const here = dirname(fileURLToPath(import.meta.url));
const output = resolve(outputArg);
const bundlePath = output.replace(/(\.wasm)?$/, '.bundle.js');
await mkdir(dirname(output), { recursive: true });

const bundle = await rolldown({
  input: resolve(here, 'component.js'), external: [/^garage:policy\//], platform: 'neutral', logLevel: 'warn',
});
const { output: chunks } = await bundle.generate({ format: 'esm' });
await bundle.close();
if (chunks.length !== 1) throw new Error(`expected one bundled chunk, got ${chunks.length}`);
await writeFile(bundlePath, chunks[0].code);

const { component } = await componentize({
  sourcePath: bundlePath,
  witPath: resolve(witPath),
  worldName: '{{world}}',
  disableFeatures: ['stdio', 'random', 'clocks', 'http', 'fetch-event'],
});
await writeFile(output, component);

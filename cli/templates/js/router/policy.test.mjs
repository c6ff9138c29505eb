// Native tests (node --test): the policy against @garage/policy's in-memory host, no WebAssembly.
import assert from 'node:assert/strict';
import { test } from 'node:test';

import { MemoryHost } from '@garage/policy/testing';

import { route } from './policy.js';

const rig = (inFlight, tokensPerSecond, stats = {}) =>
  ({ key: 0n, inFlight, engineRunning: 0, engineWaiting: 0, tokensPerSecond, ...stats });
const order = (config, candidates) => route(new MemoryHost(config), {}, candidates);

test('a fast busy rig beats a slow idle one', () => {
  // (3 + 1) / 100 = 0.04 s against (0 + 1) / 20 = 0.05 s.
  assert.deepEqual(order({}, [rig(0, 20), rig(3, 100)]), [1, 0]);
});

test('the engine queue counts and ties keep the gateway order', () => {
  assert.deepEqual(order({}, [rig(0, 50, { engineWaiting: 2 }), rig(0, 50), rig(0, 50)]), [1, 2, 0]);
});

test('an unmeasured rig counts at the configured speed', () => {
  const candidates = [rig(0, 0), rig(0, 20)];
  assert.deepEqual(order({}, candidates), [1, 0]);
  assert.deepEqual(order({ unmeasured_tps: 40 }, candidates), [0, 1]);
});

test('no candidates is an empty order', () => {
  assert.deepEqual(order({}, []), []);
});

test('a misspelled setting is an error that names it', () => {
  assert.throws(() => order({ unmeasured: 5 }, [rig(0, 1)]), /unmeasured/);
});

test('a setting of the wrong type is an error', () => {
  assert.throws(() => order({ unmeasured_tps: 'fast' }, [rig(0, 1)]), /unmeasured_tps/);
});

// Native tests of the reward policy (node's test runner, a MemoryHost, no WebAssembly): the
// cases of the Rust default's tests (plugins/guests/reward).   node --test plugins/js/reward/
import assert from 'node:assert/strict';
import { test } from 'node:test';

import { PolicyError } from '@garage/policy';
import { MemoryHost } from '@garage/policy/testing';

import { tokens, uptime } from './policy.js';

const CONFIG = {
  points_per_1k_tokens: 2.0,
  model_weights: { 'llama-3.1-70b': 8.0 },
  batch_weight: 0.5,
  points_per_uptime_hour: 10.0,
  points_per_gpu_hour: 1.0,
};
const event = (fields) => ({
  operator: 'alice', model: 'qwen-7b', promptTokens: 0, completionTokens: 0, batch: false,
  countedBy: 'gateway', trust: 'verified', ...fields,
});
const report = (fields) => ({ operator: 'alice', periodMs: 0, uptimeMs: 0, gpuSeconds: 0, ...fields });

test('verified tokens pay by model weight; batch tokens the batch weight', () => {
  const host = new MemoryHost(CONFIG);
  assert.deepEqual(tokens(host, event({ model: 'llama-3.1-70b', promptTokens: 300, completionTokens: 200 })),
    [{ operator: 'alice', points: 0.5 * 2.0 * 8.0, reason: 'tokens' }]);
  assert.deepEqual(tokens(host, event({ promptTokens: 300, completionTokens: 200 })),
    [{ operator: 'alice', points: 0.5 * 2.0, reason: 'tokens' }]);
  assert.deepEqual(tokens(host, event({ promptTokens: 1000, batch: true })),
    [{ operator: 'alice', points: 1.0, reason: 'batch-tokens' }]);
});

test('work not verified earns nothing unless the operator pays it', () => {
  const host = new MemoryHost(CONFIG);
  for (const trust of ['unverified', 'suspect', 'quarantined', 'configured']) {
    assert.deepEqual(tokens(host, event({ completionTokens: 5000, trust })), [], trust);
  }
  assert.deepEqual(tokens(host, event({ completionTokens: 1000, countedBy: 'backend' })), []);
  const anyone = new MemoryHost({ verified_only: false, gateway_counted_only: false });
  assert.deepEqual(tokens(anyone, event({ completionTokens: 1000, countedBy: 'backend', trust: 'unverified' })),
    [{ operator: 'alice', points: 1.0, reason: 'tokens' }]);
});

test('static upstreams, empty requests and a model named like a prototype property', () => {
  const host = new MemoryHost(CONFIG);
  assert.deepEqual(tokens(host, event({ operator: '', completionTokens: 1000 })), []);
  assert.deepEqual(tokens(host, event({})), []);
  // A plain object would find Object.prototype.constructor here; the config's table is a Map.
  assert.deepEqual(tokens(host, event({ model: 'constructor', completionTokens: 1000 })),
    [{ operator: 'alice', points: 2.0, reason: 'tokens' }]);
});

test('reports pay uptime capped at the period, and GPU hours', () => {
  const host = new MemoryHost(CONFIG);
  assert.deepEqual(uptime(host, report({ periodMs: 1_800_000, uptimeMs: 2_000_000, gpuSeconds: 7200 })), [
    { operator: 'alice', points: 5.0, reason: 'uptime' },
    { operator: 'alice', points: 2.0, reason: 'gpu-hours' },
  ]);
  assert.deepEqual(uptime(host, report({ operator: '', uptimeMs: 3_600_000 })), []);
  assert.deepEqual(uptime(host, report({ gpuSeconds: NaN })), []);
  assert.deepEqual(uptime(host, report({ gpuSeconds: -7200 })), []);
});

test('defaults pay a point per thousand tokens and per uptime hour', () => {
  const host = new MemoryHost();
  assert.deepEqual(tokens(host, event({ promptTokens: 1500, completionTokens: 500 })),
    [{ operator: 'alice', points: 2.0, reason: 'tokens' }]);
  assert.deepEqual(uptime(host, report({ periodMs: 3_600_000, uptimeMs: 3_600_000, gpuSeconds: 3600 })),
    [{ operator: 'alice', points: 1.0, reason: 'uptime' }]);
});

test('a bad config is a PolicyError (the err of the result) for every call', () => {
  for (const text of ['[]', 'not json', '{"batch_weight": "1"}', '{"default_weight": -1}',
    '{"default_weight": true}', '{"default_weight": null}', '{"model_weights": [1]}',
    '{"model_weights": null}', '{"model_weights": {"m": null}}', '{"model_weight": {}}',
    '{"verified_only": 0}', '{"points_per_1k_tokens": 1e999}']) {
    const host = new MemoryHost(text);
    for (const call of [() => tokens(host, event({ completionTokens: 1 })), () => uptime(host, report({}))]) {
      assert.throws(call, (e) => e instanceof PolicyError && e.message.startsWith('invalid plugin config'), text);
    }
  }
  assert.throws(() => tokens(new MemoryHost('{"model_weight": {}}'), event({})), /unknown field `model_weight`/);
});

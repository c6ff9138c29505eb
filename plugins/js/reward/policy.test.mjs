// Unit tests of the reward policy (plain JavaScript, no WebAssembly): node --test plugins/js/reward/
// The cases mirror the Rust default's tests (plugins/guests/reward).
import assert from 'node:assert/strict';
import { test } from 'node:test';

import { DEFAULTS, parseConfig, usageAwards, reportAwards } from './policy.js';

const CONFIG = JSON.stringify({
  points_per_1k_tokens: 2.0,
  model_weights: { 'llama-3.1-70b': 8.0 },
  batch_weight: 0.5,
  points_per_uptime_hour: 10.0,
  points_per_gpu_hour: 1.0,
});

test('defaults fill missing fields', () => {
  const cfg = parseConfig('{}');
  for (const [name, value] of Object.entries(DEFAULTS)) {
    if (name !== 'model_weights') assert.equal(cfg[name], value, name);
  }
  assert.equal(cfg.model_weights.size, 0);
  assert.deepEqual(parseConfig(' '), cfg);
});

test('bad configs are errors (thrown strings)', () => {
  for (const text of ['[]', 'not json', '{"batch_weight": "1"}', '{"default_weight": -1}',
    '{"default_weight": true}', '{"default_weight": null}', '{"model_weights": [1]}',
    '{"model_weights": null}', '{"model_weights": {"m": null}}', '{"model_weight": {}}']) {
    assert.throws(() => parseConfig(text),
      (e) => typeof e === 'string' && e.startsWith('invalid plugin config'), text);
  }
  assert.throws(() => parseConfig('{"model_weight": {}}'), (e) => e.includes('unknown field `model_weight`'));
});

test('tokens pay by model weight; batch tokens pay the batch weight', () => {
  const cfg = parseConfig(CONFIG);
  assert.deepEqual(usageAwards(cfg, 'alice', 'llama-3.1-70b', 300n, 200n, false),
    [{ operator: 'alice', points: 0.5 * 2.0 * 8.0, reason: 'tokens' }]);
  assert.deepEqual(usageAwards(cfg, 'alice', 'qwen-7b', 300n, 200n, false),
    [{ operator: 'alice', points: 0.5 * 2.0, reason: 'tokens' }]);
  assert.deepEqual(usageAwards(cfg, 'alice', 'qwen-7b', 1000n, 0n, true),
    [{ operator: 'alice', points: 1.0, reason: 'batch-tokens' }]);
});

test('static upstreams and empty requests earn nothing', () => {
  const cfg = parseConfig(CONFIG);
  assert.deepEqual(usageAwards(cfg, '', 'qwen-7b', 1000n, 1000n, false), []);
  assert.deepEqual(usageAwards(cfg, 'alice', 'qwen-7b', 0n, 0n, false), []);
});

test('reports pay uptime capped at the period, and GPU hours', () => {
  const cfg = parseConfig(CONFIG);
  assert.deepEqual(reportAwards(cfg, 'alice', 1_800_000n, 2_000_000n, 7200), [
    { operator: 'alice', points: 5.0, reason: 'uptime' },
    { operator: 'alice', points: 2.0, reason: 'gpu-hours' },
  ]);
  assert.deepEqual(reportAwards(cfg, '', 1_800_000n, 2_000_000n, 7200), []);
  assert.deepEqual(reportAwards(cfg, 'alice', 0n, 0n, NaN), []);
});

test('defaults pay a point per thousand tokens and per uptime hour', () => {
  const cfg = parseConfig('{}');
  assert.deepEqual(usageAwards(cfg, 'alice', 'any', 1500n, 500n, false),
    [{ operator: 'alice', points: 2.0, reason: 'tokens' }]);
  assert.deepEqual(reportAwards(cfg, 'alice', 3_600_000n, 3_600_000n, 3600),
    [{ operator: 'alice', points: 1.0, reason: 'uptime' }]);
});

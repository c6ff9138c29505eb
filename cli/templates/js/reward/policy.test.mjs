// Native tests (node --test): the policy against @garage/policy's in-memory host, no WebAssembly.
import assert from 'node:assert/strict';
import { test } from 'node:test';

import { MemoryHost } from '@garage/policy/testing';

import { tokens, uptime } from './policy.js';

const CONFIG = { points_per_1k_tokens: 2, model_weights: { 'llama-3.1-70b': 8 }, points_per_uptime_hour: 10 };
const verified = (model, count, fields = {}) => ({
  operator: 'alice', model, promptTokens: Math.floor(count / 2), completionTokens: count - Math.floor(count / 2),
  batch: false, countedBy: 'gateway', trust: 'verified', ...fields,
});

test('verified tokens pay by model weight', () => {
  const host = new MemoryHost(CONFIG);
  assert.deepEqual(tokens(host, verified('llama-3.1-70b', 500)), [{ operator: 'alice', points: 8, reason: 'tokens' }]);
  assert.deepEqual(tokens(host, verified('qwen-7b', 500)), [{ operator: 'alice', points: 1, reason: 'tokens' }]);
});

test('unverified work and static upstreams earn nothing', () => {
  const host = new MemoryHost(CONFIG);
  assert.deepEqual(tokens(host, verified('qwen-7b', 5000, { trust: 'unverified' })), []);
  assert.deepEqual(tokens(host, verified('qwen-7b', 5000, { countedBy: 'backend' })), []);
  assert.deepEqual(tokens(host, verified('qwen-7b', 5000, { operator: '' })), []);
});

test('uptime pays per hour, capped at the period', () => {
  const host = new MemoryHost(CONFIG);
  const report = { operator: 'alice', periodMs: 3_600_000, uptimeMs: 1_800_000, gpuSeconds: 0 };
  assert.deepEqual(uptime(host, report), [{ operator: 'alice', points: 5, reason: 'uptime' }]);
  assert.deepEqual(uptime(host, { ...report, uptimeMs: 7_200_000 }), [{ operator: 'alice', points: 10, reason: 'uptime' }]);
});

test('a misspelled setting is an error that names it', () => {
  const host = new MemoryHost({ points_per_1k_token: 2 });
  assert.throws(() => tokens(host, verified('qwen-7b', 500)), /points_per_1k_token/);
});

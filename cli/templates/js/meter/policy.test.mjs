// Native tests (node --test): the policy against @garage/policy's in-memory host, no WebAssembly.
import assert from 'node:assert/strict';
import { test } from 'node:test';

import { MemoryHost } from '@garage/policy/testing';

import { charge, quote } from './policy.js';

const CONFIG = { prompt_per_1k: 0.5, completion_per_1k: 1.5, model_multipliers: { 'llama-3.1-70b': 4 } };
const used = (model, promptTokens, completionTokens, fields = {}) => ({ model, promptTokens, completionTokens, ...fields });

test('the quote is the price times the model multiplier', () => {
  assert.deepEqual(quote(new MemoryHost(CONFIG), { model: 'llama-3.1-70b', batch: false }),
    { promptPerThousand: 2, completionPerThousand: 6 });
});

test('a request is charged its tokens at the price', () => {
  const charged = charge(new MemoryHost(CONFIG), used('qwen-7b', 2000, 1000));
  assert.equal(charged.credits, 2.5);
  assert.equal(charged.budgetExhausted, false);
});

test('a quoted request pays the quote whatever the config says now', () => {
  const price = { promptPerThousand: 1, completionPerThousand: 1 };
  assert.equal(charge(new MemoryHost(CONFIG), used('qwen-7b', 1000, 1000, { price })).credits, 2);
});

test('a misspelled setting is an error that names it', () => {
  assert.throws(() => charge(new MemoryHost({ prompt_per_1000: 2 }), used('qwen-7b', 1, 1)), /prompt_per_1000/);
});

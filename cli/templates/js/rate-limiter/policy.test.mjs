// Native tests (node --test): the policy against @garage/policy's in-memory host, no WebAssembly.
import assert from 'node:assert/strict';
import { test } from 'node:test';

import { MemoryHost } from '@garage/policy/testing';

import { admit } from './policy.js';

// A host whose clock sits 10 s into a minute.
const host = (config) => new MemoryHost(config, 1_700_000_050_000);
const request = (keyId, keyMetadata = '{}') => ({ requestId: 'r', keyId, model: '', reservedTokens: 0, keyMetadata });

test('a key gets its requests per minute, then a retry-after', () => {
  const h = host({ rpm: 2 });
  const first = admit(h, request('key_a'));
  assert.equal(first.allow, true);
  assert.equal(first.headers.remainingRequests, 1);
  assert.equal(first.settle, false);
  assert.equal(admit(h, request('key_a')).allow, true);
  const third = admit(h, request('key_a'));
  assert.equal(third.allow, false);
  assert.equal(third.retryAfterMs, 50_000, 'the rest of the minute');
  assert.equal(admit(h, request('key_b')).allow, true, 'keys count apart');
  h.advanceMs(50_000);
  assert.equal(admit(h, request('key_a')).allow, true, 'a new minute');
});

test('the key metadata wins over the config, and no limit lets all through', () => {
  const h = host({ rpm: 1 });
  assert.equal(admit(h, request('key_a', '{"rpm": 5}')).allow, true);
  assert.equal(admit(h, request('key_a', '{"rpm": 5}')).allow, true);
  const open = new MemoryHost();
  for (let i = 0; i < 100; i += 1) assert.equal(admit(open, request('key_a')).allow, true);
  assert.deepEqual(open.keys(), [], 'nothing counted without a limit');
});

test('zero refuses everything', () => {
  assert.equal(admit(host({ rpm: 0 }), request('key_a')).allow, false);
});

test('bad key metadata falls back to the config', () => {
  const h = host({ rpm: 1 });
  assert.equal(admit(h, request('key_a', 'not json')).allow, true);
  assert.equal(admit(h, request('key_a', '{"rpm": "many"}')).allow, false);
});

for (const config of [{ rpm: 'sixty' }, { rpm: -1 }, { rpm: 1.5 }, { rpms: 2 }]) {
  test(`a bad config throws: ${JSON.stringify(config)}`, () => {
    assert.throws(() => admit(host(config), request('key_a')), /invalid plugin config/);
  });
}

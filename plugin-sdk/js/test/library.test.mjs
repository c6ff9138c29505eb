// Native tests of @garage/policy (node's test runner; no WebAssembly): node --test plugin-sdk/js/test/
import assert from 'node:assert/strict';
import { test } from 'node:test';

import {
  PolicyError, candidateKey, cost, gpuHours, isTrusted, isVerifiedWork, label, load, loadConfig,
  newSlot, pay, tokenCount, uptimeHours,
} from '../index.js';
import { MemoryHost } from '../testing.js';

test('record helpers', () => {
  assert.equal(candidateKey(''), 0xcbf29ce484222325n);
  assert.equal(candidateKey('a'), 0xaf63dc4c8601ec8cn); // FNV-1a 64 of "a", the published vector
  assert.equal(load({ inFlight: 1, engineRunning: 2, engineWaiting: 3 }), 6);
  assert.equal(cost({ promptPerThousand: 0.5, completionPerThousand: 2 }, 2000, 500), 2);
  assert.equal(label({ labels: [['region', 'eu']] }, 'region'), 'eu');
  assert.equal(label({ labels: [] }, 'gpu'), undefined);
  assert.ok(isVerifiedWork({ countedBy: 'gateway', trust: 'verified' }));
  assert.ok(!isVerifiedWork({ countedBy: 'backend', trust: 'verified' }));
  assert.ok(!isVerifiedWork({ countedBy: 'gateway', trust: 'unverified' }));
  assert.ok(isTrusted('configured') && !isTrusted('suspect'));
  assert.equal(tokenCount({ promptTokens: 2 ** 64, completionTokens: 2 ** 64 }), 2 ** 64 - 1);
  assert.equal(uptimeHours({ periodMs: 3_600_000, uptimeMs: 7_200_000 }), 1);
  assert.equal(uptimeHours({ periodMs: 0, uptimeMs: 7_200_000 }), 2);
  for (const bad of [-1, NaN, -Infinity]) assert.equal(gpuHours({ gpuSeconds: bad }), 0);
  assert.deepEqual(pay('alice', 2.5, 'uptime'), [{ operator: 'alice', points: 2.5, reason: 'uptime' }]);
  for (const [who, points] of [['', 1], ['alice', 0], ['alice', -1], ['alice', NaN]]) assert.deepEqual(pay(who, points, 'x'), []);
});

const DEFAULTS = { rate: 1.0, weights: {}, names: [], on: true, label: 'x', extra: null };

test('an empty config is the defaults; fields take the type of their default', () => {
  for (const text of ['', '  ', '{}']) {
    const cfg = loadConfig(new MemoryHost(text), DEFAULTS);
    assert.deepEqual([cfg.rate, cfg.weights.size, cfg.names, cfg.on, cfg.label, cfg.extra], [1, 0, [], true, 'x', null]);
  }
  const cfg = loadConfig(new MemoryHost({ rate: 2, weights: { m: 3 }, names: ['a'], on: false, extra: [1, 'two'] }), DEFAULTS);
  assert.deepEqual([cfg.rate, cfg.weights.get('m'), cfg.names, cfg.on, cfg.extra], [2, 3, ['a'], false, [1, 'two']]);
  assert.ok(Object.isFrozen(cfg) && Object.isFrozen(cfg.names));
  assert.equal(loadConfig(new MemoryHost({ t: { a: 'b' } }), { t: { k: 'v' } }).t.get('a'), 'b');
  // Prototype names are neither fields nor table entries.
  assert.throws(() => loadConfig(new MemoryHost('{"toString": 1}'), DEFAULTS), /unknown field `toString`/);
  assert.equal(loadConfig(new MemoryHost('{"weights": {}}'), DEFAULTS).weights.get('constructor'), undefined);
});

test('bad configs are PolicyErrors that say why', () => {
  for (const [text, why] of [
    ['{', 'invalid plugin config: '], ['[1]', 'not a JSON object'], ['"text"', 'not a JSON object'],
    ['null', 'not a JSON object'], ['{"rat": 1}', 'unknown field `rat`, expected one of `rate`, `weights`'],
    ['{"rate": "1"}', 'rate must be a number'], ['{"rate": true}', 'rate must be a number'],
    ['{"rate": null}', 'rate must be a number'], ['{"rate": -0.5}', 'rate must be a number >= 0'],
    ['{"rate": 1e999}', 'rate must be a number >= 0'], ['{"weights": [1]}', 'weights must be an object'],
    ['{"weights": {"m": "heavy"}}', 'weights["m"] must be a number'], ['{"names": "a"}', 'names must be a list'],
    ['{"names": [1]}', 'names[0] must be a string'], ['{"on": 1}', 'on must be true or false'],
    ['{"label": 1}', 'label must be a string'],
  ]) {
    assert.throws(() => loadConfig(new MemoryHost(text), DEFAULTS),
      (e) => e instanceof PolicyError && e.message.startsWith('invalid plugin config: ') && e.message.includes(why), text);
  }
  assert.throws(() => loadConfig(new MemoryHost('{"when": 1}'), { when: () => 0 }), /no rule for the default of when/);
});

test('one function per export, each returned as registered', () => {
  const reward = newSlot('reward', 'usage', ['report']);
  const usage = reward((host, event) => []);
  const report = reward.report(function uptime() { return []; });
  assert.equal(reward.function('usage'), usage);
  assert.equal(reward.function('report'), report);
  assert.throws(() => reward.report(() => []), /reward report is already uptime: one function per export/);
  assert.throws(() => reward(42), /takes a function/);
  reward.clear();
  assert.equal(reward.function('usage'), undefined);
});

test('MemoryHost: counters reserve up to a limit in windows that do not slide', () => {
  const host = new MemoryHost();
  assert.equal(host.kvReserve('w', 1, 2, 1000), 1);
  host.advanceMs(600);
  assert.equal(host.kvReserve('w', 1, 2, 1000), 2);
  assert.equal(host.kvReserve('w', 1, 2, 1000), undefined);
  assert.equal(host.ttlMs('w'), 400);
  host.advanceMs(400);
  assert.equal(host.kvGet('w'), undefined);
  assert.equal(host.kvReserve('w', 5, 2, 1000), undefined);
  assert.deepEqual(host.keys(), [], 'a refused reserve makes nothing');
  assert.equal(host.kvIncr('n', 5), 5);
  assert.deepEqual(host.kvGet('n'), new TextEncoder().encode('5'));
  assert.equal(host.kvIncr('n', 2 ** 70), 2 ** 63, 'saturates at the largest signed 64-bit integer');
});

test('MemoryHost: values, TTLs, logs, candidates and markets', () => {
  const host = new MemoryHost('{}', 0);
  host.kvSet('a', Uint8Array.of(1), 10);
  host.kvSet('a', Uint8Array.of(2));
  assert.equal(host.ttlMs('a'), undefined, 'a set replaces the TTL');
  host.kvDelete('a');
  assert.equal(host.kvGet('a'), undefined);
  host.kvSet('s', new TextEncoder().encode('text'));
  assert.throws(() => host.kvIncr('s', 1), /not an integer counter/);
  assert.throws(() => host.kvSet('s', 'text'), /takes a Uint8Array/);
  host.log('warn', 'slow rig');
  assert.ok(host.logged('warn', 'slow') && !host.logged('error', 'slow'));
  assert.throws(() => host.log('loud', 'x'), /no log level loud/);
  host.candidates = [{ id: 'rig-a', rig: 'rig-a', operator: 'o', labels: [] }];
  assert.equal(host.candidate(0).id, 'rig-a');
  assert.equal(host.candidate(1), undefined);
  assert.equal(host.candidate(-1), undefined);
  host.setMarket({ model: 'm', utilization: 0.9 });
  assert.equal(host.market('m').utilization, 0.9);
  assert.equal(host.market('other'), undefined);
});

// What every world shares: the Host backed by the WIT imports common to all worlds, and the
// conversions between componentize-js's values (camelCase objects, BigInt for u64/s64) and the
// library's records (Numbers for counts and times, see index.js).
import { get as kvGet, set as kvSet, delete as kvDelete, incr, reserve } from 'garage:policy/kv@0.2.0';
import { nowMs } from 'garage:policy/clock@0.2.0';
import { log } from 'garage:policy/log@0.2.0';
import { get as configGet } from 'garage:policy/config@0.2.0';

import { PolicyError } from '../index.js';

const big = (n) => (n === undefined || n === null ? undefined : BigInt(Math.trunc(Number(n))));
const num = (n) => (n === undefined ? undefined : Number(n));

/** The Host of a component; `describe` (router) and `marketGet` (meter) where the world has them. */
export function witHost({ describe, marketGet } = {}) {
  return {
    kvGet: (key) => kvGet(key),
    kvSet: (key, value, ttlMs) => kvSet(key, value, big(ttlMs)),
    kvDelete: (key) => kvDelete(key),
    kvIncr: (key, delta, ttlMs) => Number(incr(key, big(delta), big(ttlMs))),
    kvReserve: (key, amount, limit, ttlMs) => num(reserve(key, big(amount), big(limit), big(ttlMs))),
    nowMs: () => Number(nowMs()),
    log: (level, message) => log(level, String(message)),
    config: () => configGet(),
    candidate: (index) => (describe && index >= 0 && index < 2 ** 32 ? describe(index) : undefined),
    market: (model) => (marketGet ? lift(marketGet(model)) : undefined),
  };
}

/** A record as the library's: BigInts to Numbers, except the fields named in `keep`. */
export function lift(value, keep = []) {
  if (value === undefined || value === null || typeof value !== 'object') return value;
  const out = {};
  for (const [name, field] of Object.entries(value)) {
    if (typeof field === 'bigint') out[name] = keep.includes(name) ? field : Number(field);
    else if (field && typeof field === 'object' && !Array.isArray(field)) out[name] = lift(field);
    else out[name] = field;
  }
  return out;
}

export { big };

/** Whether an exception is the `err` of a result: a PolicyError, or a thrown string. */
const isErr = (e) => e instanceof PolicyError || typeof e === 'string';
const message = (e) => (typeof e === 'string' ? e : e.message);

/** fn(host, item) per item, lowered, one result per item; other exceptions trap. */
export function each(fn, host, items, lower) {
  return items.map((item) => {
    try {
      return { tag: 'ok', val: lower(fn(host, lift(item))) };
    } catch (e) {
      if (isErr(e)) return { tag: 'err', val: message(e) };
      throw e;
    }
  });
}

/** fn(...args), a PolicyError as the err of the export's result (a thrown string). */
export function call(fn, ...args) {
  try {
    return fn(...args);
  } catch (e) {
    if (isErr(e)) throw message(e);
    throw e;
  }
}

/** The function registered for an export, or an error that says how to register it. */
export function required(slot, exportName) {
  const fn = slot.function(exportName);
  if (!fn) {
    const how = exportName === slot.main ? `${slot.name}(fn)` : `${slot.name}.${exportName}(fn)`;
    throw new Error(`no ${slot.name} ${exportName} registered: call ${how}`);
  }
  return fn;
}

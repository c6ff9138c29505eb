// Native unit testing of policies: MemoryHost, a Host kept in memory (no WebAssembly).

const I64_MIN = -(2n ** 63n);
const I64_MAX = 2n ** 63n - 1n;
const LEVELS = ['debug', 'info', 'warn', 'error'];

/**
 * A Host for tests: key-value state in memory with TTLs that follow a clock the test sets,
 * captured log lines, a configuration (JSON text, or a value written as JSON), the candidates
 * a router may describe and the markets a meter may read.
 *
 * It follows the gateway's semantics: kvIncr and kvReserve set a TTL only when they create the
 * key, counters are stored as decimal ASCII and saturate at the ends of a signed 64-bit
 * integer; a value that is not an integer used as a counter throws (in the gateway, the call
 * fails).
 * @implements {import('./index.js').Host}
 */
export class MemoryHost {
  /** Where a new host's clock starts: a realistic epoch time rather than 0. */
  static DEFAULT_NOW_MS = 1_700_000_000_000;

  constructor(config = '{}', nowMs = MemoryHost.DEFAULT_NOW_MS) {
    this.setConfig(config);
    this.now = nowMs;
    /** @type {Map<string, {value: Uint8Array, expiresAt?: number}>} */
    this.entries = new Map();
    /** @type {[string, string][]} every line logged, oldest first: [level, message] */
    this.logs = [];
    /** @type {import('./index.js').CandidateInfo[]} */
    this.candidates = [];
    /** @type {Map<string, import('./index.js').Market>} */
    this.markets = new Map();
  }

  /** Replaces the configuration (JSON text, or a value written as JSON). */
  setConfig(config) {
    this.configText = typeof config === 'string' ? config : JSON.stringify(config);
  }

  /** Moves the clock forward (keys whose TTL runs out expire). */
  advanceMs(ms) {
    this.now += ms;
  }

  /** The market `market(model)` answers, as during a meter's quote. */
  setMarket(market) {
    this.markets.set(market.model, market);
  }

  /** Whether a line at level containing fragment was logged. */
  logged(level, fragment) {
    return this.logs.some(([l, message]) => l === level && message.includes(fragment));
  }

  /** The keys currently set (expired ones left out), sorted. */
  keys() {
    return [...this.entries.keys()].filter((k) => this.#live(k)).sort();
  }

  /** Milliseconds until key expires; undefined when missing or never expiring. */
  ttlMs(key) {
    const entry = this.#live(key);
    return entry?.expiresAt === undefined ? undefined : entry.expiresAt - this.now;
  }

  kvGet(key) {
    return this.#live(key)?.value;
  }

  kvSet(key, value, ttlMs) {
    if (!(value instanceof Uint8Array)) throw new TypeError(`kvSet takes a Uint8Array, not ${typeof value}`);
    this.entries.set(key, { value: Uint8Array.from(value), expiresAt: this.#expiry(ttlMs) });
  }

  kvDelete(key) {
    this.entries.delete(key);
  }

  kvIncr(key, delta, ttlMs) {
    const current = this.#counter(key);
    const value = saturate((current ?? 0n) + BigInt(delta));
    this.#store(key, value, current !== undefined, ttlMs);
    return Number(value);
  }

  kvReserve(key, amount, limit, ttlMs) {
    const current = this.#counter(key);
    const value = saturate((current ?? 0n) + BigInt(amount));
    if (value > BigInt(limit)) return undefined;
    this.#store(key, value, current !== undefined, ttlMs);
    return Number(value);
  }

  nowMs() {
    return this.now;
  }

  log(level, message) {
    if (!LEVELS.includes(level)) throw new TypeError(`no log level ${level}: one of ${LEVELS.join(', ')}`);
    this.logs.push([level, String(message)]);
  }

  config() {
    return this.configText;
  }

  candidate(index) {
    return Number.isInteger(index) && index >= 0 ? this.candidates[index] : undefined;
  }

  market(model) {
    return this.markets.get(model);
  }

  #live(key) {
    const entry = this.entries.get(key);
    if (!entry || (entry.expiresAt !== undefined && this.now >= entry.expiresAt)) return undefined;
    return entry;
  }

  #expiry(ttlMs) {
    return ttlMs === undefined || ttlMs === null ? undefined : this.now + ttlMs;
  }

  #counter(key) {
    const entry = this.#live(key);
    if (!entry) return undefined;
    const text = new TextDecoder().decode(entry.value);
    if (!/^-?[0-9]+$/.test(text)) throw new Error(`MemoryHost: key ${JSON.stringify(key)} holds a value that is not an integer counter`);
    return BigInt(text);
  }

  #store(key, value, existed, ttlMs) {
    const expiresAt = existed ? this.entries.get(key).expiresAt : this.#expiry(ttlMs);
    this.entries.set(key, { value: new TextEncoder().encode(String(value)), expiresAt });
  }
}

const saturate = (v) => (v < I64_MIN ? I64_MIN : v > I64_MAX ? I64_MAX : v);

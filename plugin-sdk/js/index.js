// @garage/policy: write Garage policies (reward, meter, router, rate limiter) in JavaScript.
//
// A policy is one function registered with its slot (`reward(fn)`, `router(fn)`...), over the
// records of the `garage:policy` contract (below, as JSDoc types), against a `Host` (key-value
// state, clock, log, configuration). Natively it is tested with `MemoryHost`
// (`@garage/policy/testing`, `node --test`); componentize-js builds it into a WebAssembly
// component through `@garage/policy/worlds/<slot>` (see plugin-sdk/README.md).
//
// Records are plain objects with the WIT fields in camelCase. Counts, times and sizes (WIT u64,
// u32) are Numbers, exact below 2**53; the two 64-bit hashes (`Candidate.key`,
// `RouteRequest.prefixHash`) stay BigInts. Enum cases are their WIT names ('verified'), and an
// `option` is the value or `undefined`.

/** @typedef {'configured'|'unverified'|'verified'|'suspect'|'quarantined'} Trust How far the gateway trusts a backend (docs/trust.md). */
/** @typedef {'gateway'|'backend'} CountedBy Who counted a usage event's tokens. */
/** @typedef {'debug'|'info'|'warn'|'error'} LogLevel */
/** @typedef {'lifetime'|'day'|'week'|'month'} BudgetPeriod */

/**
 * A completed request, for metering and rewards (WIT `usage-event`, garage:policy@0.5.0).
 * @typedef {object} UsageEvent
 * @property {string} requestId Unique per request: metering and rewards are idempotent on it.
 * @property {string} keyId
 * @property {string} model
 * @property {number} promptTokens Prompt tokens billed (the gateway's count with countedBy 'gateway').
 * @property {number} completionTokens
 * @property {number} cachedTokens
 * @property {number} latencyMs
 * @property {number} ttftMs
 * @property {string} backend Backend id that served it.
 * @property {string} rig Node id of the rig; empty for static upstreams.
 * @property {string} operator Operator of that rig; empty for static upstreams.
 * @property {number} startedAtMs
 * @property {number} finishedAtMs
 * @property {boolean} batch The request came from the Batch API.
 * @property {CountedBy} countedBy
 * @property {number} [reportedPromptTokens] With countedBy 'gateway': what the backend reported.
 * @property {number} [reportedCompletionTokens]
 * @property {Trust} trust The backend's trust when it served the request.
 * @property {Price} [price] The price quoted at admission; undefined when none was.
 */

/**
 * Periodic report of a rig (WIT `rig-report`).
 * @typedef {object} RigReport
 * @property {string} rig
 * @property {string} operator
 * @property {number} periodMs Length of the period.
 * @property {number} uptimeMs Milliseconds of the period the rig was connected and routable.
 * @property {number} gpuSeconds GPU-seconds the rig offered in the period.
 * @property {number} atMs
 */

/** @typedef {{operator: string, points: number, reason: string}} Award Points for an operator. */
/** @typedef {{promptPerThousand: number, completionPerThousand: number}} Price Credits per thousand tokens. */
/** @typedef {{model: string, batch: boolean}} QuoteRequest What a meter is asked to price. */

/**
 * Supply and demand for one model (WIT `market`), during a meter's quote.
 * @typedef {{model: string, rigs: number, capacityTokensPerSecond: number, utilization: number,
 *   queueDepth: number, inFlight: number, demandRequestsPerMinute: number}} Market
 */

/**
 * How much of one budget of a key is used (WIT `budget-use`).
 * @typedef {{period: BudgetPeriod, spent: number, limit: number, startsAtMs?: number,
 *   resetsAtMs?: number}} BudgetUse
 */

/**
 * The meter's answer for one event (WIT `charge`); only `credits` is required.
 * @typedef {{credits: number, budgetExhausted?: boolean, exhaustedUntilMs?: number,
 *   budgets?: BudgetUse[]}} Charge
 */

/**
 * A request about to be routed (WIT `route-request`).
 * @typedef {{model: string, keyId: string, prefixHash: bigint, promptTokens: number,
 *   maxTokens: number, stream: boolean}} RouteRequest
 */

/**
 * One backend that can serve the request (WIT `candidate`, garage:policy@0.4.0); who it is
 * is `host.candidate(index)`.
 * @typedef {{key: bigint, inFlight: number, engineRunning: number, engineWaiting: number,
 *   kvCacheUsage: number, tokensPerSecond: number, latencyMs: number, gpuUtilization: number,
 *   gpuMemoryFreeBytes: number, trust: Trust}} Candidate
 */

/** @typedef {{id: string, rig: string, operator: string, labels: [string, string][]}} CandidateInfo Who a candidate is. */

/**
 * A request at admission (WIT `admission`).
 * @typedef {{requestId: string, keyId: string, model: string, reservedTokens: number,
 *   keyMetadata: string}} Admission
 */

/**
 * What a request really used (WIT `settlement`).
 * @typedef {{requestId: string, keyId: string, model: string, reservedTokens: number,
 *   usedTokens: number}} Settlement
 */

/**
 * Values for OpenAI's `x-ratelimit-*` headers; a field left out leaves its header out.
 * @typedef {{limitRequests?: number, remainingRequests?: number, resetRequestsMs?: number,
 *   limitTokens?: number, remainingTokens?: number, resetTokensMs?: number}} RateLimitHeaders
 */

/**
 * The rate limiter's answer. `settle` (default true) asks the gateway to call the settle
 * function once the allowed request is done.
 * @typedef {{allow: boolean, retryAfterMs?: number, reason?: string,
 *   headers?: RateLimitHeaders, settle?: boolean}} Decision
 */

/**
 * The gateway as a policy sees it (WIT `kv`, `clock`, `log`, `config`; `candidates` for a
 * router, `market` for a meter). Counters written by kvIncr and kvReserve read back through
 * kvGet as decimal ASCII.
 * @typedef {object} Host
 * @property {(key: string) => Uint8Array | undefined} kvGet The value of key, if set and not expired.
 * @property {(key: string, value: Uint8Array, ttlMs?: number) => void} kvSet With ttlMs it expires by itself.
 * @property {(key: string) => void} kvDelete
 * @property {(key: string, delta: number, ttlMs?: number) => number} kvIncr Adds delta (a missing key is 0); the new value. The TTL applies when the key is created.
 * @property {(key: string, amount: number, limit: number, ttlMs?: number) => number | undefined} kvReserve Adds amount only if the result stays at or below limit; the new value, or undefined.
 * @property {() => number} nowMs Milliseconds since the Unix epoch (Date.now() is the build time in a component).
 * @property {(level: LogLevel, message: string) => void} log Into the gateway's log.
 * @property {() => string} config The plugin's configuration as JSON text; see loadConfig.
 * @property {(index: number) => CandidateInfo | undefined} candidate Who candidates[index] of the route call is.
 * @property {(model: string) => Market | undefined} market Supply and demand for model, during a quote.
 */

/**
 * The `err` of a slot's result: an answer, not a crash (the router falls back to round
 * robin, the meter and reward leave the event queued to retry). A thrown string is one too;
 * any other exception traps, which the gateway counts as a fault of the plugin.
 */
export class PolicyError extends Error {
  name = 'PolicyError';
}

// --- helpers over the records -----------------------------------------------------------------

const U64_MAX = 2 ** 64 - 1;

/** Prompt plus completion tokens (at most 2**64 - 1, as the gateway's sum). @param {UsageEvent} event */
export const tokenCount = (event) => Math.min(event.promptTokens + event.completionTokens, U64_MAX);

/** Tokens the gateway counted itself, on a verified rig: work a reward can believe. @param {UsageEvent} event */
export const isVerifiedWork = (event) => event.countedBy === 'gateway' && event.trust === 'verified';

/** A verified rig, or the operator's own upstream. @param {Trust} trust */
export const isTrusted = (trust) => trust === 'verified' || trust === 'configured';

/** Hours the rig was up, capped at the period (a period of 0 caps nothing). @param {RigReport} report */
export const uptimeHours = (report) =>
  (report.periodMs > 0 ? Math.min(report.uptimeMs, report.periodMs) : report.uptimeMs) / 3_600_000;

/** GPU-hours offered; a negative or NaN count is 0. @param {RigReport} report */
export const gpuHours = (report) => (report.gpuSeconds > 0 ? report.gpuSeconds / 3600 : 0);

/** Requests on a backend as far as anyone knows. @param {Candidate} c */
export const load = (c) => c.inFlight + c.engineRunning + c.engineWaiting;

/** The credits tokens cost at a price. @param {Price} price @param {number} prompt @param {number} completion */
export const cost = (price, prompt, completion) =>
  (prompt * price.promptPerThousand + completion * price.completionPerThousand) / 1000;

/**
 * `[{operator, points, reason}]`, or `[]` when there is nobody to pay (a static upstream has
 * no operator) or nothing to pay (zero, negative or NaN points).
 * @param {string} operator @param {number} points @param {string} reason @returns {Award[]}
 */
export const pay = (operator, points, reason) => (operator && points > 0 ? [{ operator, points, reason }] : []);

/** The key of the backend with this id, as in `Candidate.key`: FNV-1a (64-bit) of its UTF-8 bytes. */
export function candidateKey(id) {
  let key = 0xcbf29ce484222325n;
  for (const byte of new TextEncoder().encode(id)) key = ((key ^ BigInt(byte)) * 0x100000001b3n) & 0xffffffffffffffffn;
  return key;
}

/** The value of a candidate's label, if it has it. @param {CandidateInfo} info @param {string} key */
export const label = (info, key) => info.labels.find(([k]) => k === key)?.[1];

// --- configuration ----------------------------------------------------------------------------

const invalid = (message) => new PolicyError(`invalid plugin config: ${message}`);
const isObject = (v) => v !== null && typeof v === 'object' && !Array.isArray(v);

function check(name, value, like) {
  switch (typeof like) {
    case 'boolean':
      if (typeof value !== 'boolean') throw invalid(`${name} must be true or false`);
      return value;
    case 'number':
      if (typeof value !== 'number') throw invalid(`${name} must be a number`);
      if (!Number.isFinite(value) || value < 0) throw invalid(`${name} must be a number >= 0`);
      return value;
    case 'string':
      if (typeof value !== 'string') throw invalid(`${name} must be a string`);
      return value;
    default:
  }
  if (like === null) return value;
  if (Array.isArray(like)) {
    if (!Array.isArray(value)) throw invalid(`${name} must be a list`);
    const item = like.length ? like[0] : '';
    return Object.freeze(value.map((v, i) => check(`${name}[${i}]`, v, item)));
  }
  if (isObject(like)) {
    if (!isObject(value)) throw invalid(`${name} must be an object`);
    const values = Object.values(like);
    const item = values.length ? values[0] : 0;
    return new Map(Object.entries(value).map(([k, v]) => [k, check(`${name}[${JSON.stringify(k)}]`, v, item)]));
  }
  throw new TypeError(`loadConfig: no rule for the default of ${name} (${typeof like})`);
}

/**
 * The plugin's configuration (`host.config()`), every field of `defaults` filled in, as a
 * frozen object with the same field names.
 *
 * Every field is optional and takes the type of its default: a boolean, a number (finite and
 * not negative: rates, weights, limits), a string, a table (an object default: a JSON object
 * read into a `Map`, its values of the type of the default's values, numbers when it is
 * empty), a list (of the type of the default's first item, strings when it is empty) or
 * anything (a `null` default). An unknown field, JSON that does not parse or a value of the
 * wrong type throws a `PolicyError` (`invalid plugin config: ...`).
 * @template {Record<string, unknown>} D
 * @param {Host} host @param {D} defaults @returns {Readonly<Record<keyof D, any>>}
 */
export function loadConfig(host, defaults) {
  const text = host.config();
  let raw;
  try {
    raw = text.trim() === '' ? {} : JSON.parse(text);
  } catch (e) {
    throw invalid(e.message);
  }
  if (!isObject(raw)) throw invalid('not a JSON object');
  const known = Object.keys(defaults);
  const unknown = Object.keys(raw).filter((name) => !Object.hasOwn(defaults, name)).sort();
  if (unknown.length > 0) {
    throw invalid(`unknown field \`${unknown[0]}\`, expected one of ${known.map((n) => `\`${n}\``).join(', ')}`);
  }
  const cfg = {};
  for (const name of known) {
    const like = defaults[name];
    cfg[name] = check(name, Object.hasOwn(raw, name) ? raw[name] : like, like);
  }
  return Object.freeze(cfg);
}

// --- registration -----------------------------------------------------------------------------

function slot(name, main, others) {
  const functions = new Map();
  const register = (exportName) => (fn) => {
    if (typeof fn !== 'function') throw new TypeError(`${name}.${exportName} takes a function, not ${String(fn)}`);
    if (functions.has(exportName)) {
      throw new Error(`${name} ${exportName} is already ${functions.get(exportName).name || 'registered'}: one function per export`);
    }
    functions.set(exportName, fn);
    return fn;
  };
  const registerMain = register(main);
  const s = (fn) => registerMain(fn);
  for (const other of others) s[other] = register(other);
  Object.defineProperty(s, 'name', { value: name });
  s.main = main;
  /** What was registered for an export, if anything. */
  s.function = (exportName) => functions.get(exportName);
  /** Forgets every registration (for tests that register one policy after another). */
  s.clear = () => functions.clear();
  return s;
}

/**
 * `reward((host, event: UsageEvent) => Award[])`; `reward.report((host, report: RigReport) =>
 * Award[])` (optional: no awards without it). Each returns the function it registers.
 */
export const reward = slot('reward', 'usage', ['report']);
/**
 * `meter((host, event: UsageEvent) => Charge)`; `meter.quote((host, request: QuoteRequest) =>
 * Price | undefined)` (optional: without it the meter quotes nothing).
 */
export const meter = slot('meter', 'charge', ['quote']);
/** `router((host, request: RouteRequest, candidates: Candidate[]) => number[])`, best first. */
export const router = slot('router', 'route', []);
/**
 * `rateLimiter((host, request: Admission) => Decision)`; `rateLimiter.settle((host,
 * settlement: Settlement) => void)` (optional: without it no request asks for a settle).
 */
export const rateLimiter = slot('rateLimiter', 'admit', ['settle']);

/** For tests of the library itself: a slot apart from the ones components export. */
export const newSlot = slot;

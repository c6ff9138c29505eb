// The reward policy itself, in plain JavaScript: no WIT imports here, so it can be unit tested
// with node (`node --test plugins/js/reward/`).
//
// The same policy as the Rust default (plugins/guests/reward), to the last bit of every float:
// - a served request pays (prompt + completion tokens) / 1000 * points_per_1k_tokens * weight,
//   weight being model_weights[model] or else default_weight, times batch_weight for Batch API
//   requests; reason `tokens`, or `batch-tokens` for batch requests;
// - a rig report pays uptime_ms / 3_600_000 * points_per_uptime_hour (uptime capped at the
//   period; reason `uptime`) and gpu_seconds / 3600 * points_per_gpu_hour (reason `gpu-hours`);
// - no award without an operator (static upstreams) or for zero points.
// Config fields are all optional (DEFAULTS below); an unknown field is an error.
//
// Errors are thrown as strings: for a `result<_, string>` export, componentize-js turns a thrown
// string into the `err` case, while a thrown Error object traps.

export const DEFAULTS = Object.freeze({
  points_per_1k_tokens: 1.0,
  model_weights: {},
  default_weight: 1.0,
  batch_weight: 1.0,
  points_per_uptime_hour: 1.0,
  points_per_gpu_hour: 0.0,
});

const MS_PER_HOUR = 3_600_000;
const U64_MAX = (1n << 64n) - 1n;

function nonNegative(value, what) {
  if (typeof value !== 'number') throw `invalid plugin config: ${what} must be a number`;
  if (!Number.isFinite(value) || value < 0) {
    throw `invalid plugin config: ${what} must be a number >= 0`;
  }
  return value;
}

const isObject = (v) => v !== null && typeof v === 'object' && !Array.isArray(v);

// The plugin's config JSON (the `config` import's text) with defaults filled in.
export function parseConfig(text) {
  let raw;
  try {
    raw = text.trim() === '' ? {} : JSON.parse(text);
  } catch (e) {
    throw `invalid plugin config: ${e.message}`;
  }
  if (!isObject(raw)) throw 'invalid plugin config: not a JSON object';
  const known = Object.keys(DEFAULTS);
  const unknown = Object.keys(raw).filter((name) => !known.includes(name)).sort();
  if (unknown.length > 0) {
    throw `invalid plugin config: unknown field \`${unknown[0]}\`, expected one of ` +
      known.map((name) => `\`${name}\``).join(', ');
  }
  const weights = 'model_weights' in raw ? raw.model_weights : {};
  if (!isObject(weights)) throw 'invalid plugin config: model_weights must be an object';
  const cfg = {};
  for (const name of known) {
    if (name !== 'model_weights') cfg[name] = nonNegative(name in raw ? raw[name] : DEFAULTS[name], name);
  }
  cfg.model_weights = new Map();
  for (const [model, weight] of Object.entries(weights)) {
    cfg.model_weights.set(model, nonNegative(weight, `model_weights[${JSON.stringify(model)}]`));
  }
  return cfg;
}

const award = (operator, points, reason) => (operator && points > 0 ? [{ operator, points, reason }] : []);

// Awards for one served request: none or one. Token counts are u64, so BigInt (Number works too).
export function usageAwards(cfg, operator, model, promptTokens, completionTokens, batch) {
  const weight = cfg.model_weights.has(model) ? cfg.model_weights.get(model) : cfg.default_weight;
  const [batchWeight, reason] = batch ? [cfg.batch_weight, 'batch-tokens'] : [1.0, 'tokens'];
  let tokens = BigInt(promptTokens) + BigInt(completionTokens);
  if (tokens > U64_MAX) tokens = U64_MAX;
  const points = Number(tokens) / 1000 * cfg.points_per_1k_tokens * weight * batchWeight;
  return award(operator, points, reason);
}

// Awards for a rig's periodic report: uptime, then GPU hours.
export function reportAwards(cfg, operator, periodMs, uptimeMs, gpuSeconds) {
  let up = BigInt(uptimeMs);
  const period = BigInt(periodMs);
  if (period > 0n && up > period) up = period;
  const uptime = Number(up) / MS_PER_HOUR * cfg.points_per_uptime_hour;
  // Like Rust's f64::max(0.0): a negative or NaN count counts as 0.
  const gpu = (gpuSeconds > 0 ? gpuSeconds : 0) / 3600 * cfg.points_per_gpu_hour;
  return [...award(operator, uptime, 'uptime'), ...award(operator, gpu, 'gpu-hours')];
}

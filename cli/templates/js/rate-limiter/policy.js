// {{name}}: a rate limiter. At most `rpm` requests per key and minute (config, or the key's
// metadata `{"rpm": N}`), counted in the host's key-value store; a refusal says when the
// minute ends (`retry-after`).
import { PolicyError, loadConfig, rateLimiter } from '@garage/policy';

const DEFAULTS = { rpm: null };
const WINDOW_MS = 60_000;

/** `value` as a limit: undefined for no limit, else a whole number >= 0. */
const rpmOf = (value, where) => {
  if (value === undefined || value === null) return undefined;
  if (!Number.isSafeInteger(value) || value < 0) {
    throw new PolicyError(`invalid plugin config: ${where} rpm must be a whole number >= 0`);
  }
  return value;
};

/** The key's own limit; metadata that is not an object with a valid `rpm` sets none. */
const keyRpm = (request) => {
  try {
    const metadata = JSON.parse(request.keyMetadata || '{}');
    return metadata !== null && typeof metadata === 'object' ? rpmOf(metadata.rpm, 'key') : undefined;
  } catch {
    return undefined;
  }
};

export const admit = rateLimiter((host, request) => {
  // A bad config throws, which traps: the gateway's fail-open or fail-closed setting decides.
  const configured = rpmOf(loadConfig(host, DEFAULTS).rpm, 'config');
  const rpm = keyRpm(request) ?? configured;
  if (rpm === undefined) return { allow: true, settle: false };
  const now = host.nowMs();
  const start = now - (now % WINDOW_MS);
  const resetMs = start + WINDOW_MS - now;
  const used = host.kvReserve(`rpm:${request.keyId}:${start}`, 1, rpm, resetMs);
  const headers = { limitRequests: rpm, remainingRequests: used === undefined ? 0 : rpm - used, resetRequestsMs: resetMs };
  if (used === undefined) {
    return { allow: false, retryAfterMs: resetMs, reason: `Rate limit reached: ${rpm} requests per minute`, headers, settle: false };
  }
  return { allow: true, headers, settle: false };
});

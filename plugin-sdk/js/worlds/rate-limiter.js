// The `rate-limiter` world of garage:policy@0.4.0 (0.3.0's; componentize-js, world
// `rate-limiter` of wit/v0.4): the entry module re-exports admit and settle, which call what
// rateLimiter(fn) and rateLimiter.settle(fn) registered. Without a settle function, no admitted
// request asks for one.
import { rateLimiter } from '../index.js';
import { big, lift, required, witHost } from './wit.js';

const host = witHost();

/** admit: func(request: admission) -> admitted */
export function admit(request) {
  const d = required(rateLimiter, 'admit')(host, lift(request));
  const h = d.headers ?? {};
  return {
    decision: {
      allow: Boolean(d.allow),
      retryAfterMs: big(d.retryAfterMs ?? 0),
      reason: String(d.reason ?? ''),
      headers: {
        limitRequests: big(h.limitRequests),
        remainingRequests: big(h.remainingRequests),
        resetRequestsMs: big(h.resetRequestsMs),
        limitTokens: big(h.limitTokens),
        remainingTokens: big(h.remainingTokens),
        resetTokensMs: big(h.resetTokensMs),
      },
    },
    settle: Boolean(d.allow && (d.settle ?? true) && rateLimiter.function('settle')),
  };
}

/** settle: func(settlement: settlement) */
export function settle(settlement) {
  const fn = rateLimiter.function('settle');
  if (fn) fn(host, lift(settlement));
}

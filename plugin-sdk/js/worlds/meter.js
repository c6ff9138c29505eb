// The `meter` world of garage:policy@0.5.0 (componentize-js, world `meter` of wit/v0.5):
// the entry module re-exports quote and charge, which call what meter.quote(fn) and meter(fn)
// registered.
import { get as marketGet } from 'garage:policy/market@0.5.0';

import { meter } from '../index.js';
import { big, call, each, lift, required, witHost } from './wit.js';

const host = witHost({ marketGet });

const lowerCharge = (c) => ({
  credits: Number(c.credits),
  budgetExhausted: Boolean(c.budgetExhausted),
  exhaustedUntilMs: big(c.exhaustedUntilMs),
  budgets: (c.budgets ?? []).map((b) => ({
    period: b.period,
    spent: Number(b.spent),
    limit: Number(b.limit),
    startsAtMs: big(b.startsAtMs),
    resetsAtMs: big(b.resetsAtMs),
  })),
});

/** quote: func(request: quote-request) -> result<option<price>, string> */
export function quote(request) {
  const fn = meter.function('quote');
  const price = fn ? call(fn, host, lift(request)) : undefined;
  if (price === undefined || price === null) return undefined;
  return { promptPerThousand: Number(price.promptPerThousand), completionPerThousand: Number(price.completionPerThousand) };
}

/** charge: func(events: list<usage-event>) -> list<result<charge, string>> */
export function charge(events) {
  return each(required(meter, 'charge'), host, events, lowerCharge);
}

// The `reward` world of garage:policy@0.5.0 (componentize-js, world `reward` of wit/v0.5):
// the entry module re-exports onUsage and onReport, which call what reward(fn) and
// reward.report(fn) registered.
import { reward } from '../index.js';
import { call, each, lift, required, witHost } from './wit.js';

const host = witHost();
const awards = (list) => list.map((a) => ({ operator: String(a.operator), points: Number(a.points), reason: String(a.reason) }));

/** on-usage: func(events: list<usage-event>) -> list<result<list<award>, string>> */
export function onUsage(events) {
  return each(required(reward, 'usage'), host, events, awards);
}

/** on-report: func(report: rig-report) -> result<list<award>, string> */
export function onReport(report) {
  const fn = reward.function('report');
  return fn ? awards(call(fn, host, lift(report))) : [];
}

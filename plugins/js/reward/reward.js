// Garage reward plugin in JavaScript (componentize-js): the glue between the WIT world `reward`
// and policy.js. Build: `node build.mjs` (scripts/build-plugins-polyglot.sh does it).
//
// WIT -> JS, as componentize-js maps it:
//   - each imported interface is an ES module named by its WIT id ('garage:policy/log@0.2.0');
//   - the world's exported functions are this module's named exports, in camelCase;
//   - record fields are camelCase properties; u64/s64 are BigInt, u32 and smaller and floats
//     are Number; an enum case is its name as a string ('debug');
//   - a `result<T, string>` export returns T, or throws a string for the err case (a thrown
//     Error object, or any other exception, traps: the gateway counts a fault).
import { get as getConfig } from 'garage:policy/config@0.2.0';
import { log } from 'garage:policy/log@0.2.0';

import { parseConfig, usageAwards, reportAwards } from './policy.js';

function config() {
  try {
    return parseConfig(getConfig());
  } catch (message) {
    log('error', String(message));
    throw message;
  }
}

const describe = (awards) =>
  awards.length ? awards.map((a) => `${a.points} to ${a.operator} (${a.reason})`).join(', ') : 'no award';

// on-usage: func(event: usage-event) -> result<list<award>, string>
export function onUsage(event) {
  const cfg = config();
  const awards = usageAwards(
    cfg, event.operator, event.model, event.promptTokens, event.completionTokens, event.batch);
  log('debug',
    `usage ${event.requestId}: ${event.promptTokens}+${event.completionTokens} tokens of ` +
    `${event.model}${event.batch ? ' (batch)' : ''} on rig ${event.rig || '-'}: ${describe(awards)}`);
  return awards;
}

// on-report: func(report: rig-report) -> result<list<award>, string>
export function onReport(report) {
  const cfg = config();
  const awards = reportAwards(
    cfg, report.operator, report.periodMs, report.uptimeMs, report.gpuSeconds);
  log('debug',
    `report of rig ${report.rig}: up ${report.uptimeMs} of ${report.periodMs} ms, ` +
    `${report.gpuSeconds} GPU-s: ${describe(awards)}`);
  return awards;
}

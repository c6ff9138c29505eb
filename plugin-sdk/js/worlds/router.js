// The `router` world of garage:policy@0.4.0 (componentize-js, world `router` of wit/v0.4):
// the entry module re-exports route, which calls what router(fn) registered.
import { describe } from 'garage:policy/candidates@0.2.0';

import { router } from '../index.js';
import { call, lift, required, witHost } from './wit.js';

const host = witHost({ describe });

/** route: func(request: route-request, candidates: list<candidate>) -> result<list<u32>, string> */
export function route(request, candidates) {
  const order = call(required(router, 'route'), host, lift(request, ['prefixHash']), candidates.map((c) => lift(c, ['key'])));
  return Array.from(order, Number);
}

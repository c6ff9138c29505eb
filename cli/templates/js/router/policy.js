// {{name}}: a router. Least loaded first, load counted in seconds of work: a candidate's
// requests (in flight here, running and waiting in its engine, plus this one) over its
// measured tokens per second. A rig not measured yet counts at `unmeasured_tps` (config).
import { load, loadConfig, router } from '@garage/policy';

const DEFAULTS = { unmeasured_tps: 10.0 };

export const route = router((host, request, candidates) => {
  const cfg = loadConfig(host, DEFAULTS);
  const seconds = (c) => {
    const tps = c.tokensPerSecond;
    const speed = Number.isFinite(tps) && tps > 0 ? tps : cfg.unmeasured_tps;
    return speed > 0 ? (load(c) + 1) / speed : Infinity;
  };
  const cost = candidates.map(seconds);
  // Array.prototype.sort is stable: ties keep the gateway's order.
  return candidates.map((_, i) => i).sort((a, b) => cost[a] - cost[b]);
});

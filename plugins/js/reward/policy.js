// Pays rig operators for verified tokens, weighted by model size, and for uptime: the Rust
// default reward (plugins/guests/reward), config and all, on the @garage/policy library.
import { gpuHours, loadConfig, pay, reward, tokenCount, uptimeHours } from '@garage/policy';

const DEFAULTS = {
  points_per_1k_tokens: 1.0, model_weights: {}, default_weight: 1.0,
  batch_weight: 1.0, points_per_uptime_hour: 1.0, points_per_gpu_hour: 0.0,
  verified_only: true, gateway_counted_only: true,
};

/** @type {(host: import('@garage/policy').Host, event: import('@garage/policy').UsageEvent) => import('@garage/policy').Award[]} */
export const tokens = reward((host, event) => {
  const cfg = loadConfig(host, DEFAULTS);
  if ((cfg.verified_only && event.trust !== 'verified')
    || (cfg.gateway_counted_only && event.countedBy !== 'gateway')) return [];
  const weight = cfg.model_weights.get(event.model) ?? cfg.default_weight;
  const batch = event.batch ? cfg.batch_weight : 1.0;
  const points = tokenCount(event) / 1000 * cfg.points_per_1k_tokens * weight * batch;
  return pay(event.operator, points, event.batch ? 'batch-tokens' : 'tokens');
});

/** @type {(host: import('@garage/policy').Host, report: import('@garage/policy').RigReport) => import('@garage/policy').Award[]} */
export const uptime = reward.report((host, report) => {
  const cfg = loadConfig(host, DEFAULTS);
  return [
    ...pay(report.operator, uptimeHours(report) * cfg.points_per_uptime_hour, 'uptime'),
    ...pay(report.operator, gpuHours(report) * cfg.points_per_gpu_hour, 'gpu-hours'),
  ];
});

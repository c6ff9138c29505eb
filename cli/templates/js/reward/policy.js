// {{name}}: a reward policy. Pays rig operators for verified work (tokens the gateway counted
// on a rig that passed its checks) by model weight, and for the hours their rigs stay up.
import { isVerifiedWork, loadConfig, pay, reward, tokenCount, uptimeHours } from '@garage/policy';

const DEFAULTS = { points_per_1k_tokens: 1.0, model_weights: {}, points_per_uptime_hour: 0.0 };

export const tokens = reward((host, event) => {
  const cfg = loadConfig(host, DEFAULTS);
  if (!isVerifiedWork(event)) return [];
  const weight = cfg.model_weights.get(event.model) ?? 1.0;
  return pay(event.operator, tokenCount(event) / 1000 * cfg.points_per_1k_tokens * weight, 'tokens');
});

export const uptime = reward.report((host, report) => {
  const cfg = loadConfig(host, DEFAULTS);
  return pay(report.operator, uptimeHours(report) * cfg.points_per_uptime_hour, 'uptime');
});

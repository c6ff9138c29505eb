// {{name}}: a meter. Prices tokens per 1,000 (prompt, completion) times the model's
// multiplier, quotes that price at admission and charges a request the price it was quoted.
import { cost, loadConfig, meter } from '@garage/policy';

const DEFAULTS = { prompt_per_1k: 1.0, completion_per_1k: 2.0, model_multipliers: {} };

const price = (host, model) => {
  const cfg = loadConfig(host, DEFAULTS);
  const multiplier = cfg.model_multipliers.get(model) ?? 1.0;
  return { promptPerThousand: cfg.prompt_per_1k * multiplier, completionPerThousand: cfg.completion_per_1k * multiplier };
};

export const quote = meter.quote((host, request) => price(host, request.model));

export const charge = meter((host, event) => {
  const paid = event.price ?? price(host, event.model);
  return { credits: cost(paid, event.promptTokens, event.completionTokens), budgetExhausted: false, budgets: [] };
});

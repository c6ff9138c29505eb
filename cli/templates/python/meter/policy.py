"""{{name}}: a meter. Prices tokens per 1,000 (prompt, completion) times the model's
multiplier, quotes that price at admission and charges a request the price it was quoted."""
from garage_policy import Charge, Host, Price, QuoteRequest, UsageEvent, load_config, meter

DEFAULTS = {"prompt_per_1k": 1.0, "completion_per_1k": 2.0, "model_multipliers": {}}


def price(host: Host, model: str) -> Price:
    cfg = load_config(host, DEFAULTS)
    multiplier = cfg.model_multipliers.get(model, 1.0)
    return Price(cfg.prompt_per_1k * multiplier, cfg.completion_per_1k * multiplier)


@meter.quote
def quote(host: Host, request: QuoteRequest) -> Price:
    return price(host, request.model)


@meter
def charge(host: Host, event: UsageEvent) -> Charge:
    paid = event.price if event.price is not None else price(host, event.model)
    return Charge(credits=paid.cost(event.prompt_tokens, event.completion_tokens))

"""Registering a policy's functions: what the component exports.

    from garage_policy import reward

    @reward
    def tokens(host, event): ...          # on-usage: awards for one usage event

    @reward.report
    def uptime(host, report): ...         # on-report (optional: no awards without it)

A decorator returns the function unchanged, so tests call it directly with a `MemoryHost`.
The component's entry module (`componentize-py ... componentize app`) imports the policy
module, then the world's `WitWorld` from `garage_policy.worlds.<slot>`, which calls what was
registered. One function per export: registering a second raises `ValueError`.
"""

from __future__ import annotations

from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)


class Slot:
    """The registrations of one slot: `@slot` registers its main export, `@slot.<name>` the
    others."""

    def __init__(self, name: str, main: str, others: tuple[str, ...]):
        self.name = name
        self.main = main
        self.exports = (main, *others)
        self.functions: dict[str, Callable] = {}
        for other in others:
            setattr(self, other, self._register(other))

    def __call__(self, function: F) -> F:
        return self._register(self.main)(function)

    def _register(self, export: str) -> Callable[[F], F]:
        def register(function: F) -> F:
            if not callable(function):
                raise TypeError(f"@{self.name}.{export} takes a function, not {function!r}")
            if export in self.functions:
                raise ValueError(
                    f"{self.name} {export} is already {self.functions[export].__qualname__}: "
                    "one function per export"
                )
            self.functions[export] = function
            return function

        register.__name__ = export
        return register

    def function(self, export: str) -> Callable | None:
        """What was registered for `export`, if anything."""
        return self.functions.get(export)

    def clear(self) -> None:
        """Forgets every registration (for tests that register policies one after another)."""
        self.functions.clear()


reward = Slot("reward", "usage", ("report",))
"""`@reward`: `(host, event: UsageEvent) -> list[Award]`; `@reward.report`:
`(host, report: RigReport) -> list[Award]`."""

meter = Slot("meter", "charge", ("quote",))
"""`@meter`: `(host, event: UsageEvent) -> Charge`; `@meter.quote`:
`(host, request: QuoteRequest) -> Price | None` (none registered: quotes nothing)."""

router = Slot("router", "route", ())
"""`@router`: `(host, request: RouteRequest, candidates: list[Candidate]) -> list[int]`, the
indices of `candidates`, best first."""

rate_limiter = Slot("rate_limiter", "admit", ("settle",))
"""`@rate_limiter`: `(host, request: Admission) -> Decision`; `@rate_limiter.settle`:
`(host, settlement: Settlement) -> None` (none registered: admitted requests need no settle)."""

"""The cloud's cost ledger: prices every guidance answer and keeps usage totals per tenant (edge key).

Engines report each generation's final result exactly once, also when the client went away mid-stream, so
streamed and cancelled work is charged for what was really generated (LiteLLM once logged streamed requests
at zero cost). Cache hits cost nothing and are counted apart.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from shared.cost import TeacherCost, TeacherRates, teacher_cost
from shared.generation import GenerationResult


@dataclass
class TenantUsage:
    """Totals for one tenant (or all of them)."""

    requests: int = 0  # guidance answers started on the engine or served from the cache
    cache_hits: int = 0
    cancelled: int = 0  # stopped early (client gone) or failed; charged for what was generated
    prompt_tokens: int = 0  # drafts verified included (input the teacher read)
    completion_tokens: int = 0
    engine_s: float = 0.0
    cost: float = 0.0

    def add(self, other: TenantUsage) -> None:
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)


class Ledger:
    """Prices results with the cloud's rates and sums them per tenant."""

    def __init__(self, rates: TeacherRates) -> None:
        self.rates = rates
        self._tenants: dict[str, TenantUsage] = {}

    def price(self, result: GenerationResult) -> TeacherCost:
        """A draft the teacher verified is input it read, priced with the prompt."""
        read = result.prompt_tokens + result.draft_tokens
        return teacher_cost(self.rates, read, result.completion_tokens, result.engine_s)

    def free(self) -> TeacherCost:
        """The cost of a cache hit."""
        return TeacherCost(rates=self.rates)

    def record(self, tenant: str, result: GenerationResult) -> TeacherCost:
        cost = self.price(result)
        u = self._tenants.setdefault(tenant, TenantUsage())
        u.requests += 1
        u.cancelled += result.finish_reason == "cancelled"
        u.prompt_tokens += result.prompt_tokens + result.draft_tokens
        u.completion_tokens += result.completion_tokens
        u.engine_s += result.engine_s
        u.cost += cost.amount
        return cost

    def record_hit(self, tenant: str) -> None:
        u = self._tenants.setdefault(tenant, TenantUsage())
        u.requests += 1
        u.cache_hits += 1

    def tenant(self, name: str) -> TenantUsage:
        return self._tenants.get(name, TenantUsage())

    def tenants(self) -> dict[str, TenantUsage]:
        return dict(self._tenants)

    def totals(self) -> TenantUsage:
        total = TenantUsage()
        for u in self._tenants.values():
            total.add(u)
        return total

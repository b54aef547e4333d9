"""A batch run over several deployments and under a spend cap (``corral run --deployments
FILE --budget-usd X``).

With ``--deployments`` the stack is ``routed_middleware``: a ``Router`` over the file's
deployments does the retries (``--retries``), each deployment with its own quota, breaker and
slots. With ``--budget-usd`` a ``Budget`` holds each attempt's worst case before it is sent
(innermost, or in every deployment's stack at its prices). A call that does not fit once no
other hold is out stops the run like an outage that cannot end: nothing is written for it or
for the lines not yet sent (they stay resumable), in-flight calls finish, the spend is printed
against the cap, and the exit status is ``ExitCode.BUDGET`` (3).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, TextIO

import attrs

from corral._client import routed_middleware
from corral._deployments import load_router
from corral.batch._health import Decision, ProviderHealth, StopRun
from corral.core import _errors as errors
from corral.middleware._budget import Budget, BudgetError
from corral.middleware._cache import Cache
from corral.middleware._metrics import Price
from corral.middleware._router import Deployment, Router
from corral.middleware._truncate import Truncate

if TYPE_CHECKING:
    from corral.batch._job import BatchJob, JobResult

__all__ = [
    "BudgetStops",
    "budget_outcome",
    "deployment_prices",
    "endpoint",
    "job_budget",
    "job_health",
    "routed_stack",
    "routing_checks",
]


def routing_checks(job: BatchJob) -> list[tuple[bool, str]]:
    """``BatchJob.validate``'s checks of the routing and budget fields, naming the flag."""
    usd = job.budget_usd
    return [
        (usd is None or (usd == usd and 0 <= usd < float("inf")), "--budget-usd must be >= 0"),
        (
            job.budget_redis is None or job.budget_usd is not None,
            "--budget-redis needs --budget-usd (the cap to share)",
        ),
        (
            job.deployments is None or (job.base_url is None and job.api_key_env is None),
            "--deployments brings its own URLs and keys: drop --base-url and --api-key-env",
        ),
        (
            job.deployments is None or (job.rpm is None and job.tpm is None),
            "--deployments sets each deployment's rpm and tpm in the file: drop --rpm/--tpm",
        ),
    ]


def job_budget(job: BatchJob) -> Budget | None:
    """The run's spend cap, shared through Redis when asked."""
    if job.budget_usd is None:
        return None
    return Budget(job.budget_usd, redis=job.budget_redis, name=job.budget_name)


def _cache(job: BatchJob) -> Cache | None:
    from corral.batch._job import _cache as job_cache

    return job_cache(job)


def routed_stack(job: BatchJob, budget: Budget | None) -> list[Any] | None:
    """The stack of a run over ``job.deployments`` (None without them)."""
    if job.deployments is None:
        return None
    router = load_router(
        job.deployments,
        budget=budget,
        max_attempts=job.retries + 1,
        budget_ratio=job.retry_budget,
        max_pause=job.max_pause,
    )
    return list(
        routed_middleware(
            router,
            timeout=job.timeout,
            cache=_cache(job),
            truncate=Truncate() if job.truncate else None,
        )
    )


def endpoint(job: BatchJob, api_key: str, stack: list[Any]) -> dict[str, Any]:
    """``Client``'s target: the deployments' router in ``stack``, or the URL and key."""
    router = next((layer for layer in stack if isinstance(layer, Router)), None)
    if router is not None:
        return {"deployments": router}
    return {"base_url": job.base_url, "api_key": api_key}


@attrs.define
class BudgetStops(ProviderHealth):
    """``ProviderHealth``, except that a budget refusal stops the run (nothing written)."""

    def on_failure(
        self,
        exc: errors.CorralError,
        started: float,
        now: float,
        struck_at: float | None = None,
    ) -> Decision:
        """A ``BudgetError`` stops admitting; anything else as ``ProviderHealth`` decides."""
        if isinstance(exc, BudgetError):
            return StopRun(str(exc), fatal=False)
        return super().on_failure(exc, started, now, struck_at)


def job_health(job: BatchJob, budget: Budget | None) -> ProviderHealth:
    if budget is None:
        return ProviderHealth(max_outage=job.max_outage)
    return BudgetStops(max_outage=job.max_outage)


async def budget_outcome(result: JobResult, budget: Budget | None, err: TextIO) -> JobResult:
    """Print what was spent against the cap; a run the cap stopped exits ``BUDGET``."""
    if budget is None:
        return result
    from corral.batch._job import ExitCode

    try:
        ledger = await budget.status()
    except BudgetError:
        ledger = budget.last
    spent, cap = ledger.spent / 1e9, budget.cap_usd
    result.summary["budget"] = {
        "cap_usd": cap,
        "spent_usd": round(spent, 9),
        "overrun_usd": round(ledger.overrun / 1e9, 9),
        "stopped": budget.exhausted,
    }
    unsent = result.report.unsent
    print(
        f"corral: budget: ${spent:.6f} spent of the ${cap:g} cap"
        + (
            f"; stopped at the cap, {unsent} line(s) not sent stay resumable "
            "(rerun with a higher --budget-usd)"
            if budget.exhausted
            else ""
        ),
        file=err,
    )
    if budget.exhausted and result.exit_code in (ExitCode.OK, ExitCode.FAILED):
        return attrs.evolve(result, exit_code=ExitCode.BUDGET)
    return result


class _DeploymentPrices(Mapping[str, Price]):
    """A deployment's prices by the caller's model name, for ``estimate_cost``."""

    def __init__(self, deployment: Deployment) -> None:
        self._deployment = deployment

    def __getitem__(self, model: str) -> Price:
        price = self._deployment.price_for(model)
        if price is None:
            raise KeyError(model)
        return price

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


def deployment_prices(deployment: Deployment) -> Mapping[str, Price]:
    """``deployment``'s price of each model callers name (``--dry-run --deployments``)."""
    return _DeploymentPrices(deployment)

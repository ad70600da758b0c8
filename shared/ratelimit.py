"""Per-key rate limits (S5) for both services, on the ``limits`` library: in memory or shared in Redis.

A key may make ``burst`` requests at once and ``per_min`` a minute over time: ``limits``' moving window of
``burst`` requests per ``burst / per_min`` minutes (rounded to whole seconds) allows exactly that, as the
token bucket it replaces did. With ``storage_url`` (``redis://host:port/db``) every replica counts in the same
Redis, so a key gets its limit once across the fleet, not once per replica (issue #19).

Redis outage (scenario S7): ``on_outage="open"`` (the default) falls back to this process's own memory, so
each replica still enforces the limit for its own traffic (a key gets at most replicas x its limit while
Redis is away) and nobody is refused because of the limiter; ``"closed"`` refuses at once with 503
``store_unavailable``. Open is the default because the limiter protects fairness, not money or capacity:
every answer is still billed by the durable ledger and bounded by each replica's admission gate (B1), so an
outage of the limiter's store should not become an outage of the service. Deployments that sell hard quotas
choose closed. Redis calls time out after ``timeout_s``, so a blackholed Redis costs each request at most that.
"""

from __future__ import annotations

import logging
import time
from typing import Literal

from limits import RateLimitItemPerSecond
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.aio.strategies import MovingWindowRateLimiter

from shared.errors import ErrorCode, GKTError

log = logging.getLogger("gkt.ratelimit")
OnOutage = Literal["open", "closed"]


def storage_uri(url: str) -> str:
    """``limits``' async Redis scheme for a plain ``redis://`` or ``rediss://`` URL."""
    return url if url.startswith("async+") else "async+" + url


class RateLimiter:
    """A moving window per tenant: ``burst`` requests at once, ``per_min`` a minute over time (S5)."""

    def __init__(self, per_min: float, burst: int, storage_url: str | None = None, *,
                 on_outage: OnOutage = "open", timeout_s: float = 0.25, namespace: str = "gkt") -> None:
        self.burst = burst
        self.item = RateLimitItemPerSecond(burst, max(1, round(burst * 60.0 / per_min)), namespace=namespace)
        self.on_outage = on_outage
        self.shared = storage_url is not None
        self._local = MovingWindowRateLimiter(MemoryStorage())
        self._limiter = self._local
        if storage_url is not None:
            storage: Storage = RedisStorage(storage_uri(storage_url), wrap_exceptions=True, implementation="redispy",
                                            socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
            self._limiter = MovingWindowRateLimiter(storage)
        self.limited: dict[str, int] = {}  # refusals per tenant (this process)
        self.outages = 0  # calls the shared store failed (then: local limits, or a 503 when closed)
        self.store_down = False
        self._retry_at = 0.0

    async def take(self, tenant: str, n: int = 1) -> None:
        """Spend ``n`` requests or raise 429 with the seconds until they would be available."""
        n = min(n, self.burst)  # a batch larger than the burst costs a full window, so it can still pass
        limiter = self._limiter
        try:
            if self.store_down and time.monotonic() < self._retry_at:
                raise ConnectionError("still down")  # probe a failed store once a second, not on every request
            allowed = await limiter.hit(self.item, tenant, cost=n)
            if self.store_down:
                log.warning("rate-limit store is back: limits are shared again")
                self.store_down = False
        except Exception as exc:  # limits wraps the store's own errors in StorageError; any failure is an outage
            self._outage(exc)
            limiter = self._local
            allowed = await limiter.hit(self.item, tenant, cost=n)
        if allowed:
            return
        self.limited[tenant] = self.limited.get(tenant, 0) + 1
        try:
            reset = (await limiter.get_window_stats(self.item, tenant)).reset_time
        except Exception:  # the store went away between the two calls: a full window is the safe answer
            reset = time.time() + self.item.get_expiry()
        raise GKTError(ErrorCode.rate_limited, "this key's request rate is exceeded; slow down",
                       retry_after=max(reset - time.time(), 1.0))

    def _outage(self, exc: BaseException) -> None:
        self.outages += 1
        if not self.store_down or time.monotonic() >= self._retry_at:
            self._retry_at = time.monotonic() + 1.0
        if not self.store_down:
            self.store_down = True
            log.warning("rate-limit store unavailable (%s); failing %s", type(exc).__name__, self.on_outage)
        if self.on_outage == "closed":
            raise GKTError(ErrorCode.store_unavailable, "the rate-limit store is unavailable; try again shortly",
                           retry_after=1.0) from None

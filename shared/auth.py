"""API keys (stored as SHA-256 hashes, compared in constant time), for both services (rate limits:
``shared/ratelimit.py``).

Callers are tenants: edges calling the cloud (``GKT_CLOUD_API_KEYS``), clients calling the edge
(``GKT_EDGE_API_KEYS``). Deny by default (S1): ``AuthMiddleware`` refuses every path except ``/health``,
``/ready`` and ``/metrics`` without a valid ``Authorization: Bearer <key>``, including paths no route serves
yet. Keys are random 256-bit strings, so a plain SHA-256 is enough to keep the stored form useless to a
reader (no password stretching needed); every stored hash is compared with ``hmac.compare_digest`` so
timing tells nothing (S2). Keys are never logged or echoed (S3); auth on without a key refuses to start (S6).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from shared.errors import ErrorCode, error_body

# Probes and the Prometheus scrape; restrict /metrics at the network level where that matters.
PUBLIC_PATHS = frozenset({"/health", "/ready", "/metrics"})
ANONYMOUS = "anonymous"
_ENTRY = re.compile(r"^([A-Za-z0-9._-]{1,64}):([0-9a-f]{64})$")


def new_key() -> str:
    """A fresh API key (for an edge at the cloud, or a client at the edge)."""
    return "gkt_" + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def key_entry(name: str, key: str) -> str:
    """The ``name:sha256hex`` entry a service stores for ``key``."""
    return f"{name}:{hash_key(key)}"


class KeyRing:
    """The tenants' key hashes, parsed from comma-separated ``name:sha256hex`` entries (``source`` names the
    setting in error messages)."""

    def __init__(self, entries: str, source: str = "GKT_CLOUD_API_KEYS") -> None:
        self._hashes: list[tuple[str, bytes]] = []
        for raw in (e.strip() for e in entries.split(",")):
            if not raw:
                continue
            m = _ENTRY.match(raw)
            if m is None:
                # Never echo the entry: it might be a key pasted by mistake.
                raise ValueError(f"{source} entries must look like name:<64 lowercase hex digits>")
            self._hashes.append((m.group(1), bytes.fromhex(m.group(2))))

    def __len__(self) -> int:
        return len(self._hashes)

    def tenant(self, key: str) -> str | None:
        digest = hashlib.sha256(key.encode("utf-8")).digest()
        found = None
        for name, stored in self._hashes:  # no early exit: every entry is compared
            if hmac.compare_digest(digest, stored) and found is None:
                found = name
        return found


def key_ring(enabled: bool, entries: str, prefix: str, hint: str) -> KeyRing | None:
    """The keys of a service whose settings use env ``prefix`` (``GKT_CLOUD_``, ``GKT_EDGE_``); None when auth
    is off. S6: auth on with no key would lock everyone out, so that refuses to start instead."""
    if not enabled:
        return None
    keys = KeyRing(entries, f"{prefix}API_KEYS")
    if not len(keys):
        raise RuntimeError(f"{prefix}AUTH is on but {prefix}API_KEYS is empty: {hint} "
                           f"or set {prefix}AUTH=false on a trusted network")
    return keys


class AuthMiddleware:
    """Puts the caller's tenant name into ``request.state.tenant`` or answers 401 (deny by default)."""

    def __init__(self, app: ASGIApp, keys: KeyRing | None) -> None:
        self.app = app
        self.keys = keys  # None: auth is off, everyone is the anonymous tenant

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        if self.keys is None:
            state["tenant"] = ANONYMOUS
        elif scope["path"] not in PUBLIC_PATHS:
            auth = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
            scheme, _, key = auth.partition(" ")
            tenant = self.keys.tenant(key.strip()) if scheme.lower() == "bearer" and key.strip() else None
            if tenant is None:
                body = error_body(ErrorCode.unauthorized, "a valid API key is required (Authorization: Bearer)")
                resp = JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})
                await resp(scope, receive, send)
                return
            state["tenant"] = tenant
        await self.app(scope, receive, send)

"""The API-key checks both services must pass (S1, S2, S5): one ``shared/auth.py``, one set of checks."""

from __future__ import annotations

import httpx
from starlette.routing import Route

PUBLIC = ("/health", "/ready", "/metrics")


async def deny_by_default(client: httpx.AsyncClient, must_cover: set[str]) -> None:
    """S1: every route the app serves (its OpenAPI and plain routes such as /docs, so a new route is covered
    without editing a test) answers 401 without a key, except the probes; unknown paths too."""
    app = client.app  # type: ignore[attr-defined]
    routes = {(path, method.upper()) for path, ops in app.openapi()["paths"].items() for method in ops}
    routes |= {(r.path, m) for r in app.routes if isinstance(r, Route) for m in (r.methods or ())}
    assert {p for p, _ in routes} >= must_cover | {"/docs"}
    for path, method in sorted(routes):
        r = await client.request(method, path, json={})
        if path in PUBLIC:
            assert r.status_code == 200, path
        else:
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (method, path)
            if method != "HEAD":
                assert r.json()["error"]["code"] == "unauthorized"
    for path in ("/docs", "/openapi.json", "/v1/not-a-route"):
        assert (await client.get(path)).status_code == 401


async def compared_exactly(client: httpx.AsyncClient, path: str, body: dict, key: str, other: str) -> None:
    """S2: only the exact key passes: no case variant, prefix, extension, pair or other scheme."""
    assert (await client.post(path, json=body, headers={"Authorization": f"Bearer {key}"})).status_code == 200
    for bad in (key.upper(), key.lower(), key.swapcase(), key[:-1], key + "x", "", f"{key} {other}"):
        r = await client.post(path, json=body, headers={"Authorization": f"Bearer {bad}"})
        assert r.status_code == 401, bad
    r = await client.post(path, json=body, headers={"Authorization": f"Basic {key}"})
    assert r.status_code == 401 and key not in r.text


async def limited_per_key(client: httpx.AsyncClient, path: str, body: dict, a: dict, b: dict, burst: int) -> None:
    """S5: ``a`` spends its burst, then gets 429 with Retry-After; ``b`` is unaffected."""
    for _ in range(burst):
        assert (await client.post(path, json=body, headers=a)).status_code == 200
    r = await client.post(path, json=body, headers=a)
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limited"
    assert int(r.headers["retry-after"]) >= 1
    assert (await client.post(path, json=body, headers=b)).status_code == 200

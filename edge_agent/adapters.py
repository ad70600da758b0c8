"""The student's LoRA adapter: the one loaded at start, and following the cloud's newest version of one.

At start (``GKT_EDGE_ADAPTER``) a bad adapter stops the edge with the reason: an operator asked for it. While
following (``GKT_EDGE_FOLLOW_ADAPTER``), ``AdapterFollower`` polls ``GET /v1/adapters``; a new version is
downloaded to a temporary file, hashed as it arrives, checked against the listed sha256 and base model,
renamed into place, loaded into a second ``Llama`` off the event loop and swapped in between generations
(``LlamaEngine.swap``). A corrupt, mismatched, missing or unreachable adapter leaves the current one serving;
the follower logs why, counts it (``gkt_edge_adapter_updates_total{result}``) and ``/ready`` shows it as
``adapter_problem`` without making the edge unready: the student still answers correctly with what it has, and
taking every edge out of its load balancer because the cloud published a bad file would turn one mistake into
an outage.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import httpx

from edge_agent.metrics import EdgeMetrics
from edge_agent.settings import EdgeSettings
from edge_agent.student import LlamaEngine
from shared.adapters import (
    MANIFEST_SUFFIX,
    AdapterError,
    AdapterManifest,
    AdapterRef,
    locate,
    sha256_file,
    verify,
)
from shared.models import REGISTRY, cache_dir

log = logging.getLogger("gkt.edge.adapters")


async def base_sha256(model: str, path: Path) -> str:
    """The student's sha256: the registry's for a registry model (its size was checked), else the file's."""
    if model in REGISTRY:
        return REGISTRY[model].sha256
    return await asyncio.to_thread(sha256_file, path)


def startup_adapter(spec: str, base_sha: str, scale: float) -> tuple[Path, AdapterRef]:
    """The configured adapter's GGUF, checked against its manifest and the student (blocking: hashes the
    file). Raises ``AdapterError`` with the reason, which stops the edge."""
    gguf, manifest = locate(spec)
    digest = verify(gguf, manifest, base_sha)
    name = manifest.name if manifest else gguf.name.removesuffix(".gguf")
    return gguf, AdapterRef(name=name, sha256=digest, scale=scale,
                            base_model=manifest.base_model.name if manifest else None)


def adapter_dir(settings: EdgeSettings) -> Path:
    return Path(settings.adapter_dir).expanduser() if settings.adapter_dir else cache_dir().parent / "adapters"


class AdapterFollower:
    """Keeps the student on the newest version of one adapter the cloud serves."""

    def __init__(self, engine: LlamaEngine, http: httpx.AsyncClient, settings: EdgeSettings,
                 metrics: EdgeMetrics, base_sha: str) -> None:
        assert settings.follow_adapter
        self.name = settings.follow_adapter
        self.engine = engine
        self.http = http
        self.metrics = metrics
        self.base_sha = base_sha
        self.scale = settings.adapter_scale
        self.poll_s = settings.adapter_poll_s
        self.dir = adapter_dir(settings)
        self.problem: str | None = None  # why the newest version is not serving (None: it is, or none exists)

    async def run(self) -> None:
        """Check now, then every ``poll_s`` seconds, until cancelled."""
        while True:
            await self.check()
            await asyncio.sleep(self.poll_s)

    async def check(self) -> str:
        """One poll: ``"current"``, ``"swapped"`` or the reason the current adapter stayed."""
        try:
            result = await self._update()
        except AdapterError as err:
            self.problem = f"adapter {self.name}: {err.reason}: {err}"
            self.metrics.adapter_updates.labels(err.reason).inc()
            log.warning("%s; still serving %s", self.problem, self._serving())
            return err.reason
        self.problem = None
        if result == "swapped":
            self.metrics.adapter_updates.labels("swapped").inc()
        return result

    def _serving(self) -> str:
        a = self.engine.adapter
        return f"adapter {a.name} (sha256 {a.sha256[:12]})" if a else "the base model"

    async def _update(self) -> str:
        entry = await self._listed()
        current = self.engine.adapter
        if current is not None and current.name == self.name and current.sha256 == entry.sha256:
            return "current"
        if entry.base_model.sha256 != self.base_sha:
            raise AdapterError("mismatch", f"trained on {entry.base_model.name} (sha256 "
                               f"{entry.base_model.sha256[:16]}...), not on this edge's student (sha256 "
                               f"{self.base_sha[:16]}...)")
        path = await self._download(entry)
        try:
            llm = await asyncio.to_thread(self.engine.load, path, self.scale)
        except Exception as exc:  # llama.cpp refuses tensors that do not fit the base: say so, keep serving
            raise AdapterError("load_failed", f"llama.cpp could not load {path.name}: {exc}") from exc
        old = current
        await self.engine.swap(llm, AdapterRef(name=entry.name, sha256=entry.sha256, scale=self.scale,
                                               base_model=entry.base_model.name))
        self.metrics.serving_adapter(self.engine.adapter)
        log.info("adapter %s: now serving sha256 %s (was %s)", self.name, entry.sha256[:12],
                 old.sha256[:12] if old else "the base model")
        if old is not None and old.name == self.name:  # the previous version's file, if we fetched it
            self._remove(self.dir / _filename(self.name, old.sha256))
        return "swapped"

    async def _listed(self) -> AdapterManifest:
        try:
            resp = await self.http.get("/v1/adapters")
            resp.raise_for_status()
            listing: list[dict[str, Any]] = resp.json()["data"]
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            raise AdapterError("unreachable", f"cannot list the cloud's adapters ({_why(exc)})") from exc
        for item in listing:
            if item.get("name") == self.name:
                try:
                    return AdapterManifest.model_validate({**item, "file": _filename(self.name, item["sha256"])})
                except (ValueError, KeyError) as exc:
                    raise AdapterError("invalid", f"the cloud lists it with bad fields ({exc})") from exc
        raise AdapterError("missing", "the cloud does not serve it")

    async def _download(self, entry: AdapterManifest) -> Path:
        """Stream the file to a temporary name, hashing as it arrives; rename it into place only when its
        sha256 and size are the listed ones, with its manifest beside it."""
        self.dir.mkdir(parents=True, exist_ok=True)
        target = self.dir / entry.file
        partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
        h = hashlib.sha256()
        size = 0
        try:
            try:
                async with self.http.stream("GET", f"/v1/adapters/{entry.name}") as resp:
                    resp.raise_for_status()
                    with open(partial, "wb") as fh:
                        async for chunk in resp.aiter_bytes(1 << 20):
                            h.update(chunk)
                            size += len(chunk)
                            fh.write(chunk)
                        fh.flush()
                        os.fsync(fh.fileno())
            except httpx.HTTPError as exc:
                raise AdapterError("unreachable", f"download failed ({_why(exc)})") from exc
            if h.hexdigest() != entry.sha256 or size != entry.size:
                raise AdapterError("corrupt", f"downloaded {size} bytes with sha256 {h.hexdigest()[:16]}..., the "
                                   f"cloud lists {entry.size} bytes with sha256 {entry.sha256[:16]}...")
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
        sidecar = target.with_name(target.name + MANIFEST_SUFFIX)
        sidecar.write_text(entry.model_dump_json(indent=2))
        return target

    @staticmethod
    def _remove(path: Path) -> None:
        path.unlink(missing_ok=True)
        path.with_name(path.name + MANIFEST_SUFFIX).unlink(missing_ok=True)


def _filename(name: str, sha256: str) -> str:
    return f"{name}-{sha256[:16]}.gguf"


def _why(exc: Exception) -> str:
    if isinstance(exc, httpx.HTTPStatusError):
        return f"HTTP {exc.response.status_code}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__

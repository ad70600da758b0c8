"""The adapters the cloud hands to its edges: ``GET /v1/adapters`` and ``GET /v1/adapters/{name}``.

The shelf is a directory (``GKT_CLOUD_ADAPTER_DIR``) of ``NAME.gguf`` files with their manifests
``NAME.gguf.json`` as ``gkt distill export`` writes them; it is read on every request, so an operator publishes
an adapter by copying both files in (the manifest last: ``export`` renames each into place, GGUF first). Both
routes need an edge's key, like every other route. The cloud does not hash the file on each download: the edge
checks the sha256 the listing gave it and refuses a file that does not match.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse

from shared.adapters import MANIFEST_SUFFIX, AdapterError, AdapterManifest, read_manifest
from shared.errors import ErrorCode, GKTError

log = logging.getLogger("gkt.cloud.adapters")
router = APIRouter()


class AdapterShelf:
    """The adapters in one directory, each named by its manifest."""

    def __init__(self, directory: str | Path | None) -> None:
        self.dir = Path(directory).expanduser() if directory else None

    def manifests(self) -> dict[str, AdapterManifest]:
        """Every adapter with a valid manifest and its file present; others are skipped with a log line."""
        found: dict[str, AdapterManifest] = {}
        if self.dir is None or not self.dir.is_dir():
            return found
        for path in sorted(self.dir.glob("*.gguf" + MANIFEST_SUFFIX)):
            try:
                manifest = read_manifest(path)
            except AdapterError as err:
                log.warning("skipping %s", err)
                continue
            if (self.dir / Path(manifest.file).name).is_file():
                found[manifest.name] = manifest
            else:
                log.warning("skipping adapter %s: %s is missing", manifest.name, manifest.file)
        return found

    def file(self, name: str) -> tuple[Path, AdapterManifest]:
        """The GGUF of adapter ``name``; 404 when the shelf has no such adapter."""
        manifest = self.manifests().get(name)
        if manifest is None or self.dir is None:
            raise GKTError(ErrorCode.not_found, f"no adapter named {name!r}", param="name")
        return self.dir / Path(manifest.file).name, manifest


def _shelf(request: Request) -> AdapterShelf:
    return request.app.state.adapters


@router.get("/v1/adapters")
async def list_adapters(request: Request) -> dict[str, Any]:
    """The adapters this cloud serves: name, sha256, size and base model (name, sha256)."""
    return {"object": "list", "data": [m.summary() for m in _shelf(request).manifests().values()]}


@router.get("/v1/adapters/{name}")
async def download_adapter(request: Request, name: str) -> FileResponse:
    """The adapter's GGUF, streamed; its sha256 in ``X-Adapter-Sha256``."""
    path, manifest = _shelf(request).file(name)
    return FileResponse(path, media_type="application/octet-stream", filename=path.name,
                        headers={"X-Adapter-Sha256": manifest.sha256})

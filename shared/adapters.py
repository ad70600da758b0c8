"""A LoRA adapter in GGUF and its manifest: what the cloud lists, what an edge checks before it loads one.

The manifest is the JSON file ``NAME.gguf.json`` next to ``NAME.gguf`` that ``gkt distill export`` writes
(branch ``distill``, ``gkt/distill/export.py``); only the fields read here are declared, the rest (training
configuration, converter, creation time) is kept as it is. A reader trusts the GGUF only when its sha256
matches the manifest, and loads it only onto the base model whose sha256 the manifest names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared.models import sha256_file

MANIFEST_SUFFIX = ".json"
# Why an adapter was refused, as metrics label it (a fixed set).
REASONS = ("corrupt", "mismatch", "unreachable", "missing", "invalid", "load_failed")


class AdapterError(RuntimeError):
    """An adapter that cannot be used, and why (``reason`` is one of ``REASONS``)."""

    def __init__(self, reason: str, message: str) -> None:
        assert reason in REASONS
        super().__init__(message)
        self.reason = reason


class BaseModelRef(BaseModel):
    """The model an adapter was trained on."""

    model_config = ConfigDict(extra="allow")

    name: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    file: str | None = None
    size: int | None = None


class AdapterManifest(BaseModel):
    """``NAME.gguf.json``: the adapter file's name, size and sha256 and the base model it belongs to."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    file: str
    format: str = "gguf-lora"
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)
    base_model: BaseModelRef

    def summary(self) -> dict[str, Any]:
        """What ``GET /v1/adapters`` lists for this adapter."""
        return {"name": self.name, "sha256": self.sha256, "size": self.size,
                "base_model": {"name": self.base_model.name, "sha256": self.base_model.sha256}}


class AdapterRef(BaseModel):
    """The adapter a model is serving with, as responses and ``/v1/models`` report it."""

    name: str
    sha256: str
    scale: float
    base_model: str | None = None


def read_manifest(path: Path) -> AdapterManifest:
    """Parse a manifest file; an ``invalid`` ``AdapterError`` naming the file when it is not one."""
    try:
        return AdapterManifest.model_validate_json(path.read_bytes())
    except (OSError, ValidationError) as exc:
        raise AdapterError("invalid", f"{path}: not a readable adapter manifest ({exc})") from exc


def locate(spec: str | Path) -> tuple[Path, AdapterManifest | None]:
    """``spec`` is an adapter GGUF or its manifest: the GGUF's path and the manifest when there is one
    (``X.gguf.json`` beside ``X.gguf``). A bare GGUF has no manifest: its base cannot be checked by sha256."""
    path = Path(spec)
    if path.name.endswith(".gguf" + MANIFEST_SUFFIX):
        manifest = read_manifest(path)
        return path.with_name(manifest.file), manifest
    sidecar = path.with_name(path.name + MANIFEST_SUFFIX)
    return path, read_manifest(sidecar) if sidecar.is_file() else None


def verify(gguf: Path, manifest: AdapterManifest | None, base_sha256: str | None) -> str:
    """Check ``gguf`` against its manifest (sha256, size) and the manifest against the loaded base model;
    returns the file's sha256. Raises ``AdapterError`` (``corrupt`` / ``mismatch``) saying why."""
    if not gguf.is_file():
        raise AdapterError("corrupt", f"adapter file {gguf} does not exist")
    digest = sha256_file(gguf)
    if manifest is None:
        return digest
    if digest != manifest.sha256 or gguf.stat().st_size != manifest.size:
        raise AdapterError("corrupt",
                       f"adapter {manifest.name}: {gguf} has sha256 {digest[:16]}..., the manifest says "
                       f"{manifest.sha256[:16]}... (a corrupt or partial file)")
    if base_sha256 is not None and manifest.base_model.sha256 != base_sha256:
        raise AdapterError("mismatch",
                       f"adapter {manifest.name} was trained on {manifest.base_model.name} (sha256 "
                       f"{manifest.base_model.sha256[:16]}...), not on the loaded student (sha256 "
                       f"{base_sha256[:16]}...)")
    return digest

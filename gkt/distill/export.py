"""A trained adapter to GGUF, with a manifest, using the converter of the llama.cpp that gkt runs.

llama-cpp-python's source distribution vendors the llama.cpp it builds, with ``convert_lora_to_gguf.py`` and
its ``conversion`` and ``gguf-py`` packages; the one matching the installed llama-cpp-python is downloaded once
with pip (``GKT_LLAMA_CPP_VERSION``, set by ``gkt distill``) and its converter files cached. The converter gets
``--base`` (the dequantized student's folder: its config.json) and runs with the hub offline, so nothing is
fetched from a model hub. The GGUF is written under a temporary name and renamed into place; then the
manifest ``NAME.gguf.json`` records its sha256 and size, the base model (name, sha256, size) and the training
configuration. A reader trusts the GGUF only when its sha256 matches the manifest.

    python -m gkt.distill.export RUN_DIR [--student NAME]   # re-export a finished run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gkt.distill.student import cache_root, prepare, sha256_file
from shared.models import REGISTRY

DEFAULT_LLAMA_CPP_VERSION = "0.3.36"  # pyproject.toml's pin; gkt distill passes the installed one
_KEEP = ("convert_lora_to_gguf.py", "convert_hf_to_gguf.py", "conversion/", "gguf-py/")


def converter(version: str | None = None) -> Path:
    """The cached llama.cpp converter folder of llama-cpp-python ``version`` (fetched with pip on first use)."""
    version = version or os.environ.get("GKT_LLAMA_CPP_VERSION") or DEFAULT_LLAMA_CPP_VERSION
    out = cache_root() / "llama.cpp" / version
    if (out / "convert_lora_to_gguf.py").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gkt-sdist-", dir=out.parent) as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                        "--dest", tmp, f"llama-cpp-python=={version}"], check=True)
        sdist = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        staged = Path(tmp) / "llama.cpp"
        with tarfile.open(sdist) as tar:
            for member in tar.getmembers():
                _, _, rel = member.name.partition("/vendor/llama.cpp/")
                if rel and any(rel == k or (k.endswith("/") and rel.startswith(k)) for k in _KEEP):
                    member.name = rel
                    tar.extract(member, staged, filter="data")
        if not (staged / "convert_lora_to_gguf.py").is_file():
            raise RuntimeError(f"{sdist.name} has no vendor/llama.cpp/convert_lora_to_gguf.py")
        try:
            staged.rename(out)
        except OSError:
            if not (out / "convert_lora_to_gguf.py").is_file():
                raise
    return out


def export(adapter: Path, base_dir: Path, base_gguf: Path, base_sha: str, target: Path,
           training: dict[str, Any]) -> Path:
    """``adapter`` (peft folder) -> ``target`` GGUF plus ``target``.json; returns the GGUF path."""
    conv = converter()
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(conv / "gguf-py"), str(conv)])}
    t0 = time.monotonic()
    try:
        subprocess.run([sys.executable, str(conv / "convert_lora_to_gguf.py"), "--base", str(base_dir),
                        "--outtype", "f32", "--outfile", str(partial), str(adapter)],
                       check=True, env=env, cwd=conv, stdout=subprocess.DEVNULL)
        with open(partial, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    lora = json.loads((adapter / "adapter_config.json").read_text())
    manifest = {
        "name": target.stem, "file": target.name, "format": "gguf-lora", "sha256": sha256_file(target),
        "size": target.stat().st_size,
        "base_model": {"name": student if (student := training.get("student")) in REGISTRY else base_gguf.stem,
                       "file": base_gguf.name, "sha256": base_sha, "size": base_gguf.stat().st_size},
        "lora": {"rank": lora.get("r"), "alpha": lora.get("lora_alpha"),
                 "target_modules": sorted(lora.get("target_modules") or [])},
        "training": training, "converter": {"llama_cpp_python": conv.name},
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    tmp = target.with_name(f".{target.name}.json.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, target.with_name(target.name + ".json"))
    print(f"exported {target} ({manifest['size']} bytes, sha256 {manifest['sha256'][:16]}...) in "
          f"{time.monotonic() - t0:.0f}s", file=sys.stderr)
    return target


def main(argv: list[str] | None = None) -> int:
    from shared.models import resolve

    p = argparse.ArgumentParser(prog="gkt distill export", description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="a training run folder (with adapter/ and training.json)")
    p.add_argument("--name", default=None, help="adapter name (default: the run folder's name)")
    args = p.parse_args(argv)
    training = json.loads((args.run / "training.json").read_text())
    gguf = resolve(training["student"])
    base_dir, base_sha = prepare(gguf)
    export(args.run / "adapter", base_dir, gguf, base_sha, args.run / f"{args.name or args.run.name}.gguf",
           training)
    return 0


if __name__ == "__main__":
    sys.exit(main())

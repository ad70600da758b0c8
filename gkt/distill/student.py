"""The student's weights for training: its GGUF dequantized into a Hugging Face folder, cached.

The approach of ``deploy/vllm/convert_gguf.py`` (transformers reads the GGUF, dequantizing every tensor; the
tokenizer and chat template come from the GGUF's own metadata), but kept in float32: the adapter is trained
against exactly the values llama.cpp computes with, and the folder doubles as the ``--base`` config that the
GGUF adapter converter needs. Folders are keyed by the GGUF's sha256 and appear only when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from shared.models import sha256_file


def cache_root() -> Path:
    """``$GKT_DISTILL_CACHE``, else ``$XDG_CACHE_HOME/gkt/distill`` (``~/.cache/gkt/distill``)."""
    if env := os.environ.get("GKT_DISTILL_CACHE"):
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gkt" / "distill"


def prepare(gguf: Path, log=print) -> tuple[Path, str]:
    """(the dequantized folder for ``gguf``, the GGUF's sha256); converts on first use."""
    digest = sha256_file(gguf)
    out = cache_root() / "students" / f"{gguf.stem}-{digest[:16]}"
    if (out / "gkt-source.json").is_file():
        return out, digest
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = out.with_name(out.name + f".partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.monotonic()
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    if hasattr(model.config, "quantization_config"):  # plain float weights now
        del model.config.quantization_config
    model.save_pretrained(str(tmp), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(str(tmp))
    (tmp / "gkt-source.json").write_text(json.dumps({"gguf": str(gguf), "sha256": digest,
                                                     "size": gguf.stat().st_size}))
    del model
    try:
        tmp.rename(out)  # only a complete folder appears under the final name
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process finished first: theirs is as good
        if not (out / "gkt-source.json").is_file():
            raise
    log(f"dequantized {gguf.name} -> {out} in {time.monotonic() - t0:.0f}s")
    return out, digest

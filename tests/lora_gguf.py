"""Tiny LoRA adapters in GGUF for the tests, written without torch by llama.cpp's own ``gguf`` package.

``write_lora`` reads the base model's tensor shapes and architecture with ``gguf.GGUFReader`` and writes, for
the attention projections of a few layers, the pair llama.cpp's ``llama_adapter_lora_init`` expects:
``blk.N.attn_q.weight.lora_a`` with ggml shape ``(n_in, r)`` and ``.lora_b`` with ``(r, n_out)`` (numpy shapes
are the reverse), under ``general.type = adapter``, ``adapter.type = lora`` and ``adapter.lora.alpha``.
``publish`` adds the manifest ``gkt distill export`` writes beside it.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np

from shared.adapters import sha256_file

TARGETS = ("attn_q", "attn_k", "attn_v", "attn_output")


def write_lora(base: Path, out: Path, *, seed: int, layers: tuple[int, ...] = (0, 1), rank: int = 4,
               std: float = 0.05, transpose_bug: bool = False) -> Path:
    """A LoRA adapter of ``base`` with random A/B for ``TARGETS`` in ``layers`` (``seed`` picks the values).
    ``transpose_bug``: A and B of the wrong shapes, which llama.cpp must refuse."""
    reader = gguf.GGUFReader(str(base))
    arch = reader.fields["general.architecture"].contents()
    shapes = {t.name: tuple(int(d) for d in t.shape) for t in reader.tensors}
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(rank))
    for layer in layers:
        for target in TARGETS:
            name = f"blk.{layer}.{target}.weight"
            n_in, n_out = shapes[name]
            if transpose_bug:
                n_in, n_out = n_in + 8, n_out
            a = rng.normal(0, std, size=(rank, n_in)).astype(np.float32)  # ggml (n_in, r)
            b = rng.normal(0, std, size=(n_out, rank)).astype(np.float32)  # ggml (r, n_out)
            writer.add_tensor(f"{name}.lora_a", a)
            writer.add_tensor(f"{name}.lora_b", b)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def publish(gguf_path: Path, name: str, base_name: str, base_sha256: str, *, sha256: str | None = None) -> Path:
    """Write ``NAME.gguf.json`` beside ``gguf_path`` as ``gkt distill export`` does (``sha256``: claim another
    digest than the file's, i.e. a corrupt file)."""
    manifest = {
        "name": name, "file": gguf_path.name, "format": "gguf-lora",
        "sha256": sha256 or sha256_file(gguf_path), "size": gguf_path.stat().st_size,
        "base_model": {"name": base_name, "file": f"{base_name}.gguf", "sha256": base_sha256},
        "lora": {"rank": 4, "alpha": 4, "target_modules": list(TARGETS)}, "training": {"test": True},
    }
    path = gguf_path.with_name(gguf_path.name + ".json")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(manifest))
    tmp.replace(path)
    return path

"""Training checkpoints that survive ``kill -9``: written whole to a temporary file, fsynced, then renamed.

A checkpoint holds everything the next step depends on: the adapter's weights, the optimizer and LR scheduler
states, the torch RNG state (LoRA dropout), the step (the data position follows from it: see train.py) and the
running totals. Resuming from it continues the run as if it had never stopped; the steps after it are done
again, identically.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` so that ``path`` holds either the old or the new object, never a part."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def load(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])

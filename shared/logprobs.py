"""Log-probabilities from one row of raw logits: what the cloud's teacher reports per guidance token and the
edge's student per answer (or prompt) token. One function, so both sides compute them the same way."""

from __future__ import annotations

from typing import Any

import numpy as np

from shared.generation import TokenChoice


def token_choice(row: Any, token: int, k: int) -> TokenChoice:
    """``token``'s natural-log probability under ``row`` (the raw logits, before temperature and top-p: the
    model's own distribution) and the ``k`` most likely tokens with theirs, best first.

    A log-softmax over the whole vocabulary in float64: 0.1-0.3 ms for Qwen's 152k entries measured here,
    against 20-37 ms for a decode step of the 0.5B student."""
    logits = np.asarray(row)
    peak = float(logits.max())
    lse = peak + float(np.log(np.exp(logits - peak, dtype=np.float64).sum()))
    best = np.argpartition(-logits, k)[:k] if k else np.empty(0, dtype=np.int64)
    best = best[np.argsort(-logits[best], kind="stable")]
    return TokenChoice(token, float(logits[token]) - lse, [(int(i), float(logits[i]) - lse) for i in best])

"""Log-probabilities from one row of raw logits: what the cloud's teacher reports per guidance token and the
edge's student per answer (or prompt) token. One function, so both sides compute them the same way."""

from __future__ import annotations

from typing import Any

import numpy as np

from shared.generation import TokenChoice


def token_choice(row: Any, token: int, k: int) -> TokenChoice:
    """``token``'s natural-log probability under ``row`` (the raw logits, before temperature and top-p: the
    model's own distribution) and the ``k`` most likely tokens with theirs, best first.

    Runs once per generated token when log-probabilities are asked for (re-guidance always asks), so it stays
    cheap: the exponentials in float32 with a float64 sum, and the top k by a partial sort of the row itself
    (no negated copy). Measured here on Qwen's 152k entries: about 0.5 ms without alternatives, 1.1 ms with
    20, against 20-37 ms for a decode step of the 0.5B student."""
    logits = np.asarray(row)
    peak = float(logits.max())
    lse = peak + float(np.log(np.exp(logits - peak).sum(dtype=np.float64)))
    if k:
        best = np.argpartition(logits, len(logits) - k)[len(logits) - k :]
        best = best[np.argsort(-logits[best], kind="stable")]
    else:
        best = np.empty(0, dtype=np.int64)
    return TokenChoice(token, float(logits[token]) - lse, [(int(i), float(logits[i]) - lse) for i in best])

"""The guidance cache: identical deterministic requests reuse the guidance.

A request is cacheable when its output is a function of its input: greedy (``temperature`` 0) or sampled
with a fixed ``seed``. The key is a hash of the teacher's name and every field that shapes the output; only
completed answers (``stop`` or ``length``) are stored. Memory is bounded by entries and by bytes of text,
evicting the least recently used. Concurrent identical misses are not merged: each generates.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from dataclasses import asdict, dataclass, replace
from typing import Any

from shared.generation import GenerationResult
from shared.protocol import GuidanceRequest


@dataclass
class CachedGuidance:
    """The pieces of one answer (text, tokens) and its result."""

    pieces: list[tuple[str, int]]
    result: GenerationResult
    size: int = 0

    def to_json(self) -> dict[str, Any]:
        """The answer as the ledger keeps it (replayed to a retry with the same idempotency key)."""
        return {"pieces": [[t, n] for t, n in self.pieces], "result": asdict(self.result)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CachedGuidance:
        return cls([(str(t), int(n)) for t, n in data["pieces"]], GenerationResult(**data["result"]))


class GuidanceCache:
    """A bounded LRU of guidance answers with hit and miss counters."""

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, CachedGuidance] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0 and self.max_bytes > 0

    def key(self, model: str, request: GuidanceRequest) -> str | None:
        """The cache key, or None when the request is not deterministic (or the cache is off)."""
        if not self.enabled or (request.temperature > 0 and request.seed is None):
            return None
        # stream is only the framing and timeout_ms the caller's budget: neither changes the guidance.
        fields = request.model_dump(exclude={"stream", "timeout_ms"})
        if request.temperature == 0:  # greedy ignores these
            fields.pop("seed")
            fields.pop("top_p")
        raw = json.dumps([model, fields], sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(raw.encode("utf-8")).hexdigest()

    def get(self, key: str) -> CachedGuidance | None:
        hit = self._items.get(key)
        if hit is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return hit

    def put(self, key: str, pieces: list[tuple[str, int]], result: GenerationResult) -> None:
        if result.finish_reason not in ("stop", "length"):
            return
        size = sum(len(t.encode("utf-8")) for t, _ in pieces) + 64 * (len(pieces) + 1)
        if size > self.max_bytes:
            return
        if key in self._items:
            self.bytes -= self._items.pop(key).size
        self._items[key] = CachedGuidance(list(pieces), replace(result), size)
        self.bytes += size
        while len(self._items) > self.max_entries or self.bytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self.bytes -= old.size
            self.evictions += 1

    def snapshot(self) -> dict[str, Any]:
        return {"entries": len(self._items), "bytes": self.bytes, "hits": self.hits, "misses": self.misses,
                "evictions": self.evictions, "max_entries": self.max_entries, "max_bytes": self.max_bytes}

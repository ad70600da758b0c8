"""The teacher-engine seam: what the guidance service needs from any teacher.

``open`` validates a request (context length, upstream acceptance) and returns the generation as an async
iterator of ``Piece`` followed by exactly one ``GenerationResult``. Errors raised by ``open`` happen before
any byte is sent, so they become an HTTP status; errors while iterating become an error frame.

``on_result`` is called exactly once per opened generation with its final result, also when the consumer
stops early (finish reason ``cancelled``, counting what was generated) or the engine fails: the ledger
charges streamed and abandoned work from it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

from cloud_service.settings import CloudSettings
from shared.generation import GenerationResult, Piece
from shared.protocol import GuidanceRequest
from shared.tokenize import DetokenizeRequest, TokenizeRequest

Generation = AsyncIterator[Piece | GenerationResult]
OnResult = Callable[[GenerationResult], None]


class Guarded:
    """A generation whose ``cleanup`` runs exactly once when it is closed, even if it was never iterated.

    An async generator that never started ignores ``aclose()`` (its ``finally`` never runs). A response whose
    client left before the first byte never starts its body, so anything held for it (an admission slot, an
    upstream connection) must be freed here, not in a ``finally`` inside the generator.
    """

    def __init__(self, inner: AsyncIterator[Piece | GenerationResult], cleanup: Callable[[], Awaitable[None]]) -> None:
        self._inner = inner
        self._cleanup = cleanup
        self._closed = False

    def __aiter__(self) -> Guarded:
        return self

    async def __anext__(self) -> Piece | GenerationResult:
        return await self._inner.__anext__()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self._inner.aclose()  # type: ignore[attr-defined]
        finally:
            await self._cleanup()


class TeacherEngine(Protocol):
    """A teacher model that writes guidance."""

    model_name: str

    @property
    def stats(self) -> dict[str, Any]:
        """Engine counters (e.g. the batch-size histogram), for the stats endpoint."""
        ...

    async def open(self, request: GuidanceRequest, on_result: OnResult | None = None) -> Generation: ...

    async def tokenize(self, request: TokenizeRequest) -> dict[str, Any]:
        """``/tokenize`` with the teacher's tokenizer (shared/tokenize.py)."""
        ...

    async def detokenize(self, request: DetokenizeRequest) -> dict[str, Any]:
        """``/detokenize`` with the teacher's tokenizer."""
        ...

    async def aclose(self) -> None: ...


async def build_engine(settings: CloudSettings) -> TeacherEngine:
    """The configured backend; adapters are imported lazily so each needs only its own dependencies."""
    if settings.backend == "openai":
        from cloud_service.engines.openai_upstream import OpenAITeacher

        return await OpenAITeacher.connect(settings)
    from cloud_service.engines.llama_cpp import LlamaTeacher

    return await LlamaTeacher.load(settings)

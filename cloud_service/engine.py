"""The teacher-engine seam: what the guidance service needs from any teacher.

``open`` validates a request (context length, upstream acceptance) and returns the generation as an async
iterator of ``Piece`` followed by exactly one ``GenerationResult``. Errors raised by ``open`` happen before
any byte is sent, so they become an HTTP status; errors while iterating become an error frame.

``on_result`` is called exactly once per opened generation with its final result, also when the consumer
stops early (finish reason ``cancelled``, counting what was generated) or the engine fails: the ledger
charges streamed and abandoned work from it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from cloud_service.settings import CloudSettings
from shared.generation import GenerationResult, Piece
from shared.protocol import GuidanceRequest

Generation = AsyncIterator[Piece | GenerationResult]
OnResult = Callable[[GenerationResult], None]


class TeacherEngine(Protocol):
    """A teacher model that writes guidance."""

    model_name: str

    @property
    def stats(self) -> dict[str, Any]:
        """Engine counters (e.g. the batch-size histogram), for the stats endpoint."""
        ...

    async def open(self, request: GuidanceRequest, on_result: OnResult | None = None) -> Generation: ...

    async def aclose(self) -> None: ...


async def build_engine(settings: CloudSettings) -> TeacherEngine:
    """The configured backend; adapters are imported lazily so each needs only its own dependencies."""
    if settings.backend == "openai":
        from cloud_service.engines.openai_upstream import OpenAITeacher

        return await OpenAITeacher.connect(settings)
    from cloud_service.engines.llama_cpp import LlamaTeacher

    return await LlamaTeacher.load(settings)

"""The teacher-engine seam: what the guidance service needs from any teacher.

``open`` validates a request (context length, upstream acceptance) and returns the generation as an async
iterator of ``Piece`` followed by exactly one ``GenerationResult``. Errors raised by ``open`` happen before
any byte is sent, so they become an HTTP status; errors while iterating become an error frame.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from cloud_service.settings import CloudSettings
from shared.generation import GenerationResult, Piece
from shared.protocol import GuidanceRequest

Generation = AsyncIterator[Piece | GenerationResult]


class TeacherEngine(Protocol):
    """A teacher model that writes guidance."""

    model_name: str

    async def open(self, request: GuidanceRequest) -> Generation: ...

    async def aclose(self) -> None: ...


async def build_engine(settings: CloudSettings) -> TeacherEngine:
    """The configured backend; adapters are imported lazily so each needs only its own dependencies."""
    if settings.backend == "openai":
        from cloud_service.engines.openai_upstream import OpenAITeacher

        return await OpenAITeacher.connect(settings)
    from cloud_service.engines.llama_cpp import LlamaTeacher

    return await LlamaTeacher.load(settings)

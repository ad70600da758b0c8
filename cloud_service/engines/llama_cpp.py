"""The embedded CPU teacher: llama.cpp in process."""

from __future__ import annotations

import asyncio

from cloud_service.engine import Generation
from cloud_service.settings import CloudSettings
from shared.generation import GenerationParams
from shared.llama import LlamaEngine
from shared.models import resolve
from shared.protocol import GuidanceRequest


class LlamaTeacher:
    """Renders chat with the teacher's own template and streams from one llama.cpp context."""

    def __init__(self, engine: LlamaEngine, model_name: str) -> None:
        self.engine = engine
        self.model_name = model_name

    @classmethod
    async def load(cls, settings: CloudSettings) -> LlamaTeacher:
        path = resolve(settings.model)
        engine = await asyncio.to_thread(
            LlamaEngine, path, n_ctx=settings.n_ctx, n_threads=settings.n_threads,
            n_batch=settings.n_batch, max_waiting=settings.max_waiting, name=settings.model,
        )
        return cls(engine, settings.model)

    @property
    def waiting(self) -> int:
        """Requests waiting for the context (for the queue gauge)."""
        return self.engine.waiting

    def stalled(self, threshold_s: float) -> bool:
        return self.engine.stalled(threshold_s)

    @property
    def dead(self) -> str | None:
        return self.engine.dead

    async def open(self, request: GuidanceRequest) -> Generation:
        if request.messages is not None:
            text = self.engine.render_chat([m.model_dump() for m in request.messages])
            tokens, param = self.engine.tokenize(text, special=True), "messages"
        else:
            tokens, param = self.engine.tokenize(request.prompt or "", special=False), "prompt"
        self.engine.check_fits(len(tokens), request.max_tokens, param)
        params = GenerationParams(
            max_tokens=request.max_tokens, temperature=request.temperature, top_p=request.top_p,
            seed=request.seed, stop=request.stop,
        )
        return self.engine.stream(tokens, params)

    async def aclose(self) -> None:
        await asyncio.to_thread(self.engine.close)

"""Teacher engine adapters (llama.cpp in process, OpenAI-compatible upstream) and the factory that picks one.

The factory lives here rather than in ``cloud_service.engine`` so the seam never imports its adapters: the
adapters import the seam, and the app imports the factory.
"""

from __future__ import annotations

from cloud_service.engine import TeacherEngine
from cloud_service.settings import CloudSettings


async def build_engine(settings: CloudSettings) -> TeacherEngine:
    """The configured backend; adapters are imported lazily so each needs only its own dependencies."""
    if settings.backend == "openai":
        from cloud_service.engines.openai_upstream import OpenAITeacher

        return await OpenAITeacher.connect(settings)
    from cloud_service.engines.llama_cpp import LlamaTeacher

    return await LlamaTeacher.load(settings)

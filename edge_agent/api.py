"""Edge routes only: OpenAI-compatible completions plus health."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from edge_agent.metrics import EdgeMetrics
from edge_agent.pipeline import Pipeline
from edge_agent.protocol import ChatCompletionRequest, CompletionRequest
from edge_agent.responses import Envelope, Kind, collect, stream
from shared.errors import GKTError
from shared.http import app_state, unless_disconnected
from shared.tokenize import DetokenizeRequest, LlamaVocabulary, TokenizeRequest, detokenize, tokenize

router = APIRouter()


PipelineDep = Annotated[Pipeline, Depends(app_state("pipeline"))]
MetricsDep = Annotated[EdgeMetrics, Depends(app_state("metrics"))]
ROUTE_LABELS = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}


async def _answer(
    request: Request, pipeline: Pipeline, metrics: EdgeMetrics, body: ChatCompletionRequest | CompletionRequest,
    kind: Kind,
) -> Any:
    route = "chat" if kind == "chat" else "completions"
    mode = body.mode or pipeline.settings.default_mode
    try:
        await request.app.state.limiter.take(request.state.tenant)  # S5: per client key
        plan = pipeline.plan(body)
    except GKTError as err:
        metrics.rejected(route, mode, err)
        raise
    env = Envelope(kind=kind, model=pipeline.student.name, namer=pipeline.student, top=plan.logprobs)
    events = metrics.observe(pipeline.run(plan), route, mode)
    if not body.stream:
        whole = await unless_disconnected(request, collect(events))
        if whole is None:  # C1: the client left; the answer's work has been stopped
            return Response(status_code=499)
        return JSONResponse(env.whole(*whole))
    # Pull the first event before answering so that a refusal (e.g. teacher mode with the cloud down)
    # is still an HTTP status rather than an error inside a 200 stream.
    first = await anext(events)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return StreamingResponse(
        stream(env, first, events, include_usage, request.app.state.lifecycle.drain_deadline),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.post("/v1/chat/completions")
async def chat_completions(
    request: Request, body: ChatCompletionRequest, pipeline: PipelineDep, metrics: MetricsDep
) -> Any:
    """OpenAI chat completions; ``mode``, ``guidance_tokens`` and ``task`` are gkt extensions."""
    return await _answer(request, pipeline, metrics, body, "chat")


@router.post("/v1/completions")
async def completions(request: Request, body: CompletionRequest, pipeline: PipelineDep, metrics: MetricsDep) -> Any:
    """OpenAI text completions of a raw prompt; same extensions as chat."""
    return await _answer(request, pipeline, metrics, body, "completion")


@router.post("/tokenize")
async def tokenize_route(body: TokenizeRequest, pipeline: PipelineDep) -> dict[str, Any]:
    """The student's tokens, as vLLM's (and llama-server's) ``/tokenize``."""
    return tokenize(LlamaVocabulary(pipeline.student), body)


@router.post("/detokenize")
async def detokenize_route(body: DetokenizeRequest, pipeline: PipelineDep) -> dict[str, Any]:
    """The student's text for token ids, as vLLM's ``/detokenize``."""
    return detokenize(LlamaVocabulary(pipeline.student), body)


@router.get("/tokenizer_info")
async def tokenizer_info(pipeline: PipelineDep) -> dict[str, Any]:
    """The student's special tokens and chat template, as vLLM's ``/tokenizer_info``."""
    return LlamaVocabulary(pipeline.student).info()


@router.post("/teacher/tokenize")
async def teacher_tokenize(body: TokenizeRequest, pipeline: PipelineDep) -> dict[str, Any]:
    """The teacher's tokens, from the cloud's ``/tokenize``."""
    return await pipeline.cloud.call("/tokenize", body.model_dump(exclude_unset=True))


@router.post("/teacher/detokenize")
async def teacher_detokenize(body: DetokenizeRequest, pipeline: PipelineDep) -> dict[str, Any]:
    """The teacher's text for token ids, from the cloud's ``/detokenize``."""
    return await pipeline.cloud.call("/detokenize", body.model_dump(exclude_unset=True))


@router.get("/v1/models")
async def models(pipeline: PipelineDep) -> dict[str, Any]:
    """The student this edge serves, with its LoRA adapter (``adapter``: null when it serves the base alone)."""
    adapter = pipeline.student.adapter
    return {"object": "list", "data": [{
        "id": pipeline.student.name, "object": "model", "owned_by": "gkt",
        "adapter": adapter.model_dump() if adapter else None,
    }]}


def ready_info(app: FastAPI) -> dict[str, Any]:
    """What ``/ready`` adds when ready: the student, its adapter, why a followed adapter is not serving, and the
    cloud breaker's state (readiness never depends on the cloud, nor on an adapter it could not deliver)."""
    pipeline = app.state.pipeline
    adapter = pipeline.student.adapter
    follower = app.state.adapter_follower
    return {"model": pipeline.student.name, "adapter": adapter.model_dump() if adapter else None,
            "adapter_problem": follower.problem if follower else None,
            "cloud_breaker": pipeline.cloud.breaker.state}

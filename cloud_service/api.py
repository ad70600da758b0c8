"""Cloud routes only; the work happens in ``GuidanceService``."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import Response, StreamingResponse
from starlette.background import BackgroundTask

from cloud_service.fleet import Fleet
from cloud_service.serving import GuidanceService
from shared.http import app_state, unless_disconnected
from shared.protocol import (
    PROTOCOL_HEADER,
    PROTOCOL_VERSION,
    BatchGuidanceRequest,
    BatchGuidanceResponse,
    GuidanceRequest,
    GuidanceResult,
)
from shared.telemetry import TELEMETRY_PATH, AnswerBatch, BatchReceipt
from shared.tokenize import DetokenizeRequest, TokenizeRequest

router = APIRouter()


ServiceDep = Annotated[GuidanceService, Depends(app_state("service"))]
FleetDep = Annotated[Fleet, Depends(app_state("fleet"))]
ROUTE_LABELS = {"/v1/guidance": "guidance", "/v1/guidance/batch": "batch"}


def get_tenant(request: Request) -> str:
    """The caller's tenant, set by the auth middleware (deny by default)."""
    return request.state.tenant


TenantDep = Annotated[str, Depends(get_tenant)]
# One bill per key (the ledger's unique (tenant, key)): a retry with the key is replayed, not billed again.
IdempotencyKey = Annotated[str | None, Header(
    alias="Idempotency-Key", pattern=r"^[A-Za-z0-9._:-]{1,128}$",
    description="The caller's key for this answer; a retry with the same key is replayed without a second charge.",
)]

_SSE_DOC: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "Server-sent events (frames `token`, `heartbeat`, then one `done` or `error`), or a "
        "`GuidanceResult` when `stream` is false.",
        "content": {
            "text/event-stream": {},
            "application/json": {"schema": {"$ref": "#/components/schemas/GuidanceResult"}},
        },
    }
}


@router.post("/v1/guidance", responses=_SSE_DOC, response_model=None)
async def guidance(
    request: Request, body: GuidanceRequest, service: ServiceDep, tenant: TenantDep, key: IdempotencyKey = None
) -> StreamingResponse | GuidanceResult | Response:
    """The teacher's first ``max_tokens`` (k) tokens for a chat or a raw prompt."""
    generation = await service.open(body, tenant, idempotency_key=key)
    if not body.stream:
        result = await unless_disconnected(request, service.collect(generation))
        return Response(status_code=499) if result is None else result  # C1: 499, the client left
    return StreamingResponse(
        service.sse(generation),
        media_type="text/event-stream",
        # Runs even when the client left before the body started: frees the slot and the engine's sequence.
        background=BackgroundTask(generation.aclose),
        headers={PROTOCOL_HEADER: PROTOCOL_VERSION, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.post("/v1/guidance/batch", response_model=BatchGuidanceResponse)
async def guidance_batch(
    request: Request, body: BatchGuidanceRequest, service: ServiceDep, tenant: TenantDep, key: IdempotencyKey = None
) -> BatchGuidanceResponse | Response:
    """Guidance for many prompts in one call; each item has a result or an error."""
    result = await unless_disconnected(request, service.batch(body, tenant, key))
    return Response(status_code=499) if result is None else result  # C1: 499, the client left


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, service: ServiceDep) -> dict[str, Any]:
    """The teacher's tokens for a prompt or chat, as vLLM's (and llama-server's) ``/tokenize``."""
    return await service.engine.tokenize(body)


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, service: ServiceDep) -> dict[str, Any]:
    """The teacher's text for token ids, as vLLM's ``/detokenize``."""
    return await service.engine.detokenize(body)


@router.get("/tokenizer_info")
async def tokenizer_info(service: ServiceDep) -> dict[str, Any]:
    """The teacher's special tokens, chat template and vocabulary fingerprint, as vLLM's ``/tokenizer_info``."""
    return await service.engine.tokenizer_info()


@router.post(TELEMETRY_PATH, response_model=BatchReceipt)
async def telemetry_answers(body: AnswerBatch, fleet: FleetDep, tenant: TenantDep) -> BatchReceipt:
    """An edge's per-answer records (at least once: a record already stored is acknowledged, not stored again)."""
    return await fleet.receive(tenant, body)


@router.get("/v1/usage")
async def usage(service: ServiceDep, fleet: FleetDep, tenant: TenantDep) -> dict[str, Any]:
    """The calling key's usage totals and cost, its edge's reported answers (``edge``), and for a fleet viewer
    every edge's and the fleet's totals (``fleet``)."""
    billed = vars(await service.ledger.tenant(tenant))
    return {"tenant": tenant, "currency": service.ledger.rates.currency, **billed, **await fleet.usage(tenant)}


@router.get("/v1/stats")
async def stats(service: ServiceDep) -> dict[str, Any]:
    """Engine (batch sizes, tokens), admission, cache and ledger counters."""
    return await service.stats()


@router.get("/v1/models")
async def models(service: ServiceDep) -> dict[str, Any]:
    """The teacher this cloud serves."""
    return {"object": "list", "data": [{"id": service.engine.model_name, "object": "model", "owned_by": "gkt"}]}

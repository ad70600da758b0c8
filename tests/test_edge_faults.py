"""The edge never loses an answer when the cloud misbehaves (R4, R5, F1, F2).

The student is the real SmolLM2 on llama.cpp; the cloud is either a closed port (a real connection
failure) or a scripted fake that injects the fault. The happy path runs on real processes in test_e2e.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from edge_agent.app import create_app
from edge_agent.settings import EdgeSettings
from edge_agent.student import LlamaEngine
from gkt.launcher import free_port
from shared.errors import ErrorCode, GKTError, error_body
from shared.models import resolve
from shared.protocol import DoneFrame, ErrorFrame, Timings, TokenFrame, Usage, encode_frame

QUESTION = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 24}


@pytest.fixture(scope="module")
def student() -> Iterator[LlamaEngine]:
    engine = LlamaEngine(resolve("smollm2-135m-instruct"), n_ctx=2048, n_threads=1, name="smollm2-135m-instruct")
    yield engine
    engine.close()


def fake_cloud(frames: list, status: int = 200) -> httpx.AsyncClient:
    """A cloud that answers every guidance request with the given frames (and then EOF)."""
    app = FastAPI()

    @app.post("/v1/guidance")
    async def guidance(request: Request) -> Response:
        if status != 200:
            return JSONResponse(error_body(ErrorCode.overloaded, "busy"), status_code=status,
                                headers={"Retry-After": "2"})
        return Response(b"".join(encode_frame(f) for f in frames), media_type="text/event-stream")

    return httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://cloud")


@asynccontextmanager
async def edge(student: LlamaEngine, http: httpx.AsyncClient) -> AsyncIterator[httpx.AsyncClient]:
    # In process, faults are the point: client keys are off, explicitly (they are tested in test_edge_auth.py).
    app = create_app(EdgeSettings(n_ctx=2048, cloud_connect_timeout_s=1.0, auth=False), student=student, http=http)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
        transport=httpx.ASGITransport(app), base_url="http://edge", timeout=120
    ) as client:
        yield client
    await http.aclose()


def tokens(*texts: str) -> list[TokenFrame]:
    return [TokenFrame(seq=i, text=t) for i, t in enumerate(texts)]


async def test_cloud_unreachable_student_answers_alone(student: LlamaEngine) -> None:
    """R4: nothing listens on the cloud port: the student answers and the response says so."""
    closed = httpx.AsyncClient(base_url=f"http://127.0.0.1:{free_port()}")
    async with edge(student, closed) as client:
        r = await client.post("/v1/chat/completions", json=QUESTION)
    assert r.status_code == 200, r.text
    body = r.json()
    gkt = body["gkt"]
    assert gkt["fallback"] == "upstream_unavailable" and not gkt["partial"]
    assert gkt["guidance"] == "" and gkt["usage"]["student_tokens"] > 0
    assert body["choices"][0]["message"]["content"]


async def test_cloud_refuses_student_answers_alone(student: LlamaEngine) -> None:
    async with edge(student, fake_cloud([], status=503)) as client:
        r = await client.post("/v1/chat/completions", json=QUESTION)
    assert r.status_code == 200
    assert r.json()["gkt"]["fallback"] == "overloaded"


async def test_stream_broken_midway_student_continues_from_partial(student: LlamaEngine) -> None:
    """R5/F1: EOF without a terminal frame: the guidance so far is kept, marked partial."""
    async with edge(student, fake_cloud(tokens("The", " capital", " of", " Fra"))) as client:
        r = await client.post("/v1/chat/completions", json=QUESTION)
    assert r.status_code == 200
    body = r.json()
    gkt = body["gkt"]
    assert gkt["partial"] and gkt["fallback"] is None and "terminal frame" in gkt["cloud_error"]
    # Shown as it arrived and never taken back (whole-word guidance, shared/words.py): the student continues
    # from inside the word the broken stream left unfinished.
    assert gkt["guidance"] == "The capital of Fra"
    assert body["choices"][0]["message"]["content"].startswith("The capital of Fra")
    assert gkt["usage"]["student_tokens"] > 0


async def test_error_frame_midway_student_continues(student: LlamaEngine) -> None:
    """F2: the cloud's engine fails mid-stream: an error frame follows, the partial text is kept."""
    err = ErrorFrame.from_error(3, GKTError(ErrorCode.engine_error, "teacher died"))
    async with edge(student, fake_cloud([*tokens("Paris", " is", " the"), err])) as client:
        r = await client.post("/v1/chat/completions", json=QUESTION)
    gkt = r.json()["gkt"]
    assert r.status_code == 200 and gkt["partial"] and gkt["guidance"] == "Paris is the"
    assert "teacher died" in gkt["cloud_error"]


async def test_garbage_from_cloud_is_a_protocol_error_not_a_hang(student: LlamaEngine) -> None:
    app = FastAPI()

    @app.post("/v1/guidance")
    async def guidance() -> Response:
        return Response(b"data: {not json}\n\n", media_type="text/event-stream")

    http = httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://cloud")
    async with edge(student, http) as client:
        r = await client.post("/v1/chat/completions", json=QUESTION)
    assert r.status_code == 200 and r.json()["gkt"]["fallback"] == "protocol_error"


async def test_out_of_sequence_frames_rejected(student: LlamaEngine) -> None:
    frames = [TokenFrame(seq=0, text="A"), TokenFrame(seq=5, text=" B")]
    async with edge(student, fake_cloud(frames)) as client:
        r = await client.post("/v1/chat/completions", json=QUESTION)
    assert r.json()["gkt"]["cloud_error"] == "guidance frames out of sequence"


async def test_complete_guidance_needs_no_student(student: LlamaEngine) -> None:
    done = DoneFrame(seq=3, finish_reason="stop", model="t", usage=Usage(prompt_tokens=5, completion_tokens=3),
                     timings=Timings())
    async with edge(student, fake_cloud([*tokens("It", " is", " Paris."), done])) as client:
        r = await client.post("/v1/chat/completions", json=QUESTION)
    body = r.json()
    assert body["choices"][0]["message"]["content"] == "It is Paris."
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["gkt"]["guidance_complete"] and body["gkt"]["usage"]["student_tokens"] == 0


async def test_teacher_mode_with_cloud_down_is_an_error(student: LlamaEngine) -> None:
    """Teacher mode asks for the teacher: the student does not stand in silently."""
    closed = httpx.AsyncClient(base_url=f"http://127.0.0.1:{free_port()}")
    async with edge(student, closed) as client:
        r = await client.post("/v1/chat/completions", json={**QUESTION, "mode": "teacher"})
        rs = await client.post("/v1/chat/completions", json={**QUESTION, "mode": "teacher", "stream": True})
    assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_unavailable"
    assert rs.status_code == 502


async def test_teacher_mode_stream_error_midway_ends_with_error_event(student: LlamaEngine) -> None:
    err = ErrorFrame.from_error(2, GKTError(ErrorCode.engine_error, "teacher died"))
    async with edge(student, fake_cloud([*tokens("Paris", " is"), err])) as client:
        r = await client.post("/v1/chat/completions", json={**QUESTION, "mode": "teacher", "stream": True})
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert r.status_code == 200 and events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "engine_error"
    assert "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-2]) == "Paris is"

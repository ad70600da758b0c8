"""A teacher behind any OpenAI-compatible server: `vllm serve` in production, or a hosted API.

Chat requests go to ``/chat/completions`` (the upstream renders its own template), raw prompts to
``/completions``. Streams ask for ``stream_options.include_usage`` so token counts come from the upstream's
own tokenizer; servers that do not send usage get the count of streamed pieces instead.

A final assistant message is continued with vLLM's ``continue_final_message`` (and no new generation prompt).
vLLM refuses to continue a message that ends in whitespace, so trailing whitespace is cut from the message
and the same whitespace is dropped from the start of the continuation (``TrailingWhitespace``).
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from time import perf_counter
from typing import Any

import httpx

from cloud_service.engine import Generation, Item, OnResult, Stream
from cloud_service.engines.openai_verify import UpstreamVerifier
from cloud_service.settings import CloudSettings
from shared.errors import ErrorCode, GKTError
from shared.generation import GenerationResult, Piece, TrailingWhitespace
from shared.protocol import GuidanceRequest, SSEDecoder
from shared.upstream import cached_tokens, openai_status_error, transport_errors
from shared.words import WordEnd


class OpenAITeacher:
    """Streams guidance from an OpenAI-compatible upstream over one pooled httpx client."""

    def __init__(self, client: httpx.AsyncClient, model_name: str) -> None:
        self._client = client
        self.model_name = model_name
        root = str(client.base_url).rstrip("/")
        self._verifier = UpstreamVerifier(client, model_name, root.removesuffix("/v1"))

    @classmethod
    async def connect(cls, settings: CloudSettings) -> OpenAITeacher:
        headers = {}
        if settings.upstream_api_key is not None:
            headers["Authorization"] = f"Bearer {settings.upstream_api_key.get_secret_value()}"
        timeout = httpx.Timeout(
            connect=settings.upstream_connect_timeout_s, read=settings.upstream_read_timeout_s,
            write=settings.upstream_read_timeout_s, pool=settings.upstream_connect_timeout_s,
        )
        client = httpx.AsyncClient(
            base_url=settings.upstream_url.rstrip("/") + "/", headers=headers, timeout=timeout
        )
        try:
            model = settings.upstream_model or await cls._first_model(client)
        except BaseException:
            await client.aclose()
            raise
        return cls(client, model)

    @staticmethod
    async def _first_model(client: httpx.AsyncClient) -> str:
        resp = await client.get("models")
        resp.raise_for_status()
        models = resp.json().get("data") or []
        if not models:
            raise RuntimeError("the upstream lists no models; set GKT_CLOUD_UPSTREAM_MODEL")
        return str(models[0]["id"])

    @property
    def stats(self) -> dict[str, Any]:
        return {"backend": "openai", "upstream_model": self.model_name}

    def _body(self, request: GuidanceRequest) -> tuple[str, dict[str, Any], TrailingWhitespace | None]:
        body: dict[str, Any] = {
            "model": self.model_name,
            "max_tokens": request.budget()[0],
            "temperature": request.temperature,
            "top_p": request.top_p,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if request.seed is not None:
            body["seed"] = request.seed
        if request.stop:
            body["stop"] = request.stop
        if request.messages is not None:
            messages = [m.model_dump() for m in request.messages]
            cut = None
            if request.continues:
                cut = TrailingWhitespace(messages[-1]["content"])
                messages[-1]["content"] = cut.prompt
                body["continue_final_message"], body["add_generation_prompt"] = True, False
            body["messages"] = messages
            return "chat/completions", body, cut
        body["prompt"] = request.prompt
        return "completions", body, None

    async def open(self, request: GuidanceRequest, on_result: OnResult | None = None) -> Generation:
        if request.draft is not None:  # vLLM's extensions (openai_verify.py)
            return await self._verifier.open(request, on_result)
        path, body, cut = self._body(request)
        t0 = perf_counter()
        with transport_errors("the teacher upstream did not answer in time", "the teacher upstream is unreachable"):
            resp = await self._client.send(self._client.build_request("POST", path, json=body), stream=True)
        if resp.status_code >= 400:
            try:
                raw = await resp.aread()
            finally:
                await resp.aclose()
            raise openai_status_error(resp.status_code, raw, resp.headers.get("retry-after"))
        word_end = WordEnd(request.max_tokens) if request.whole_words else None
        stream = self._stream(resp, t0, chat=request.messages is not None, cut=cut, word_end=word_end,
                              on_result=on_result)
        return Stream(stream).on_close(resp.aclose)  # the connection is released even if nobody reads it

    async def _stream(
        self, resp: httpx.Response, t0: float, *, chat: bool, cut: TrailingWhitespace | None,
        word_end: WordEnd | None, on_result: OnResult | None,
    ) -> AsyncGenerator[Item, None]:
        decoder = SSEDecoder()
        pieces = carried = 0
        usage: dict[str, Any] = {}
        finish = "length"
        t_first: float | None = None
        done = False
        reported = False

        def result(reason: str) -> GenerationResult:
            t_end = perf_counter()
            first = t_first or t_end
            return GenerationResult(
                finish_reason=reason,  # type: ignore[arg-type]
                prompt_tokens=int(usage.get("prompt_tokens") or 0),
                completion_tokens=int(usage.get("completion_tokens") or pieces),
                cached_prompt_tokens=cached_tokens(usage),
                prompt_s=first - t0,
                generation_s=t_end - first,
                engine_s=t_end - t0,  # wall time: an upper bound on this request's share of a batching upstream
            )

        try:
            with transport_errors("the teacher upstream stalled", "the teacher upstream connection broke"):
                async for chunk in resp.aiter_raw():
                    for data in decoder.feed(chunk):
                        if data.strip() == "[DONE]":
                            done = True
                            break
                        obj = _json(data)
                        if "error" in obj:
                            raise GKTError(ErrorCode.upstream_error, "the teacher upstream failed mid-stream")
                        usage = obj.get("usage") or usage
                        for choice in obj.get("choices") or []:
                            text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                            if text:
                                t_first = t_first or perf_counter()
                                pieces += 1
                                text = cut.feed(text) if cut is not None else text
                                if word_end is not None and word_end.stop_before(text):
                                    done, finish = True, "length"  # opens the next word: not sent
                                    break
                                if text:
                                    yield Piece(text, 1 + carried)
                                    carried = 0
                                else:
                                    carried += 1  # all cut: counted with the next piece
                            if reason := choice.get("finish_reason"):
                                finish = "length" if reason == "length" else "stop"
                        if done:
                            break
                    if done:
                        break
            if not done:
                raise GKTError(ErrorCode.protocol_error, "the teacher upstream stream ended without [DONE]")
            final = result(finish)
            reported = True
            if on_result is not None:
                on_result(final)
            yield final
        finally:
            if not reported and on_result is not None:
                on_result(result("cancelled"))  # stopped early or failed: charge what was streamed

    async def aclose(self) -> None:
        await self._client.aclose()


def _json(data: str) -> dict[str, Any]:
    try:
        obj = json.loads(data)
    except json.JSONDecodeError as exc:
        raise GKTError(ErrorCode.protocol_error, "the teacher upstream sent a malformed event") from exc
    if not isinstance(obj, dict):
        raise GKTError(ErrorCode.protocol_error, "the teacher upstream sent a malformed event")
    return obj


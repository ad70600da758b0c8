"""A teacher behind any OpenAI-compatible server: `vllm serve` in production, or a hosted API.

Chat requests go to ``/chat/completions`` (the upstream renders its own template), raw prompts to
``/completions``. Streams ask for ``stream_options.include_usage`` so token counts come from the upstream's
own tokenizer; servers that do not send usage get the count of streamed pieces instead.

``response_format`` travels as it is (``upstream_structured``): vLLM writes under it with its structured
outputs (xgrammar), so the guidance is a valid start of the document; the edge still checks the guidance
against its own grammar, since another grammar engine may spell whitespace differently. For llama.cpp's
servers (which know only ``json_object``) the GBNF grammar itself travels in their ``grammar`` field.

Log-probabilities (``top_logprobs``) use vLLM's ``logprobs`` with its ``return_tokens_as_token_ids`` extension,
so tokens arrive as ``token_id:N`` and keep their ids; an upstream that names tokens only by text (llama.cpp's
server) gives an answer without log-probabilities rather than ids that could be wrong.

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
from shared.generation import GenerationResult, Piece, TokenChoice, TrailingWhitespace
from shared.protocol import GuidanceRequest, SSEDecoder
from shared.tokenize import DetokenizeRequest, TokenizeRequest
from shared.upstream import cached_tokens, openai_status_error, transport_errors
from shared.words import WordEnd


class OpenAITeacher:
    """Streams guidance from an OpenAI-compatible upstream over one pooled httpx client."""

    def __init__(self, client: httpx.AsyncClient, model_name: str, structured: str = "response_format") -> None:
        self._client = client
        self.model_name = model_name
        self._structured = structured
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
        return cls(client, model, settings.upstream_structured)

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
        if request.grammar is not None:
            if request.continues:
                # The upstream's grammar starts at the generated text; it cannot resume a document midway.
                raise GKTError(ErrorCode.invalid_request, "continuing a response_format document is not "
                               "possible through this cloud's upstream", param="response_format")
            assert request.response_format is not None
            if self._structured == "grammar":  # llama.cpp's servers: the very grammar the edge will continue
                body["grammar"] = request.grammar
            else:  # vLLM's structured outputs honour the OpenAI field on both routes
                body["response_format"] = request.response_format.model_dump(by_alias=True)
        if request.top_logprobs is not None:
            body["return_tokens_as_token_ids"] = True
            if request.messages is not None:
                body["logprobs"], body["top_logprobs"] = True, request.top_logprobs
            else:
                body["logprobs"] = request.top_logprobs
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
                              on_result=on_result, logprobs=request.top_logprobs is not None)
        return Stream(stream).on_close(resp.aclose)  # the connection is released even if nobody reads it

    async def _stream(
        self, resp: httpx.Response, t0: float, *, chat: bool, cut: TrailingWhitespace | None,
        word_end: WordEnd | None, on_result: OnResult | None, logprobs: bool = False,
    ) -> AsyncGenerator[Item, None]:
        decoder = SSEDecoder()
        pieces = carried = 0
        carried_choices: list[TokenChoice] | None = []
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
                            if logprobs and carried_choices is not None:
                                got = token_choices(choice.get("logprobs"), chat=chat)
                                carried_choices = None if got is None else carried_choices + got
                            if text:
                                t_first = t_first or perf_counter()
                                pieces += 1
                                text = cut.feed(text) if cut is not None else text
                                if word_end is not None and word_end.stop_before(text):
                                    done, finish = True, "length"  # opens the next word: not sent
                                    break
                                if text:
                                    yield Piece(text, 1 + carried, choices=carried_choices if logprobs else None)
                                    carried = 0
                                    if carried_choices is not None:
                                        carried_choices = []
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

    async def tokenize(self, request: TokenizeRequest) -> dict[str, Any]:
        """vLLM's own ``/tokenize`` (the teacher's tokenizer is the upstream's)."""
        return await self._verifier.root_call("tokenize", request.model_dump(exclude_none=True, exclude={"model"}))

    async def detokenize(self, request: DetokenizeRequest) -> dict[str, Any]:
        return await self._verifier.root_call("detokenize", {"tokens": request.tokens})

    async def tokenizer_info(self) -> dict[str, Any]:
        raise GKTError(ErrorCode.not_found, "this cloud's teacher upstream does not describe its vocabulary")

    async def aclose(self) -> None:
        await self._client.aclose()


def _token_id(token: Any) -> int | None:
    if isinstance(token, str) and token.startswith("token_id:"):
        try:
            return int(token.removeprefix("token_id:"))
        except ValueError:
            return None
    return None


def token_choices(logprobs: Any, *, chat: bool) -> list[TokenChoice] | None:
    """The tokens of one streamed chunk from its OpenAI ``logprobs`` object (chat: ``content`` entries;
    completions: parallel ``tokens`` / ``token_logprobs`` / ``top_logprobs`` lists), or None when any token is
    not named by id (``token_id:N``) or the object is missing: such an answer carries no log-probabilities."""
    if not isinstance(logprobs, dict):
        return None
    out: list[TokenChoice] = []
    try:
        if chat:
            for entry in logprobs.get("content") or []:
                alts = [(_token_id(a["token"]), float(a["logprob"])) for a in entry.get("top_logprobs") or []]
                out.append(_choice(_token_id(entry["token"]), float(entry["logprob"]), alts))
        else:
            tops = logprobs.get("top_logprobs") or [None] * len(logprobs.get("tokens") or [])
            for tok, lp, top in zip(logprobs["tokens"], logprobs["token_logprobs"], tops, strict=True):
                alts = [(_token_id(t), float(v)) for t, v in (top or {}).items()]
                out.append(_choice(_token_id(tok), float(lp), alts))
    except (KeyError, TypeError, ValueError, _NoId):
        return None
    return out


class _NoId(Exception):
    """A token named by its text only."""


def _choice(tok: int | None, logprob: float, alts: list[tuple[int | None, float]]) -> TokenChoice:
    if tok is None or any(i is None for i, _ in alts):
        raise _NoId
    top = sorted(((int(i), v) for i, v in alts if i is not None), key=lambda a: -a[1])
    return TokenChoice(tok, logprob, top)


def _json(data: str) -> dict[str, Any]:
    try:
        obj = json.loads(data)
    except json.JSONDecodeError as exc:
        raise GKTError(ErrorCode.protocol_error, "the teacher upstream sent a malformed event") from exc
    if not isinstance(obj, dict):
        raise GKTError(ErrorCode.protocol_error, "the teacher upstream sent a malformed event")
    return obj


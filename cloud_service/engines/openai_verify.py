"""Draft verification on an OpenAI-compatible upstream that is vLLM: its ``/tokenize`` and the
``prompt_logprobs`` extension of ``/v1/completions``.

The prompt (for chat: the upstream's own template, then the answer so far as plain text) and the draft are
tokenized by the upstream separately, as on the llama.cpp backend, so the accepted tokens' text is a prefix of
the draft. One completion over prompt + draft with ``prompt_logprobs=1`` gives, at every draft position, the
rank of the draft's token under the teacher: rank 1 is the teacher's own greedy choice. All kept: the same
request's completion is the teacher's text after the draft. Cut at the first token not ranked 1: a second
request writes the teacher's tokens after the kept part (vLLM's prefix cache makes its prompt cheap), so stop
sequences, the end of the answer and the token budget behave exactly as in plain guidance.

An upstream without these (a hosted API, ``llama_cpp.server``) answers 404 or 400; the client then gets a
400 ``invalid_request`` on ``draft`` and the edge's student goes on alone.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from time import perf_counter
from typing import Any

import httpx

from cloud_service.engine import Generation, Item, OnResult
from shared.errors import ErrorCode, GKTError
from shared.generation import GenerationResult, Piece
from shared.protocol import GuidanceRequest
from shared.upstream import cached_tokens, json_object, openai_status_error, transport_errors

_CANNOT = "this cloud's teacher upstream cannot verify drafts (it needs vLLM's /tokenize and prompt_logprobs)"
_ROOT_ATTEMPTS = 3
_PASSED_OVER = (ErrorCode.upstream_error, ErrorCode.upstream_unavailable)  # a replica gone, not a bad request


class UpstreamVerifier:
    """Verifies drafts against a vLLM upstream, as one generation (a piece, then the result)."""

    def __init__(self, client: httpx.AsyncClient, model: str, root: str) -> None:
        self._client = client
        self._model = model
        self._root = root.rstrip("/")  # the server root: /tokenize is not under /v1

    async def open(self, request: GuidanceRequest, on_result: OnResult | None = None) -> Generation:
        """The whole verdict is reached here (a few short non-streamed requests), so a failure is an HTTP
        status, not a broken stream; the generation then replays the teacher's text and the result."""
        assert request.draft is not None
        t0 = perf_counter()
        prompt = await self._prompt_tokens(request)
        draft = await self._tokenize({"prompt": request.draft, "add_special_tokens": False})
        sampling = self._sampling(request)
        answer = await self._send("completions", sampling | {"prompt": prompt + draft, "prompt_logprobs": 1})
        read_cached = cached_tokens(answer.get("usage") or {})  # the billed read: prompt + draft, once
        kept, kept_text = await self._kept(request.draft, prompt, draft, _choice(answer))
        if kept < len(draft):  # the teacher writes from the kept part on
            answer = await self._send("completions", sampling | {"prompt": prompt + draft[:kept]})
        choice = _choice(answer)
        text = str(choice.get("text") or "")
        completion = int((answer.get("usage") or {}).get("completion_tokens") or (1 if text else 0))
        result = GenerationResult(
            finish_reason="length" if choice.get("finish_reason") == "length" else "stop",
            prompt_tokens=len(prompt), completion_tokens=completion, prompt_s=perf_counter() - t0,
            engine_s=perf_counter() - t0,  # wall time, as for plain guidance on this backend
            draft_tokens=len(draft), draft_accepted_tokens=kept, draft_accepted_text=kept_text,
            cached_prompt_tokens=min(read_cached, len(prompt) + len(draft)),
        )
        if on_result is not None:
            on_result(result)
        return _replay(Piece(text, completion) if text else None, result)

    async def _kept(self, text: str, prompt: list[int], draft: list[int], choice: dict[str, Any]) -> tuple[int, str]:
        """Draft tokens the teacher ranks first, in order up to the first it does not, and their text."""
        ranks = choice.get("prompt_logprobs")
        if not isinstance(ranks, list) or len(ranks) != len(prompt) + len(draft):
            raise GKTError(ErrorCode.invalid_request, _CANNOT, param="draft")
        kept, pieces = 0, []
        for i, tok in enumerate(draft):
            info = (ranks[len(prompt) + i] or {}).get(str(tok)) or {}
            if info.get("rank") != 1:
                break
            kept += 1
            pieces.append(info.get("decoded_token") or "")
        kept_text = "".join(pieces)
        if not text.startswith(kept_text):  # a character split across tokens decodes as U+FFFD piecewise
            kept_text = str((await self._post_root("detokenize", {"tokens": draft[:kept]})).get("prompt") or "")
            if not text.startswith(kept_text):
                raise GKTError(ErrorCode.upstream_error, "the teacher upstream decoded the draft differently")
        return kept, kept_text

    async def _prompt_tokens(self, request: GuidanceRequest) -> list[int]:
        if request.messages is None:
            return await self._tokenize({"prompt": request.prompt or "", "add_special_tokens": True})
        messages = [m.model_dump() for m in request.messages]
        if not request.continues:
            return await self._tokenize({"messages": messages, "add_generation_prompt": True})
        # The earlier turns through the upstream's template, the answer so far as plain text after them.
        head = await self._tokenize({"messages": messages[:-1], "add_generation_prompt": True})
        return head + await self._tokenize({"prompt": messages[-1]["content"], "add_special_tokens": False})

    async def _tokenize(self, body: dict[str, Any]) -> list[int]:
        tokens = (await self._post_root("tokenize", body)).get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            raise GKTError(ErrorCode.invalid_request, _CANNOT, param="draft")
        return tokens

    def _sampling(self, request: GuidanceRequest) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self._model, "max_tokens": request.max_tokens, "stream": False,
                                "temperature": request.temperature, "top_p": request.top_p}
        if request.seed is not None:
            body["seed"] = request.seed
        if request.stop:
            body["stop"] = request.stop
        return body

    async def _post_root(self, path: str, body: dict[str, Any], missing: GKTError | None = None) -> dict[str, Any]:
        # vLLM's router (vllm-router) retries /v1 requests on another replica when one fails, but forwards
        # /tokenize and /detokenize to one replica and no further: a replica that just died answers 502 there
        # until the router's health check drops it (seconds). These calls are idempotent and cheap, and the
        # router's next pick is another replica, so they are tried again (docs/VLLM.md).
        for attempt in range(1, _ROOT_ATTEMPTS + 1):
            try:
                return await self._send(f"{self._root}/{path}", {"model": self._model, **body}, missing)
            except GKTError as err:
                if attempt == _ROOT_ATTEMPTS or err.code not in _PASSED_OVER:
                    raise
        raise AssertionError("unreachable")

    async def root_call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """A client's call to the upstream's ``/tokenize`` or ``/detokenize`` (not for a draft)."""
        return await self._post_root(path, body, GKTError(ErrorCode.not_found,
                                                          f"the teacher upstream does not serve /{path}"))

    async def _send(self, url: str, body: dict[str, Any], missing: GKTError | None = None) -> dict[str, Any]:
        with transport_errors("the teacher upstream did not answer in time", "the teacher upstream is unreachable"):
            resp = await self._client.post(url, json=body)
        if resp.status_code in (404, 405, 501):
            raise missing or GKTError(ErrorCode.invalid_request, _CANNOT, param="draft")
        if resp.status_code >= 400:
            raise openai_status_error(resp.status_code, resp.content, resp.headers.get("retry-after"))
        return json_object(resp, "the teacher upstream")


async def _replay(piece: Piece | None, result: GenerationResult) -> AsyncGenerator[Item, None]:
    if piece is not None:
        yield piece
    yield result


def _choice(answer: dict[str, Any]) -> dict[str, Any]:
    choices = answer.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise GKTError(ErrorCode.protocol_error, "the teacher upstream answered without a choice")
    return choices[0]

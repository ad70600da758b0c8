"""The embedded CPU teacher: llama.cpp in process, with continuous batching across requests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

from cloud_service.engine import Generation, Item, OnResult, Stream
from cloud_service.scheduler import BatchScheduler
from cloud_service.settings import CloudSettings
from shared.errors import ErrorCode, GKTError
from shared.generation import GenerationParams, Piece, TokenChoice, TrailingWhitespace
from shared.grammar import GrammarState
from shared.llama import LlamaText
from shared.models import resolve
from shared.protocol import GuidanceRequest
from shared.tokenize import DetokenizeRequest, LlamaVocabulary, TokenizeRequest, detokenize, tokenize

# The high-level Llama object only tokenizes and renders templates; its own context stays tiny. Decoding
# happens in the scheduler's multi-sequence context, which shares the same loaded weights.
_TEXT_CTX = 64


class LlamaTeacher:
    """Renders chat with the teacher's own template and decodes in a shared batch with other requests."""

    def __init__(self, llm: Any, text: LlamaText, scheduler: BatchScheduler, model_name: str) -> None:
        self._llm = llm
        self.text = text
        self.scheduler = scheduler
        self.model_name = model_name
        self.vocabulary = LlamaVocabulary(text)

    @classmethod
    async def load(cls, settings: CloudSettings) -> LlamaTeacher:
        """``from_settings`` off the event loop (loading a model takes seconds)."""
        return await asyncio.to_thread(cls.from_settings, settings)

    @classmethod
    def from_settings(cls, settings: CloudSettings) -> LlamaTeacher:
        """Load the model and start the batch scheduler's worker thread (blocking; ``close`` undoes it)."""
        import llama_cpp

        llm = llama_cpp.Llama(
            model_path=str(resolve(settings.model)), n_ctx=_TEXT_CTX, n_batch=_TEXT_CTX, n_ubatch=_TEXT_CTX,
            n_threads=1, n_threads_batch=1, verbose=False,
        )
        text = LlamaText(llm, settings.model, settings.n_ctx)
        scheduler = BatchScheduler(
            llm, slots=settings.max_in_flight, n_ctx=settings.n_ctx, n_batch=settings.n_batch,
            n_threads=settings.n_threads, flash_attn=settings.flash_attn, detokenize=text.piece, is_eog=text.is_eog,
            name=settings.model,
        )
        return cls(llm, text, scheduler, settings.model)

    @property
    def stats(self) -> dict[str, Any]:
        return self.scheduler.snapshot()

    async def open(self, request: GuidanceRequest, on_result: OnResult | None = None) -> Generation:
        cut: TrailingWhitespace | None = None
        if request.messages is not None:
            messages = [m.model_dump() for m in request.messages]
            if request.continues and request.draft is None:
                # Continue the final assistant message: the template opens a new assistant turn after
                # the earlier messages, and the partial answer follows as plain text.
                cut = TrailingWhitespace(messages[-1]["content"])
                prompt = self.text.render_chat(messages[:-1]) + cut.prompt
            elif request.continues:  # a draft follows the answer exactly as it stands
                prompt = self.text.render_chat(messages[:-1]) + messages[-1]["content"]
            else:
                prompt = self.text.render_chat(messages)
            tokens, param = self.text.tokenize(prompt, special=True), "messages"
        else:
            tokens, param = self.text.tokenize(request.prompt or "", special=False), "prompt"
        draft: list[int] = []
        if request.draft is not None:
            # Tokenized on its own: the seam between prompt and draft stays where the text says it is, so the
            # accepted tokens' text is a prefix of the draft.
            draft = self.text.tokenize(request.draft, special=False, add_bos=False)
            tokens += draft
        self.text.check_fits(len(tokens), request.max_tokens, param)
        budget, word_end_after = request.budget(self.text.n_ctx - len(tokens))
        params = GenerationParams(
            max_tokens=budget, temperature=request.temperature, top_p=request.top_p,
            seed=request.seed, stop=request.stop, word_end_after=word_end_after, grammar=self._grammar(request),
            top_logprobs=request.top_logprobs,
        )
        stream = Stream(self.scheduler.stream(tokens, params, on_result, draft=len(draft)))
        return stream if cut is None else stream.then(_cut_leading, cut)

    def close(self) -> None:
        """Stop the scheduler (queued and running sequences end with an engine error), then free the model."""
        self.scheduler.close()
        self._llm.close()

    async def tokenize(self, request: TokenizeRequest) -> dict[str, Any]:
        return tokenize(self.vocabulary, request)  # reads only the vocabulary: safe beside the decoding thread

    async def detokenize(self, request: DetokenizeRequest) -> dict[str, Any]:
        return detokenize(self.vocabulary, request)

    async def tokenizer_info(self) -> dict[str, Any]:
        return await asyncio.to_thread(self.vocabulary.info)  # the fingerprint takes about 1 s the first time

    def _grammar(self, request: GuidanceRequest) -> GrammarState | None:
        """The response format's grammar, advanced over the start of the answer a continued message holds."""
        if request.grammar is None:
            return None
        state = GrammarState(self._llm, request.grammar)
        if request.continues:
            assert request.messages is not None
            start = request.messages[-1].content
            if (n := state.advance(start)) < len(start):
                raise GKTError(ErrorCode.invalid_request, f"the final assistant message is not the start of a "
                               f"document in the response_format (it stops being one at character {n})",
                               param="messages")
        return state

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)


async def _cut_leading(stream: Generation, cut: TrailingWhitespace) -> AsyncGenerator[Item, None]:
    carried = 0  # tokens whose text was all cut: counted with the next piece
    carried_choices: list[TokenChoice] = []
    async for item in stream:
        if isinstance(item, Piece):
            text = cut.feed(item.text)
            if not text:
                carried += item.tokens
                carried_choices += item.choices or []
                continue
            choices = None if item.choices is None else carried_choices + item.choices
            item = Piece(text, item.tokens + carried, choices=choices)
            carried, carried_choices = 0, []
        yield item

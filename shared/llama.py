"""What the edge's student and the cloud's batched teacher both need from llama-cpp-python.

* ``LlamaText``: the prompt side of a loaded model (chat template, tokenizer, context check, token pieces);
* ``WorkerStream``: the one bridge from a worker thread that decodes to the asyncio task that reads;
* every touch of llama-cpp-python's private attributes (the functions at the end), so a library upgrade that
  renames one breaks here and nowhere else.

The engines themselves live with their only user: the student in ``edge_agent/student.py``, the teacher's
continuous batching in ``cloud_service/scheduler.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from typing import Any

from shared.errors import ErrorCode, GKTError
from shared.generation import GenerationResult, Piece, context_error

Item = Piece | GenerationResult | BaseException


class WorkerStream:
    """Pieces and one final result that a worker thread emits, read by the asyncio task that created it.

    ``emit`` runs in the worker thread. A loop that has closed (shutdown, a test's finished loop) has nobody
    left to read: the item is dropped rather than raised into the worker, which must go on to release its
    context and lock. An exception the worker emits ends the stream as a ``GKTError`` (its own, or
    ``engine_error`` for anything else, never the internal text).
    """

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Item] = asyncio.Queue()

    def emit(self, item: Item) -> None:
        self.call(self._queue.put_nowait, item)

    def call(self, fn: Callable[..., object], *args: object) -> None:
        """Run ``fn(*args)`` on the reader's loop (from any thread); dropped when that loop has closed."""
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(fn, *args)

    async def get(self) -> Piece | GenerationResult:
        """The next item the worker emitted (the ``GenerationResult`` is its last)."""
        item = await self._queue.get()
        if isinstance(item, BaseException):
            if isinstance(item, GKTError):
                raise item
            raise GKTError(ErrorCode.engine_error, "the model failed while generating") from item
        return item


class LlamaText:
    """The prompt side of a loaded model: chat template, tokenizer, token counts, context check.

    Shared by the edge's ``LlamaEngine`` (one sequence at a time) and the cloud's batched teacher; tokenizing
    only reads the vocabulary, so it is safe while another thread decodes.
    """

    def __init__(self, llm: Any, name: str, n_ctx: int) -> None:
        import llama_cpp

        self._llama_cpp = llama_cpp
        self.name = name
        self.n_ctx = n_ctx
        self._bind(llm)
        self._bos = llm.token_bos()
        self._formatter = self._make_formatter()

    def _bind(self, llm: Any) -> None:
        """Tokenize and detokenize with ``llm`` from now on (the same base model: another adapter may differ)."""
        self._llm = llm
        self._vocab = llm._model.vocab

    def _make_formatter(self) -> Any:
        template = self._llm.metadata.get("tokenizer.chat_template")
        if not template:
            return None
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        def text(tok: int) -> str:
            return self._llm.detokenize([tok], special=True).decode("utf-8", "ignore") if tok >= 0 else ""

        return Jinja2ChatFormatter(
            template=template, eos_token=text(self._llm.token_eos()), bos_token=text(self._bos)
        )

    @property
    def has_chat_template(self) -> bool:
        return self._formatter is not None

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """The model's own chat template with the assistant turn open."""
        if self._formatter is None:
            # A base model: a plain transcript is the most natural text it can continue.
            turns = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages)
            return f"{turns}Assistant:"
        return self._formatter(messages=messages).prompt

    def tokenize(self, text: str, *, special: bool, add_bos: bool = True) -> list[int]:
        """Tokens of ``text``; ``special`` parses template markers such as ``<|im_start|>``."""
        tokens = self._llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)
        if len(tokens) >= 2 and tokens[0] == tokens[1] == self._bos:
            tokens = tokens[1:]  # the template wrote BOS and the tokenizer added another
        return tokens

    def count(self, text: str) -> int:
        """How many tokens ``text`` is, as a continuation (no BOS, no special markers)."""
        return len(self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)) if text else 0

    def check_fits(self, prompt_tokens: int, max_tokens: int, param: str) -> None:
        """The prompt is not empty and prompt + ``max_tokens`` fits the context (V4)."""
        if prompt_tokens == 0:
            raise GKTError(ErrorCode.invalid_request, f"{param} is empty (this model has no start token to "
                           "continue from)", param=param)
        if prompt_tokens + max_tokens > self.n_ctx:
            raise context_error(self.n_ctx, prompt_tokens, max_tokens, param)

    def is_eog(self, token: int) -> bool:
        return bool(self._llama_cpp.llama_vocab_is_eog(self._vocab, token))

    def piece(self, token: int) -> bytes:
        """The bytes of one generated token (may be part of a UTF-8 character)."""
        return self._llm.detokenize([token])


# --- llama-cpp-python's private attributes: here and nowhere else -------------------------------------------


def model_pointer(llm: Any) -> Any:
    """The ``llama_model*`` behind a high-level ``Llama``, for a second context over the same weights."""
    return llm._model.model


def cached_tokens(llm: Any) -> Sequence[int]:
    """The tokens whose KV entries the ``Llama``'s context holds, in order."""
    return llm._input_ids[: llm.n_tokens]


def decode_rows(llm: Any, chunk: list[int], n_past: int, size: int, *, all_logits: bool = False) -> None:
    """Decode ``chunk`` at ``n_past`` as a batch of ``size`` rows (``size - len(chunk)`` filler rows repeat the
    last token at later positions, where causal attention hides them from the real rows; their KV cells are
    dropped afterwards), with logits for the last real row only (``all_logits``: for every real row, read with
    ``row_logits``), and record it as the ``Llama``'s state."""
    n = len(chunk)
    llm._ctx.kv_cache_seq_rm(-1, n_past, -1)
    b = llm._batch.batch
    b.n_tokens = size
    for i in range(size):
        b.token[i] = chunk[min(i, n - 1)]
        b.pos[i] = n_past + i
        b.n_seq_id[i] = 1
        b.seq_id[i][0] = 0
        b.logits[i] = i < n if all_logits else i == n - 1
    llm._ctx.decode(llm._batch)
    llm._ctx.kv_cache_seq_rm(-1, n_past + n, -1)
    llm.input_ids[n_past : n_past + n] = chunk
    llm.n_tokens = n_past + n
    llm._requires_eval = False


def row_logits(llm: Any, i: int) -> Any:
    """A pointer to the logits of row ``i`` of the last batch ``decode_rows`` decoded with ``all_logits``."""
    return llm._ctx.get_logits_ith(i)


def last_logits(llm: Any) -> Any:
    """A pointer to the logits row the sampler used last (the context's last output row)."""
    return llm._ctx.get_logits_ith(-1)


def clear_cache(llm: Any) -> None:
    """Empty the ``Llama``'s KV cache and forget what it held."""
    llm.reset()
    llm._ctx.kv_cache_clear()
    llm.n_tokens = 0

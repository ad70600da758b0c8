"""``/tokenize`` and ``/detokenize`` as vLLM and llama-server serve them, over one model's vocabulary.

vLLM: ``{"prompt", "add_special_tokens"=true}`` or ``{"messages", "add_generation_prompt"=true,
"continue_final_message"=false, "add_special_tokens"=false}`` -> ``{"count", "max_model_len", "tokens"}``
(plus ``token_strs`` with ``return_token_strs``); ``{"tokens"}`` -> ``{"prompt"}``.
``GET /tokenizer_info`` (vLLM's, which lm-eval's remote tokenizer reads): special tokens, chat template, sizes.
llama-server: ``{"content", "add_special"=false, "with_pieces"=false}`` -> ``{"tokens"}`` (ids, or
``{"id", "piece"}`` objects with pieces); ``{"tokens"}`` -> ``{"content"}``.

Both request shapes are accepted on the same routes; a ``content`` request gets llama-server's answer, the
others vLLM's, and ``/detokenize`` answers with both keys (clients read their own). Special markers in the
text (``<|im_start|>``) are parsed as special tokens, as both servers do. Detokenizing renders special tokens
as empty text (llama.cpp's plain detokenization).
"""

from __future__ import annotations

import hashlib
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field, model_validator

from shared.errors import ErrorCode, GKTError, InvalidBody
from shared.protocol import ChatMessage, check_text

MAX_DETOKENIZE = 131_072


class Vocabulary(Protocol):
    """What tokenizing needs from a model: its tokenizer, chat template, context and vocabulary sizes."""

    n_ctx: int

    @property
    def n_vocab(self) -> int: ...

    def tokenize(self, text: str, *, special: bool, add_bos: bool = True) -> list[int]: ...

    def render_chat(self, messages: list[dict[str, str]]) -> str: ...

    def piece(self, token: int) -> bytes: ...

    def info(self) -> dict[str, Any]:
        """vLLM's ``/tokenizer_info``: special tokens, chat template, sizes."""
        ...


class TokenizeRequest(BaseModel):
    """``POST /tokenize``: exactly one of ``prompt`` (vLLM), ``content`` (llama-server) or ``messages``."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, description="Ignored: the served model's tokenizer.")
    prompt: str | None = None
    content: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1, max_length=256)
    add_special_tokens: bool | None = Field(None, description="Add BOS (default: true for prompt, false for "
                                            "messages, whose template writes its own).")
    add_special: bool = Field(False, description="llama-server's name for add_special_tokens (content).")
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    return_token_strs: bool = False
    with_pieces: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        given = [name for name in ("prompt", "content", "messages") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of 'prompt', 'content' or 'messages'")
        for name in ("prompt", "content"):
            if (text := getattr(self, name)) is not None:
                check_text(text, name)
        if self.messages is None:
            return self
        if self.continue_final_message:  # as vLLM: the client turns add_generation_prompt off
            if self.add_generation_prompt:
                raise ValueError("continue_final_message and add_generation_prompt cannot both be true")
            if self.messages[-1].role != "assistant":
                raise ValueError("continue_final_message needs a final assistant message")
        elif not self.add_generation_prompt:
            raise InvalidBody("add_generation_prompt false is not supported (the chat "
                           "template is rendered with the assistant turn open)", param="add_generation_prompt")
        return self


class DetokenizeRequest(BaseModel):
    """``POST /detokenize``: token ids back to text."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, description="Ignored: the served model's tokenizer.")
    tokens: list[int] = Field(max_length=MAX_DETOKENIZE)


def tokenize(vocab: Vocabulary, req: TokenizeRequest) -> dict[str, Any]:
    """The tokens of the request's text in ``vocab``, in the shape of the server the request came from."""
    if req.messages is not None:
        messages = [m.model_dump() for m in req.messages]
        if req.continue_final_message:
            text = vocab.render_chat(messages[:-1]) + messages[-1]["content"]
        else:
            text = vocab.render_chat(messages)
        tokens = vocab.tokenize(text, special=True, add_bos=bool(req.add_special_tokens))
    elif req.content is not None:
        tokens = vocab.tokenize(req.content, special=True, add_bos=req.add_special)
        if not req.with_pieces:
            return {"tokens": tokens}
        return {"tokens": [{"id": t, "piece": _text(vocab.piece(t))} for t in tokens]}
    else:
        add_bos = True if req.add_special_tokens is None else req.add_special_tokens
        tokens = vocab.tokenize(req.prompt or "", special=True, add_bos=add_bos)
    out: dict[str, Any] = {"count": len(tokens), "max_model_len": vocab.n_ctx, "tokens": tokens}
    if req.return_token_strs:
        out["token_strs"] = [_text(vocab.piece(t)) for t in tokens]
    return out


def detokenize(vocab: Vocabulary, req: DetokenizeRequest) -> dict[str, Any]:
    """The text of ``req.tokens``; ids outside the vocabulary are a 400 naming the first."""
    n_vocab = vocab.n_vocab
    for i, tok in enumerate(req.tokens):
        if not 0 <= tok < n_vocab:  # llama.cpp aborts the process on an id outside its vocabulary
            raise GKTError(ErrorCode.invalid_request, f"token {tok} is not in this model's vocabulary "
                           f"(0..{n_vocab - 1})", param=f"tokens.{i}")
    text = _text(b"".join(vocab.piece(t) for t in req.tokens))
    return {"prompt": text, "content": text}


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace")


def vocabulary_sha256(text: Any) -> str:
    """``LlamaVocabulary.sha256`` of a ``LlamaText``, computed once and kept on it (Qwen's 152k tokens: about
    1 s measured here; a model swapped in for another adapter has the same base, so the same vocabulary)."""
    if (known := getattr(text, "vocab_sha256", None)) is None:
        digest = hashlib.sha256()
        for tok in range(int(text._llm.n_vocab())):
            piece = bytes(text.piece(tok))
            digest.update(len(piece).to_bytes(2, "little") + piece)
        known = text.vocab_sha256 = digest.hexdigest()
    return str(known)


class LlamaVocabulary:
    """A ``Vocabulary`` over a loaded llama.cpp model's text side (``shared.llama.LlamaText``)."""

    def __init__(self, text: Any) -> None:
        self._text = text
        self.n_ctx = text.n_ctx
        # LlamaText keeps its Llama object private; the vocabulary size and the special tokens are read here,
        # the only place that needs them, until the model's session exposes them.
        self._n_vocab = int(text._llm.n_vocab())

    @property
    def n_vocab(self) -> int:
        return self._n_vocab

    def tokenize(self, text: str, *, special: bool, add_bos: bool = True) -> list[int]:
        return list(self._text.tokenize(text, special=special, add_bos=add_bos))

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        return str(self._text.render_chat(messages))

    def piece(self, token: int) -> bytes:
        return bytes(self._text.piece(token))

    def info(self) -> dict[str, Any]:
        llm = self._text._llm

        def special(tok: int) -> str | None:
            return llm.detokenize([tok], special=True).decode("utf-8", "replace") if tok >= 0 else None

        return {"tokenizer_class": "llama.cpp", "model_max_length": self.n_ctx, "vocab_size": self._n_vocab,
                "bos_token": special(llm.token_bos()), "eos_token": special(llm.token_eos()),
                "chat_template": llm.metadata.get("tokenizer.chat_template"),
                "vocab_sha256": self.sha256()}

    def sha256(self) -> str:
        """A fingerprint of the vocabulary: every token's bytes in id order (gkt's extension of
        ``/tokenizer_info``). Two models with the same one name a token id the same way, so one can name the
        other's tokens (the edge names the teacher's log-probabilities with the student's vocabulary)."""
        return vocabulary_sha256(self._text)

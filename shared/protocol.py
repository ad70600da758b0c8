"""The wire protocol between edge and cloud: guidance requests and the frames of a guidance stream.

A guidance stream is server-sent events. Each event's ``data`` is one JSON frame; frames carry a ``seq``
that starts at 0 and increases by one. Every stream ends with exactly one terminal frame (``done`` or
``error``); a client that reaches EOF without one raises ``IncompleteStreamError``.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator

from shared.cost import TeacherCost
from shared.errors import ErrorCode, GKTError
from shared.structured import ResponseFormat
from shared.words import WORD_ALLOWANCE

PROTOCOL_VERSION = "1"
PROTOCOL_HEADER = "X-GKT-Protocol"
MAX_STOP_SEQUENCES = 16
MAX_STOP_LENGTH = 256
MAX_DRAFT_CHARS = 8192
MAX_TOP_LOGPROBS = 20


def check_text(value: str, field: str) -> str:
    """Reject text that cannot travel as UTF-8 or that hides NUL bytes (V6)."""
    if "\x00" in value:
        raise ValueError(f"{field} must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{field} is not valid Unicode (lone surrogate)") from exc
    return value


def normalize_stop(value: str | list[str] | None) -> list[str]:
    """Stop sequences as a list; validated for count, emptiness and length (V5)."""
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else list(value)
    if len(stops) > MAX_STOP_SEQUENCES:
        raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed")
    for s in stops:
        if not s:
            raise ValueError("stop sequences must not be empty")
        if len(s) > MAX_STOP_LENGTH:
            raise ValueError(f"stop sequences must be at most {MAX_STOP_LENGTH} characters")
        check_text(s, "stop")
    return stops


class ChatMessage(BaseModel):
    """One chat message; the renderer (teacher or student) applies its own chat template."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str

    @field_validator("content")
    @classmethod
    def _content(cls, v: str) -> str:
        return check_text(v, "content")


class SamplingParams(BaseModel):
    """Sampling settings shared by teacher and student."""

    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 means greedy decoding.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    seed: int | None = Field(None, ge=0, le=2**32 - 1, description="Sampling seed (random when unset).")
    stop: list[str] = Field(default_factory=list, description="Stop sequences (not part of the output).")

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str]:
        return normalize_stop(v)


class GuidanceRequest(SamplingParams):
    """Ask the teacher for the first ``max_tokens`` tokens (k) of its answer.

    Exactly one of ``messages`` (rendered with the teacher's chat template, assistant turn open; a final
    assistant message is continued) or ``prompt`` (raw text, continued as is).
    """

    model_config = ConfigDict(extra="forbid")

    messages: list[ChatMessage] | None = Field(None, min_length=1, max_length=256)
    prompt: str | None = Field(None, description="Raw prompt, continued as is.")
    max_tokens: int = Field(40, ge=1, le=8192, description="k: how many teacher tokens to write.")
    whole_words: bool = Field(
        False,
        description="After k tokens, go on to the end of the word (at most shared.words.WORD_ALLOWANCE more "
        "tokens) so that every character sent is final guidance; the token that opens the next word is "
        "generated but not sent.",
    )
    stream: bool = Field(True, description="Server-sent events when true, one JSON result when false.")
    timeout_ms: int | None = Field(
        None, ge=1, le=3_600_000, description="The caller's remaining budget; the cloud stops at it (T4)."
    )
    draft: str | None = Field(
        None, min_length=1, max_length=MAX_DRAFT_CHARS,
        description="Text another model wrote to continue the prompt (or the final assistant message): the "
        "teacher keeps it up to the first token it would not have chosen itself (greedy) and writes up to "
        "max_tokens tokens of its own from there. The done frame says how much was kept (draft_accepted).",
    )

    response_format: ResponseFormat | None = Field(
        None, description="The answer is a document of this format (json_object, or json_schema with its "
        "schema): the teacher writes its tokens under the format's grammar, so that the guidance is a valid "
        "start of such a document (a final assistant message being continued is already part of it).",
    )
    top_logprobs: int | None = Field(
        None, ge=0, le=MAX_TOP_LOGPROBS,
        description="Return, for every token written, its id and log-probability in the teacher's vocabulary and "
        "the ids and log-probabilities of this many most likely tokens (a distillation's transfer set; the ids "
        "mean something only to a model with the teacher's tokenizer). Not with a draft; never cached.",
    )

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str | None) -> str | None:
        return None if v is None else check_text(v, "prompt")

    @field_validator("draft")
    @classmethod
    def _draft(cls, v: str | None) -> str | None:
        return None if v is None else check_text(v, "draft")

    @model_validator(mode="after")
    def _one_input(self) -> GuidanceRequest:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("give exactly one of 'messages' or 'prompt'")
        if self.draft is not None and self.grammar is not None:
            raise GKTError(ErrorCode.invalid_request, "a draft cannot be verified under a response_format yet",
                           param="draft")
        if self.top_logprobs is not None and self.draft is not None:
            raise ValueError("top_logprobs cannot be combined with a draft")
        return self

    @property
    def grammar(self) -> str | None:
        """The GBNF grammar the guidance is written under (None: free text)."""
        return None if self.response_format is None else self.response_format.grammar

    def budget(self, room: int | None = None) -> tuple[int, int | None]:
        """(max_tokens for the engine, word_end_after): k, plus the word allowance as far as ``room`` (the
        context left after the prompt) allows when whole words are asked for."""
        if not self.whole_words:
            return self.max_tokens, None
        extra = WORD_ALLOWANCE if room is None else max(0, min(WORD_ALLOWANCE, room - self.max_tokens))
        return self.max_tokens + extra, self.max_tokens

    @property
    def continues(self) -> bool:
        """A final assistant message is continued: its text is the start of the answer."""
        return self.messages is not None and self.messages[-1].role == "assistant"


class Usage(BaseModel):
    """Token counts in the teacher's own tokenizer."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    # Of the prompt (and draft) tokens, those the engine found in its KV cache: billed at the cached-input price
    # (a guidance-cache hit computed none: all of them, at no cost).
    cached_tokens: int = 0
    draft_tokens: int = 0  # a draft the teacher verified (read, not written)
    draft_accepted_tokens: int = 0


class Timings(BaseModel):
    """Where the teacher's time went, in seconds."""

    queue_s: float = 0.0
    prompt_s: float = 0.0
    generation_s: float = 0.0


FinishReason = Literal["length", "stop"]


class TokenLogprob(BaseModel):
    """One token the teacher wrote (``top_logprobs`` requests): its id and natural-log probability in the
    teacher's vocabulary, and the most likely tokens at that step as [id, log-probability], best first."""

    id: int
    logprob: float
    top: list[tuple[int, float]]


class TokenFrame(BaseModel):
    """Text of one or more teacher tokens (more than one only when a character spans tokens)."""

    type: Literal["token"] = "token"
    seq: int
    text: str
    tokens: int = 1
    logprobs: list[TokenLogprob] | None = Field(
        None, description="With top_logprobs: the tokens behind this text. The last frame before a stop may "
        "list tokens whose text the stop sequence removed.")


class HeartbeatFrame(BaseModel):
    """Sent while the stream is idle (queued or slow) so the client can tell a live stream from a dead one."""

    type: Literal["heartbeat"] = "heartbeat"
    seq: int


class GuidanceOutcome(BaseModel):
    """How one guidance answer ended and what it cost: the fields the ``done`` frame and the non-streamed
    ``GuidanceResult`` share."""

    finish_reason: FinishReason
    model: str
    usage: Usage
    timings: Timings
    cost: TeacherCost | None = None
    cached: bool = Field(False, description="Served from the guidance cache (no engine work, no teacher cost).")
    draft_accepted: int | None = Field(
        None, description="Characters of the request's draft the teacher kept (its text follows them); None "
        "without a draft.")


# Fields go on the wire in the order of the bases, last base first: a frame leads with type and seq, a result
# with its text.
class _DoneHead(BaseModel):
    type: Literal["done"] = "done"
    seq: int


class DoneFrame(GuidanceOutcome, _DoneHead):
    """The terminal frame of a successful stream."""


class ErrorInfo(BaseModel):
    """The error envelope's inner object."""

    message: str
    type: str
    code: str
    param: str | None = None


class ErrorFrame(BaseModel):
    """The terminal frame of a failed stream; text sent before it stays valid (partial)."""

    type: Literal["error"] = "error"
    seq: int
    error: ErrorInfo
    retryable: bool = False

    @classmethod
    def from_error(cls, seq: int, err: GKTError) -> ErrorFrame:
        info = ErrorInfo(message=err.message, type=err.code.type, code=err.code.name, param=err.param)
        return cls(seq=seq, error=info, retryable=err.code.retryable)


Frame = Annotated[TokenFrame | HeartbeatFrame | DoneFrame | ErrorFrame, Field(discriminator="type")]
_FRAME = TypeAdapter(Frame)


class _ResultHead(BaseModel):
    text: str
    logprobs: list[TokenLogprob] | None = Field(
        None, description="With top_logprobs: every token written, in order (see TokenFrame.logprobs); None when "
        "the engine could not name the tokens' ids.")


class GuidanceResult(GuidanceOutcome, _ResultHead):
    """The non-streamed form of one guidance answer."""


class BatchGuidanceRequest(BaseModel):
    """Many guidance requests in one call (the paper's batch generation of guidance)."""

    model_config = ConfigDict(extra="forbid")

    requests: list[GuidanceRequest] = Field(min_length=1, max_length=64)


class BatchItem(BaseModel):
    """One entry of a batch: a result or an error, never both."""

    index: int
    result: GuidanceResult | None = None
    error: ErrorInfo | None = None


class BatchGuidanceResponse(BaseModel):
    """Results in the order of the requests."""

    results: list[BatchItem]


# --- server-sent events -------------------------------------------------------------------------------


def encode_frame(frame: TokenFrame | HeartbeatFrame | DoneFrame | ErrorFrame) -> bytes:
    """One SSE event for a frame."""
    return f"event: {frame.type}\nid: {frame.seq}\ndata: {frame.model_dump_json()}\n\n".encode()


def parse_frame(data: str) -> TokenFrame | HeartbeatFrame | DoneFrame | ErrorFrame:
    """Parse one event's data; anything that is not a frame is a protocol error (F3)."""
    try:
        return _FRAME.validate_json(data)
    except ValidationError as exc:
        raise GKTError(ErrorCode.protocol_error, "malformed guidance frame") from exc


class SSEDecoder:
    """Incremental SSE parser: feed bytes split anywhere, get the data of each complete event.

    Lines end in LF, CRLF or CR. Splitting on line-end bytes before decoding is safe for UTF-8
    because those bytes never occur inside a multibyte character.
    """

    MAX_EVENT_BYTES = 1 << 20

    def __init__(self) -> None:
        self._buf = b""
        self._data: list[str] = []
        self._size = 0
        self._pending_cr = False

    def feed(self, chunk: bytes) -> list[str]:
        events: list[str] = []
        buf = self._buf + chunk
        start = 0
        i = 0
        n = len(buf)
        while i < n:
            b = buf[i]
            if self._pending_cr:
                self._pending_cr = False
                if b == 0x0A and i == start:  # the LF of a CRLF split across chunks
                    start = i = i + 1
                    continue
            if b == 0x0A or b == 0x0D:
                self._line(buf[start:i], events)
                if b == 0x0D:
                    if i + 1 < n and buf[i + 1] == 0x0A:
                        i += 1
                    elif i + 1 == n:
                        self._pending_cr = True
                start = i = i + 1
                continue
            i += 1
        self._buf = buf[start:]
        if len(self._buf) + self._size > self.MAX_EVENT_BYTES:
            raise GKTError(ErrorCode.protocol_error, "guidance event too large")
        return events

    def _line(self, raw: bytes, events: list[str]) -> None:
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise GKTError(ErrorCode.protocol_error, "guidance stream is not valid UTF-8") from exc
        if not line:
            if self._data:
                events.append("\n".join(self._data))
            self._data, self._size = [], 0
            return
        if line.startswith(":"):
            return
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
            self._size += len(value)

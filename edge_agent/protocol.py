"""The edge's OpenAI-compatible request models, with gkt's extension fields (the ``gkt`` object on every
response, and the events an answer is produced as, are in ``edge_agent/answer.py``).

Extension fields (top level of the request body; with the ``openai`` client pass them in ``extra_body``):

* ``mode``: ``gkt`` (default: the teacher writes the first k tokens, the student finishes), ``student``
  (the student alone) or ``teacher`` (the teacher writes the whole answer);
* ``guidance_tokens``: k, the number of teacher tokens in gkt mode;
* ``task``: ``gsm8k`` or ``csqa``: the last user message (or the prompt) is a question, turned into the
  task's few-shot prompt with its stop sequences; the answer is extracted into ``gkt.answer``;
* ``guidance_policy``: how much of the teacher the answer gets in gkt mode: ``fixed`` (default: k tokens),
  ``adaptive``, ``reguide`` or ``verify``, as a name or an object with the name and parameters
  (``edge_agent/policies.py``).

Fields of the OpenAI API that change what the answer means are never ignored: each is parsed and validated
(ranges, combinations), and those the edge does not honour yet are refused with a 400 naming the field
(``NOT_YET_HONOURED``: delete a field's entry when the edge implements it). Fields that do not change the
answer (``user``, ``metadata``, ``store``, ``service_tier``...) are accepted and ignored. Log-probabilities
(``logprobs``, ``top_logprobs``, ``echo``) and structured output (``response_format``) are honoured; the rules
that depend on the mode and policy are in ``edge_agent/plan.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from edge_agent.answer import Mode
from edge_agent.policies import GuidancePolicy, policy_from
from shared.errors import InvalidBody
from shared.protocol import ChatMessage, check_text, normalize_stop
from shared.structured import ResponseFormat
from shared.tasks import TASKS


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


def _set(v: Any) -> bool:
    return v is not None and v is not False and v != [] and v != {}


def _nonzero(v: Any) -> bool:
    return bool(v)


# Fields that change what the answer means and that the edge parses and validates but does not honour yet,
# with the test for "in effect" (``tool_choice: "none"`` or ``response_format: {"type": "text"}`` change
# nothing). A request that uses one gets a 400 naming it. Delete an entry when the edge implements the field.
NOT_YET_HONOURED: dict[str, Callable[[Any], bool]] = {
    "tools": _set,
    "tool_choice": lambda v: _set(v) and v != "none",
    "functions": _set,
    "function_call": lambda v: _set(v) and v != "none",
    "logit_bias": _set,
    "frequency_penalty": _nonzero,
    "presence_penalty": _nonzero,
    "suffix": _set,
    "best_of": lambda v: v is not None and v > 1,
    "audio": _set,
    "modalities": lambda v: _set(v) and v != ["text"],
    "web_search_options": lambda v: v is not None,  # {} turns web search on
    "prediction": _set,
}


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, description="Ignored: the edge serves its configured student.")
    max_tokens: int | None = Field(
        None, ge=0, le=131072, description="Answer length in student tokens (0 only with echo: the prompt alone)."
    )
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    stop: list[str] = Field(default_factory=list)
    n: int = Field(1, ge=1, le=1, description="Only one choice per request.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    mode: Mode | None = Field(None, description="gkt (default), student or teacher.")
    guidance_tokens: int | None = Field(None, ge=1, le=8192, description="k: teacher tokens in gkt mode.")
    task: str | None = Field(None, description=f"Few-shot task: one of {sorted(TASKS)}.")
    guidance_policy: GuidancePolicy | None = Field(
        None, description="gkt mode: fixed (default), adaptive, reguide or verify, by name or with parameters."
    )
    # OpenAI fields that change the answer; refused while in NOT_YET_HONOURED.
    response_format: ResponseFormat | None = Field(
        None, description="text, json_object, or json_schema (a JSON Schema the answer validates against)."
    )
    logit_bias: dict[str, float] | None = Field(None, description="Token id -> bias in [-100, 100].")
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    audio: dict[str, Any] | None = None
    modalities: list[str] | None = None
    web_search_options: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    ignore_eos: bool = Field(False, description="vLLM's extension: generate past the end of the answer, up to "
                             "max_tokens (student mode only: the teacher's end does not reach the edge as such).")

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for token, bias in (v or {}).items():
            if not token.isdigit():
                raise ValueError(f"keys must be token ids, got {token!r}")
            if not -100 <= bias <= 100:
                raise ValueError("biases must be between -100 and 100")
        return v

    def _combinations(self) -> None:
        """Rules between fields (checked before the refusals, so they stay when a refusal goes)."""
        if self.max_tokens == 0 and not getattr(self, "echo", False):
            raise InvalidBody("max_tokens must be at least 1 (0 only with echo)",
                           param="max_tokens")

    @model_validator(mode="after")
    def _honoured(self) -> _Common:
        self._combinations()
        for name, in_effect in NOT_YET_HONOURED.items():
            if name in type(self).model_fields and in_effect(getattr(self, name)):
                raise InvalidBody(f"'{name}' is not supported by this edge yet; the "
                               "request was not answered rather than answered without it", param=name)
        return self

    @field_validator("guidance_policy", mode="before")
    @classmethod
    def _policy(cls, v: Any) -> Any:
        return policy_from(v)

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str]:
        return normalize_stop(v)

    @field_validator("task")
    @classmethod
    def _task(cls, v: str | None) -> str | None:
        if v is not None and v not in TASKS:
            raise ValueError(f"unknown task {v!r}; known: {', '.join(sorted(TASKS))}")
        return v


class OpenAIMessage(BaseModel):
    """A chat message; content may be a string or a list of text parts."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]]

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, v: Any) -> Any:
        if isinstance(v, list):
            texts = []
            for part in v:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError("only text content parts are supported")
                texts.append(part["text"])
            v = "".join(texts)
        return check_text(v, "content") if isinstance(v, str) else v

    def to_chat(self) -> ChatMessage:
        return ChatMessage(role="system" if self.role == "developer" else self.role, content=str(self.content))


class ChatCompletionRequest(_Common):
    """``POST /v1/chat/completions``."""

    messages: list[OpenAIMessage] = Field(min_length=1, max_length=256)
    max_completion_tokens: int | None = Field(None, ge=1, le=131072)
    logprobs: bool | None = Field(None, description="Return each answer token's log-probability.")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="Alternatives per token (needs logprobs).")
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None

    def _combinations(self) -> None:
        super()._combinations()
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidBody("top_logprobs needs logprobs set to true",
                           param="top_logprobs")

    def chat_messages(self) -> list[ChatMessage]:
        return [m.to_chat() for m in self.messages]


class CompletionRequest(_Common):
    """``POST /v1/completions``."""

    prompt: str = Field(description="Raw prompt, continued as is.")
    logprobs: int | None = Field(None, ge=0, le=20, description="Log-probabilities of the top tokens, per token.")
    echo: bool = Field(False, description="Return the prompt before the answer (with logprobs: its own).")
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=20)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str) -> str:
        return check_text(v, "prompt")

"""OpenAI's log-probability objects for the edge's answers, from the student's token choices.

Chat: ``choices[].logprobs.content``, one entry per token (``token``, ``logprob``, ``bytes``, ``top_logprobs``).
Completions: ``choices[].logprobs`` as parallel lists (``tokens``, ``token_logprobs``, ``top_logprobs`` as
{token: logprob} with the chosen token included, as vLLM does, and ``text_offset``). Streamed, each chunk
carries the entries of its own text; whole, the response carries them all.

The numbers are the student's own (``shared/logprobs.py``: raw logits, before temperature and top-p). Text the
student did not choose has ``null`` log-probabilities and no alternatives, listed in the student's tokens: the
teacher's guidance in gkt mode (given, the student continued from it) and the first token of an echoed prompt
(nothing comes before it). A chunk's ``gkt.source`` says who wrote it. When a stop sequence ends the answer,
the last entries may be the tokens of the stop itself, whose text is cut (as the cloud's frames say too).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from edge_agent.answer import Delta, Echo
from shared.generation import TokenChoice


class Namer(Protocol):
    """What names the student's tokens (``shared.llama.LlamaText``)."""

    def piece(self, token: int) -> bytes: ...

    def tokenize(self, text: str, *, special: bool, add_bos: bool = True) -> list[int]: ...


@dataclass
class Entry:
    """One token of the response: its bytes, its log-probability (None: given, not chosen) and the most likely
    tokens at that step."""

    token: bytes
    logprob: float | None
    top: list[tuple[bytes, float]]


def _name(raw: bytes) -> str:
    # A token may hold part of a UTF-8 character: its text shows a replacement character, its bytes the truth.
    return raw.decode("utf-8", errors="replace")


def _entry(namer: Namer, choice: TokenChoice) -> Entry:
    return Entry(namer.piece(choice.id), choice.logprob, [(namer.piece(t), lp) for t, lp in choice.top])


def entries(namer: Namer, event: Delta | Echo) -> list[Entry]:
    """The entries behind one event's text (given tokens: the text in the student's tokens, no numbers)."""
    if isinstance(event, Echo):
        if event.choices is None:
            return [Entry(namer.piece(t), None, []) for t in event.tokens]
        return [Entry(namer.piece(t), None, []) if c is None else _entry(namer, c)
                for t, c in zip(event.tokens, event.choices, strict=True)]
    if event.choices is None:
        return [Entry(namer.piece(t), None, []) for t in namer.tokenize(event.text, special=False, add_bos=False)]
    return [_entry(namer, c) for c in event.choices]


def chat(items: list[Entry], top: int) -> dict[str, Any]:
    """``logprobs`` of a chat choice (or chunk)."""
    return {"content": [
        {"token": _name(e.token), "logprob": e.logprob, "bytes": list(e.token),
         "top_logprobs": [{"token": _name(t), "logprob": lp, "bytes": list(t)} for t, lp in e.top[:top]]}
        for e in items
    ], "refusal": None}


def completion(items: list[Entry], top: int, offset: int) -> dict[str, Any]:
    """``logprobs`` of a completion choice (or chunk) whose text starts at character ``offset`` of the whole."""
    tokens, logprobs, tops, offsets = [], [], [], []
    for e in items:
        name = _name(e.token)
        tokens.append(name)
        logprobs.append(e.logprob)
        if e.logprob is None:
            tops.append(None)
        else:
            alts = {_name(t): lp for t, lp in e.top[:top]}
            alts.setdefault(name, e.logprob)
            tops.append(alts)
        offsets.append(offset)
        offset += len(name)
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}

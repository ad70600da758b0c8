"""Wire protocol: frames round-trip, the SSE parser survives any byte split (F3), validation (V5, V6)."""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from shared.errors import ErrorCode, GKTError
from shared.generation import TrailingWhitespace
from shared.protocol import (
    DoneFrame,
    ErrorFrame,
    GuidanceRequest,
    HeartbeatFrame,
    SSEDecoder,
    Timings,
    TokenFrame,
    Usage,
    encode_frame,
    parse_frame,
)

FRAMES = [
    TokenFrame(seq=0, text="Hé 😀\nline"),
    HeartbeatFrame(seq=1),
    TokenFrame(seq=2, text="data: not a field\r\n"),
    DoneFrame(seq=3, finish_reason="length", model="m", usage=Usage(prompt_tokens=3, completion_tokens=2),
              timings=Timings(queue_s=0.1)),
]
WIRE = b"".join(encode_frame(f) for f in FRAMES)


def decode(chunks: list[bytes]) -> list:
    dec = SSEDecoder()
    return [parse_frame(d) for c in chunks for d in dec.feed(c)]


def test_round_trip() -> None:
    assert decode([WIRE]) == FRAMES


def test_one_byte_chunks() -> None:
    assert decode([WIRE[i : i + 1] for i in range(len(WIRE))]) == FRAMES


def test_crlf_and_cr_line_endings() -> None:
    for eol in (b"\r\n", b"\r"):
        wire = WIRE.replace(b"\n", eol)
        assert decode([wire[i : i + 1] for i in range(len(wire))]) == FRAMES


@given(st.lists(st.integers(min_value=0, max_value=len(WIRE)), max_size=30))
def test_any_split(cuts: list[int]) -> None:
    points = sorted(set(cuts))
    chunks = [WIRE[a:b] for a, b in zip([0, *points], [*points, len(WIRE)], strict=True)]
    assert decode(chunks) == FRAMES


def test_comments_and_unknown_fields_ignored() -> None:
    wire = b": keepalive\nretry: 10\n" + encode_frame(HeartbeatFrame(seq=0))
    assert decode([wire]) == [HeartbeatFrame(seq=0)]


@pytest.mark.parametrize("data", ["not json", '{"type": "nope", "seq": 1}', '{"type": "token"}', "[]"])
def test_garbage_is_a_protocol_error(data: str) -> None:
    with pytest.raises(GKTError) as exc:
        parse_frame(data)
    assert exc.value.code is ErrorCode.protocol_error


def test_invalid_utf8_is_a_protocol_error() -> None:
    with pytest.raises(GKTError):
        SSEDecoder().feed(b"data: \xff\xfe\n\n")


def test_error_frame_from_error() -> None:
    frame = ErrorFrame.from_error(4, GKTError(ErrorCode.overloaded, "busy"))
    assert frame.retryable and frame.error.code == "overloaded" and frame.error.type == "server_error"
    assert json.loads(encode_frame(frame).split(b"data: ")[1])["error"]["message"] == "busy"


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"prompt": "x", "messages": [{"role": "user", "content": "y"}]},
        {"prompt": "x", "max_tokens": 0},
        {"prompt": "x", "max_tokens": -3},
        {"prompt": "x", "temperature": 5},
        {"prompt": "x", "top_p": 0},
        {"prompt": "x", "stop": [""]},
        {"prompt": "x", "stop": ["a"] * 17},
        {"prompt": "nul \x00 byte"},
        {"prompt": "lone \ud800 surrogate"},
        {"messages": []},
        {"messages": [{"role": "wizard", "content": "hi"}]},
        {"prompt": "x", "unknown_field": 1},
    ],
)
def test_guidance_request_rejects(body: dict) -> None:
    with pytest.raises(ValidationError):
        GuidanceRequest.model_validate(body)


def test_final_assistant_message_is_continued() -> None:
    req = GuidanceRequest.model_validate(
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "The answer is "}]})
    assert req.continues and not GuidanceRequest(prompt="x").continues


def test_trailing_whitespace_is_cut_from_prompt_and_output() -> None:
    cut = TrailingWhitespace("The capital is ")
    assert cut.prompt == "The capital is"
    assert [cut.feed(p) for p in (" Paris", " and", " more")] == ["Paris", " and", " more"]
    none = TrailingWhitespace("abc")
    assert none.prompt == "abc" and none.feed(" d") == " d"
    split = TrailingWhitespace("x\n\n")
    assert [split.feed(p) for p in ("\n", "\nY", " z")] == ["", "Y", " z"]


def test_guidance_request_accepts_stop_string() -> None:
    assert GuidanceRequest(prompt="x", stop="\n").stop == ["\n"]

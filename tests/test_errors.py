"""The one error table: distinct codes, statuses, envelope shape."""

from shared.errors import ErrorCode, GKTError, code_from_name, error_body


def test_every_code_is_its_own_member() -> None:
    names = [c.name for c in ErrorCode]
    assert len(names) == len(set(names)) == len(ErrorCode.__members__)
    assert ErrorCode.context_length_exceeded is not ErrorCode.invalid_request


def test_statuses_and_retryability() -> None:
    assert ErrorCode.context_length_exceeded.status == 400 and not ErrorCode.context_length_exceeded.retryable
    assert ErrorCode.overloaded.status == 503 and ErrorCode.overloaded.retryable
    assert all(400 <= c.status < 600 for c in ErrorCode)


def test_envelope() -> None:
    body = GKTError(ErrorCode.invalid_request, "bad k", param="guidance_tokens").body()
    assert body == {"error": {"message": "bad k", "type": "invalid_request_error", "param": "guidance_tokens",
                              "code": "invalid_request"}}
    assert error_body(ErrorCode.timeout, "slow")["error"]["type"] == "server_error"


def test_code_from_wire_name() -> None:
    assert code_from_name("overloaded") is ErrorCode.overloaded
    assert code_from_name("something_new") is ErrorCode.upstream_error
    assert code_from_name(None) is ErrorCode.upstream_error


def test_http_peer_failures_map_onto_the_table() -> None:
    """shared/upstream.py, the one place httpx failures and peer statuses become gkt errors."""
    import httpx
    import pytest

    from shared.upstream import gkt_status_error, openai_status_error, transport_errors

    for exc, code in ((httpx.ReadTimeout("slow"), ErrorCode.timeout),
                      (httpx.ConnectError("refused"), ErrorCode.upstream_unavailable),
                      (httpx.RemoteProtocolError("cut"), ErrorCode.upstream_unavailable)):
        with pytest.raises(GKTError) as info, transport_errors("late", "gone"):
            raise exc
        assert info.value.code is code and info.value.message in ("late", "gone")
        assert info.value.__cause__ is exc  # kept for the log, never sent

    busy = openai_status_error(503, b"", "0")
    assert busy.code is ErrorCode.overloaded and busy.retry_after == 0.0
    assert openai_status_error(429, b"", None).retry_after == 1.0
    rejected = openai_status_error(400, b'{"error": {"message": "too long"}}', None)
    assert rejected.code is ErrorCode.upstream_rejected and rejected.message.endswith(": too long")
    assert openai_status_error(400, b'{"error": {"code": "invalid_request"}}', None).code is ErrorCode.upstream_rejected
    assert openai_status_error(500, b"", None).code is ErrorCode.upstream_error

    refused = gkt_status_error(429, b'{"error": {"code": "rate_limited", "message": "slow down"}}', "2")
    assert refused.code is ErrorCode.rate_limited and refused.message == "cloud: slow down"
    assert refused.retry_after == 2.0
    assert gkt_status_error(502, b"<html>", None).code is ErrorCode.upstream_error
    assert gkt_status_error(404, b"<html>", "soon").code is ErrorCode.upstream_rejected

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

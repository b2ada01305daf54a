"""Usage extraction from response tails, shared by the built-in proxy and the ext_proc server."""

from ingate.usage import parse_usage_tail


def test_parse_usage_from_json_and_sse_tails() -> None:
    assert parse_usage_tail(b'{"id":"x","usage":{"prompt_tokens":11,"completion_tokens":4}}') == (11, 4, None)
    nested = (
        b'data: {"usage": {"prompt_tokens": 3, "prompt_tokens_details": {"cached_tokens": 1}, '
        b'"completion_tokens": 9}}\n\ndata: [DONE]\n\n'
    )
    assert parse_usage_tail(nested) == (3, 9, 1)
    assert parse_usage_tail(b'data: {"choices":[]}\n\n') == (None, None, None)
    assert parse_usage_tail(b'"usage": {"prompt_tokens": 3') == (None, None, None)


def test_json_body_whose_head_was_cut_off() -> None:
    # Only the tail of a large non-streamed body is kept: the usage object alone is decoded.
    tail = b'ut of a long text","finish_reason":"length"}],"usage":{"prompt_tokens":7,"completion_tokens":2}}'
    assert parse_usage_tail(tail) == (7, 2, None)


def test_sse_usage_chunk_followed_by_done() -> None:
    tail = b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":6,"total_tokens":11}}\n\ndata: [DONE]\n\n'
    assert parse_usage_tail(tail) == (5, 6, None)

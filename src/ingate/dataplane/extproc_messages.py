"""Envoy ext_proc protocol messages: header maps in, prebuilt and per-request answers out.

Constant answers are built once at import; nothing here allocates more than the protobuf message it
returns.
"""

from __future__ import annotations

from collections.abc import Mapping

from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2

from ingate.errors import GatewayError
from ingate.request import HDR_DESTINATION

MAX_CHUNK = 62_000
"""Largest body chunk sent back to Envoy in one streamed mutation (stays under gRPC's default frame)."""
LB_NAMESPACE = "envoy.lb"
DEFAULT_MAX_BODY = 16 * 1024 * 1024
ANSWER_CACHE = 4096
"""Prebuilt per-destination answers kept (a pool has at most a few thousand endpoints)."""

# Prebuilt constant answers: one allocation at import, none per message.
EMPTY_REQ_HEADERS = pb.ProcessingResponse(request_headers=pb.HeadersResponse())
EMPTY_RESP_HEADERS = pb.ProcessingResponse(response_headers=pb.HeadersResponse())
EMPTY_REQ_TRAILERS = pb.ProcessingResponse(request_trailers=pb.TrailersResponse())
EMPTY_RESP_TRAILERS = pb.ProcessingResponse(response_trailers=pb.TrailersResponse())
EMPTY_RESP_EOS = pb.ProcessingResponse(
    response_body=pb.BodyResponse(
        response=pb.CommonResponse(
            body_mutation=pb.BodyMutation(streamed_response=pb.StreamedBodyResponse(end_of_stream=True))
        )
    )
)


INGATE_NAMESPACE = "ingate"
"""Dynamic-metadata namespace of the request key that ties an observer stream to its request."""
KEY_FIELD = "key"


def header_map(headers: base_pb2.HeaderMap) -> dict[str, str]:
    """Envoy sends values in `raw_value` (bytes) since 1.27; older ones use `value`."""
    out: dict[str, str] = {}
    for h in headers.headers:
        out[h.key] = h.raw_value.decode("latin-1") if h.raw_value else h.value
    return out


def set_header(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, raw_value=value.encode("latin-1")),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )


def lb_metadata(destination: str) -> struct_pb2.Struct:
    md = struct_pb2.Struct()
    md.fields[LB_NAMESPACE].struct_value.fields[HDR_DESTINATION].string_value = destination
    return md


def immediate_error(status: int, body: bytes, headers: Mapping[str, str]) -> pb.ProcessingResponse:
    """An `ImmediateResponse` that ends the request with `status` and a JSON error body."""
    return pb.ProcessingResponse(
        immediate_response=pb.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=status),
            headers=pb.HeaderMutation(set_headers=[set_header(k, v) for k, v in headers.items()]),
            body=body,
            details="ingate_" + str(status),
        )
    )


def gateway_error_response(e: GatewayError) -> pb.ProcessingResponse:
    return immediate_error(e.status, e.body(), e.headers())


def body_chunk(data: bytes, eos: bool) -> pb.ProcessingResponse:
    return pb.ProcessingResponse(
        request_body=pb.BodyResponse(
            response=pb.CommonResponse(
                body_mutation=pb.BodyMutation(
                    streamed_response=pb.StreamedBodyResponse(body=data, end_of_stream=eos)
                )
            )
        )
    )


def echo_body(data: bytes, eos: bool) -> pb.ProcessingResponse:
    return pb.ProcessingResponse(
        response_body=pb.BodyResponse(
            response=pb.CommonResponse(
                body_mutation=pb.BodyMutation(
                    streamed_response=pb.StreamedBodyResponse(body=data, end_of_stream=eos)
                )
            )
        )
    )

"""The picker over gRPC: Envoy's ext_proc service, the Gateway API Inference Extension's
endpoint-picker protocol (a GIE gateway's transport; Switchyard's Envoy's with
`picker.transport: grpc`).

The candidates come as gRPC metadata of the stream (`x-gateway-destination-endpoint-subset`,
the version in `x-switchyard-pool`), or as GIE's subset hint in metadata
`envoy.lb.subset_hint`. Synchronous gRPC on a thread pool: measured here, a Python ext_proc
round trip costs less than with grpc.aio (p50 0.55 ms against 0.65 ms, p99 about half;
docs/benchmarks.md). Each stream ends as soon as it is answered, so a long generation holds
no thread.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc

from controlplane.config import split_hostport
from controlplane.xds.resources import (
    DESTINATION_HEADER,
    LB_NAMESPACE,
    POOL_HEADER,
    SUBSET_HEADER,
)

SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
SUBSET_NAMESPACE = "envoy.lb.subset_hint"  # GIE: the candidates, when the proxy sends them
NO_BODY = processing_mode_pb2.ProcessingMode.NONE
# Answers that change nothing, by the message they answer.
_CONTINUE = {
    "request_headers": ext_proc.ProcessingResponse(request_headers=ext_proc.HeadersResponse()),
    "request_body": ext_proc.ProcessingResponse(request_body=ext_proc.BodyResponse()),
    "request_trailers": ext_proc.ProcessingResponse(request_trailers=ext_proc.TrailersResponse()),
    "response_headers": ext_proc.ProcessingResponse(response_headers=ext_proc.HeadersResponse()),
    "response_body": ext_proc.ProcessingResponse(response_body=ext_proc.BodyResponse()),
    "response_trailers": ext_proc.ProcessingResponse(
        response_trailers=ext_proc.TrailersResponse()
    ),
}
_CONTINUE_BYTES = {kind: response.SerializeToString() for kind, response in _CONTINUE.items()}


class GrpcService:
    """The ext_proc gRPC service in front of a Picker."""

    def __init__(self, picker, listen: str, workers: int = 16) -> None:
        self.picker = picker
        self.listen = listen
        self.port = 0
        self._server = grpc.server(
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix="picker"),
            options=[("grpc.so_reuseport", 0)],  # a second picker on the port must fail
        )
        handler = grpc.stream_stream_rpc_method_handler(
            self.process,
            request_deserializer=ext_proc.ProcessingRequest.FromString,
            response_serializer=bytes,  # answers are serialized once, by answer()
        )
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, {"Process": handler}),)
        )

    @property
    def address(self) -> str:
        return f"{split_hostport(self.listen)[0]}:{self.port}"

    def start(self) -> None:
        host, port = split_hostport(self.listen)
        self.port = self._server.add_insecure_port(f"{host}:{port}")
        if not self.port:
            raise OSError(f"cannot listen on {self.listen}")
        self._server.start()

    def stop(self) -> None:
        self._server.stop(grace=1.0).wait()

    def process(self, requests, context):
        """One HTTP request: answer the body (or, when Envoy sends no body, the headers)
        with the ranking, then end the stream."""
        pool, subset = "", ""
        for key, value in context.invocation_metadata():
            if key == POOL_HEADER:
                pool = value
            elif key == SUBSET_HEADER:
                subset = value
        for request in requests:
            kind = request.WhichOneof("request")
            if kind == "request_body":
                yield self.answer(request, pool, subset, request.request_body.body)
                return
            if kind == "request_headers" and request.protocol_config.request_body_mode == NO_BODY:
                yield self.answer(request, pool, subset, None)
                return
            yield _CONTINUE_BYTES.get(kind, _CONTINUE_BYTES["request_body"])

    def answer(self, request, pool: str, subset: str, body: bytes | None) -> bytes:
        """The response to the message that carries the decision."""
        started = time.perf_counter()
        candidates = [e for e in subset.split(",") if e] or _subset_hint(request)
        choice = self.picker.decide(pool, candidates, body)
        kind = "request_body" if body is not None else "request_headers"
        if choice is None:
            payload = _CONTINUE_BYTES[kind]
        else:
            response = ext_proc.ProcessingResponse()
            common = getattr(response, kind).response
            header = base_pb2.HeaderValue(key=DESTINATION_HEADER, raw_value=choice.encode())
            common.header_mutation.set_headers.append(base_pb2.HeaderValueOption(header=header))
            response.dynamic_metadata.fields[LB_NAMESPACE].struct_value.fields[
                DESTINATION_HEADER
            ].string_value = choice
            payload = response.SerializeToString()
        self.picker.observe(time.perf_counter() - started)
        return payload


def _subset_hint(request) -> list[str]:
    """GIE's candidates in metadata `envoy.lb.subset_hint`, when a proxy sends them."""
    hint = request.metadata_context.filter_metadata.get(SUBSET_NAMESPACE)
    if hint is None:
        return []
    value = hint.fields.get(SUBSET_HEADER)
    if value is None:
        return []
    if value.HasField("list_value"):
        return [item.string_value for item in value.list_value.values if item.string_value]
    return [e for e in value.string_value.split(",") if e]

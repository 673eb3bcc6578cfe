"""The endpoint picker: inference-aware routing inside a version (docs/routing.md).

`service.py` is the decision Envoy asks for each request of a `prefix_aware` model, served
over HTTP (`http_service.py`, ext_proc's http_service: Switchyard's Envoy's default) and gRPC
(`grpc_service.py`, GIE's protocol); `scheduler.py` ranks the version's endpoints;
`prefix.py` remembers which prompt blocks went where; `load.py` reads the endpoints' vLLM
metrics; `supervisor.py` runs the picker as a child process of `switchyard up`/`serve`.
"""

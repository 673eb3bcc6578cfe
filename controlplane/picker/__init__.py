"""The endpoint picker: inference-aware routing inside a version (docs/routing.md).

`service.py` is the ext_proc gRPC service Envoy asks for each request of a `prefix_aware`
model; `scheduler.py` ranks the version's endpoints; `prefix.py` remembers which prompt
blocks went where; `load.py` reads the endpoints' vLLM metrics; `supervisor.py` runs the
picker as a child process of `switchyard up`/`serve`.
"""

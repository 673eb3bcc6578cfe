"""The endpoint picker: inference-aware routing inside a version (docs/routing.md).

`service.py` is the decision Envoy asks for each request of a `prefix_aware` model, served
over HTTP (`http_service.py`, ext_proc's http_service: Switchyard's Envoy's default) and gRPC
(`grpc_service.py`, GIE's protocol); `scheduler.py` ranks the version's endpoints;
`prefix.py` remembers which prompt blocks went where; `load.py` reads the endpoints' vLLM
metrics; `supervisor.py` runs the picker as a child process of `switchyard up`/`serve`. The decision
is made by the native engine (`_native.c`, built by setup.py) where it was built, by the
Python one otherwise (`picker.engine`).
"""


def native_missing() -> str | None:
    """Why the native engine cannot run here (None: it can): it is built at install, where a
    C compiler is found (setup.py)."""
    try:
        from controlplane.picker import _native  # noqa: F401
    except ImportError as exc:
        return f"not built at install (no C compiler?): {exc}"
    return None

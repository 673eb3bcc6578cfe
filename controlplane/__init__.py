"""Switchyard: an Envoy-fronted control plane for rolling out vLLM model versions."""

__version__ = "0.1.0"

import os as _os

# We fork children (Envoy, simulators) with a pre-exec hook; gRPC's fork handlers are not
# needed for that and only print warnings.
_os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

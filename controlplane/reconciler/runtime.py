"""What a runtime must do for a model version, whatever runs it (local processes, Kubernetes).

A runtime owns the backends of the versions in the controller's desired state. It reports
what it sees through one callback, `Controller.set_endpoints(model, version, endpoints,
state)`: only ready endpoints reach Envoy (EDS), and they leave it at once when they stop
being ready. Every method is idempotent and returns without waiting on slow work (a model
that loads for minutes); the reconciler loop calls them again until the world matches.

States (CONTRACT section 3): `starting`, `active`, `sleeping`, `waking`, `error`, `stopped`.
"""

from __future__ import annotations

from typing import Protocol

from controlplane.config import Backend


class Runtime(Protocol):
    async def start(self) -> None:
        """Begin running every version of the controller's state."""

    def validate(self, model: str, version: str, backend: Backend) -> None:
        """Raise Invalid if this runtime cannot run `backend` (checked before the controller
        persists or routes anything, so a refused version leaves no trace)."""

    async def ensure(self, model: str, version: str, backend: Backend) -> None:
        """Make the version exist (start its backend); a no-op when it already runs."""

    async def remove(self, model: str, version: str) -> None:
        """Stop the version's backend and forget it; its endpoints leave EDS first."""

    async def sleep(self, model: str, version: str, level: int) -> None:
        """Park the version with vLLM sleep mode (level 1 or 2): it leaves EDS, keeps its
        process, frees the GPU. Returns once the backend says it is sleeping."""

    async def wake(self, model: str, version: str) -> float:
        """Wake a sleeping or stopped version; return the seconds it took to become ready."""

    async def scale(self, model: str, version: str, replicas: int) -> None:
        """Scale to `replicas` backends (0 = stopped, nothing held)."""

    async def wait_ready(self, timeout: float) -> bool:
        """True once every version is ready (False after `timeout` seconds)."""

    async def stop(self) -> None:
        """Stop everything this runtime started (not `url` backends, which it never owned)."""

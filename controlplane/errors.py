"""One small exception family for the whole control plane.

Errors from grpc, aiohttp, sqlite and pydantic are converted into these where they enter our
code, and the admin API maps them to HTTP statuses in one place (`status`).
"""

from __future__ import annotations


class SwitchyardError(Exception):
    """Base class: a message a user can act on, and the field at fault when there is one."""

    status = 500
    kind = "internal_error"

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def to_json(self) -> dict:
        error: dict = {"type": self.kind, "message": self.message}
        if self.field is not None:
            error["field"] = self.field
        return {"error": error}


class BadRequest(SwitchyardError):
    status = 400
    kind = "bad_request"


class Unauthorized(SwitchyardError):
    status = 401
    kind = "unauthorized"


class NotFound(SwitchyardError):
    status = 404
    kind = "not_found"


class Conflict(SwitchyardError):
    status = 409
    kind = "conflict"


class Invalid(SwitchyardError):
    status = 422
    kind = "invalid"


class EnvoyRejected(SwitchyardError):
    """An Envoy NACKed the configuration we pushed."""

    status = 502
    kind = "envoy_rejected"


class Unavailable(SwitchyardError):
    status = 503
    kind = "unavailable"


class AckTimeout(SwitchyardError):
    """The change is in the desired state, but not every Envoy confirmed it in time."""

    status = 504
    kind = "ack_timeout"


class ConfigError(SwitchyardError):
    """The configuration file is invalid: the CLI prints the message and exits with code 2."""

    kind = "config_error"

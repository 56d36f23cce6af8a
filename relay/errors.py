"""Refusals the relay makes on its own account, beside the protocol's parse errors.

All are :class:`protocol.errors.PliError`, so one middleware turns every refusal into
``application/problem+json`` with the error's stable ``code`` and ``status``.
"""

from __future__ import annotations

from protocol.errors import PliError

__all__ = ["RelayError", "forbidden", "not_found", "unavailable"]


class RelayError(PliError):
    """A refusal with an explicit code and status (SPEC.md §9)."""

    def __init__(self, code: str, status: int, message: str, **extra: object) -> None:
        super().__init__(message, code=code)
        self.status = status
        self.extra = extra


def not_found(what: str = "no such resource") -> RelayError:
    return RelayError("not_found", 404, what)


def forbidden(what: str) -> RelayError:
    return RelayError("forbidden", 403, what)


def unavailable(what: str) -> RelayError:
    return RelayError("unavailable", 503, what)

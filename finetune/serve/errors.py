"""The one exception a request handler raises for a client's mistake (or an overload): an HTTP status, a
one-line message naming the problem, and headers (``Retry-After``). The app answers it as the Open
Inference Protocol's error body, ``{"error": "..."}``, which `tritonclient` raises as its own exception."""

from __future__ import annotations


class RequestError(Exception):
    """A request that cannot be answered: ``status`` (4xx, or 503 when the server is full), ``message``."""

    def __init__(self, status: int, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def bad_request(message: str) -> RequestError:
    return RequestError(400, message)

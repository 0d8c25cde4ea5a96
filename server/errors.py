"""Errors the service answers with, each bound to one HTTP status; mapped once in app.py."""

from __future__ import annotations


class ServiceError(Exception):
    status: int = 500
    code: str = "internal_error"
    kind: str = "server_error"  # OpenAI's error "type"
    retry_after_s: int | None = None  # answered as a Retry-After header when set

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequest(ServiceError):
    status, code, kind = 400, "invalid_request", "invalid_request_error"


class Unauthorized(ServiceError):
    status, code, kind = 401, "invalid_api_key", "authentication_error"


class UnknownModel(ServiceError):
    status, code, kind = 404, "model_not_found", "invalid_request_error"


class BodyTooLarge(ServiceError):
    status, code, kind = 413, "body_too_large", "invalid_request_error"


class Overloaded(ServiceError):
    status, code, kind = 429, "queue_full", "rate_limit_error"

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class NotReady(ServiceError):
    status, code, kind = 503, "not_ready", "server_error"

    def __init__(self, message: str, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ShuttingDown(NotReady):
    """The server is draining and this request could not finish before the drain ends."""

    code = "shutting_down"


class DeadlineExceeded(ServiceError):
    status, code, kind = 504, "deadline_exceeded", "server_error"


class ClientGone(ServiceError):
    """The caller disconnected before its answer: its work was stopped (nginx's 499; nobody reads it)."""

    status, code, kind = 499, "client_closed_request", "invalid_request_error"

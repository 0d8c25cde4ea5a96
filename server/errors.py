"""Errors the service answers with, each bound to one HTTP status; mapped once in app.py."""

from __future__ import annotations


class ServiceError(Exception):
    status: int = 500
    code: str = "internal_error"
    kind: str = "server_error"  # OpenAI's error "type"

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


class DeadlineExceeded(ServiceError):
    status, code, kind = 504, "deadline_exceeded", "server_error"

"""Errors of the operator API: every one is an HTTP status with a JSON body saying what is wrong."""
from __future__ import annotations


class ApiError(Exception):
    """Raise from a route handler: answered as ``{"error": {"status", "code", "message", "details"}}``."""

    def __init__(self, status: int, code: str, message: str, details: dict | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        self.headers = headers or {}

    def body(self) -> dict:
        error = {"status": self.status, "code": self.code, "message": self.message}
        if self.details:
            error["details"] = self.details
        return {"error": error}


def not_found(what: str, ident) -> ApiError:
    return ApiError(404, f"{what.replace(' ', '_')}_not_found", f"No {what} {ident!r}")


def bad_request(message: str, code: str = "bad_request", **details) -> ApiError:
    return ApiError(400, code, message, details or None)


def unprocessable(message: str, code: str = "validation_failed", **details) -> ApiError:
    return ApiError(422, code, message, details or None)


def conflict(message: str, code: str = "conflict", **details) -> ApiError:
    return ApiError(409, code, message, details or None)

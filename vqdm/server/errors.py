"""Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, and the handlers
that make every failure path answer with it (validation, unknown routes, unexpected exceptions).

`reason` (a short fixed word) labels `vqdm_errors_total`; it never holds user input.
"""
from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("vqdm.server")

# OpenAI's error "type" per status family.
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          409: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
          499: "cancelled", 500: "server_error", 503: "server_error", 504: "timeout"}
_REASONS = {400: "invalid_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
            409: "conflict", 413: "payload_too_large", 429: "queue_full", 499: "cancelled",
            500: "internal", 503: "not_ready", 504: "timeout"}


class APIError(Exception):
    """An error answered to the client; raised anywhere in a request, turned into JSON by a handler."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, reason: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
        self.reason = reason or _REASONS.get(status, "client_error" if status < 500 else "internal")
        self.headers = headers or {}

    def payload(self) -> dict[str, Any]:
        return error_payload(self.message, self.type, self.param, self.code)


def bad_request(message: str, param: str | None, code: str = "invalid_value", status: int = 400) -> APIError:
    """A client's mistake in one parameter, in OpenAI's error shape (400 unless `status` says otherwise)."""
    return APIError(status, message, param=param, code=code)


def error_payload(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def mark_error(scope_state: dict, reason: str) -> None:
    """Tell the request-context middleware which reason to count for this response."""
    scope_state["vqdm_error_reason"] = reason


def error_response(request: Request | None, err: APIError) -> JSONResponse:
    if request is not None:
        mark_error(request.scope.setdefault("state", {}), err.reason)
    return JSONResponse(err.payload(), status_code=err.status, headers=err.headers)


def _loc_to_param(loc: tuple) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or None


def validation_error(exc: Exception) -> APIError:
    """A pydantic / FastAPI validation failure as one 400 naming the first offending field."""
    errors = exc.errors() if hasattr(exc, "errors") else []
    if not errors:
        return APIError(400, str(exc), code="invalid_request")
    first = errors[0]
    param = _loc_to_param(tuple(first.get("loc", ())))
    kind = first.get("type", "")
    if kind == "json_invalid":
        return APIError(400, f"request body is not valid JSON: {first.get('msg')}", code="invalid_json")
    if kind == "extra_forbidden":
        return APIError(400, f"unknown field {param!r}; see GET /docs for the accepted fields",
                        param=param, code="unknown_parameter")
    if kind == "missing":
        return APIError(400, f"missing required field {param!r}", param=param, code="missing_required_parameter")
    msg = first.get("msg", "invalid value")
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return APIError(400, f"{param}: {msg}{more}" if param else f"{msg}{more}", param=param, code="invalid_value")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return error_response(request, validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        msg = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
        err = APIError(exc.status_code, msg.get(exc.status_code, str(exc.detail)),
                       code=_REASONS.get(exc.status_code), headers=dict(exc.headers or {}))
        return error_response(request, err)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(request, APIError(500, "internal server error (logged with this request's id)",
                                                code="internal_error"))

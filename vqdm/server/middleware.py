"""Pure ASGI middleware (no BaseHTTPMiddleware: it would hide client disconnects from endpoints and
buffer server-sent events).

RequestContextMiddleware (outermost): request id (the client's X-Request-Id when it is sane, else
a new one) in the response header and in every log record; the client's id is only a correlation
label (generation jobs get server-made ids, sent as X-Vqdm-Job-Id); one access-log line per request;
request / error counters for every response, including ones the app never routed (413).
BodyLimitMiddleware: 413 before reading a body whose Content-Length is too big, and during the
read for chunked bodies that grow too big.
"""
from __future__ import annotations

import json
import logging
import re
import time
import uuid

from vqdm.server.errors import APIError, error_payload, mark_error
from vqdm.server.logs import request_id_var
from vqdm.server.metrics import Metrics

log = logging.getLogger("vqdm.server.access")
_CLIENT_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
GENERATION_PATH = "/v1/images/generations"
EDITS_PATH = "/v1/images/edits"
# Routes that submit jobs, both dialects: vqdm_requests_total and the request duration count them.
JOB_PATHS = (GENERATION_PATH, EDITS_PATH, "/sdapi/v1/txt2img", "/sdapi/v1/img2img")
_DEFAULT_REASONS = {400: "invalid_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
                    409: "conflict", 413: "payload_too_large", 429: "queue_full", 500: "internal",
                    503: "not_ready", 504: "timeout"}


def new_request_id() -> str:
    return "req_" + uuid.uuid4().hex


def _header(scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", []):
        if k == name:
            return v.decode("latin-1")
    return None


class RequestContextMiddleware:
    def __init__(self, app, metrics_getter, new_id=new_request_id) -> None:
        self.app = app
        self.metrics_getter = metrics_getter  # () -> Metrics | None (created in the lifespan)
        self.new_id = new_id  # () -> a server-made id (replicas.Peers.new_job_id names the replica)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = _header(scope, b"x-request-id")
        label = given if given and _CLIENT_ID_RE.match(given) else None
        rid = label or self.new_id()
        state = scope.setdefault("state", {})
        state["request_id"], state["client_label"] = rid, label
        token = request_id_var.set(rid)
        t0 = time.perf_counter()
        status = 500

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                extra = [(b"x-request-id", rid.encode())]
                if state.get("vqdm_job_id"):
                    extra.append((b"x-vqdm-job-id", state["vqdm_job_id"].encode()))
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self._account(scope, state, status, time.perf_counter() - t0)
            request_id_var.reset(token)

    def _account(self, scope, state: dict, status: int, seconds: float) -> None:
        final = state.get("vqdm_final_status", status)  # a stream's outcome, set by its generator
        log.info("%s %s %s %.3fs", scope["method"], scope["path"], final, seconds,
                 extra={"method": scope["method"], "path": scope["path"], "status": final, "seconds": round(seconds, 6)})
        metrics: Metrics | None = self.metrics_getter()
        if metrics is None:
            return
        if final >= 400 and final != 499:
            metrics.errors.labels(state.get("vqdm_error_reason") or _DEFAULT_REASONS.get(final, "other")).inc()
        if scope["path"] in JOB_PATHS and scope["method"] == "POST":
            model = state.get("vqdm_model", "unknown")
            metrics.requests.labels(model, str(final)).inc()
            if state.get("vqdm_admitted") and final != 499:
                metrics.request_duration.labels(model).observe(seconds)


class BodyLimitMiddleware:
    def __init__(self, app, max_bytes: int, path_limits: dict[str, int] | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.path_limits = path_limits or {}  # larger limits for upload routes (image edits)

    def _too_large(self, size: str, limit: int) -> APIError:
        return APIError(413, f"request body is {size}, over this server's limit of {limit} bytes",
                        code="request_too_large")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.path_limits.get(scope["path"], self.max_bytes)
        length = _header(scope, b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            err = self._too_large(f"{int(length)} bytes", limit)
            mark_error(scope.setdefault("state", {}), err.reason)
            body = json.dumps(error_payload(err.message, err.type, err.param, err.code)).encode()
            await send({"type": "http.response.start", "status": 413,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                    (b"connection", b"close")]})
            await send({"type": "http.response.body", "body": body})
            return
        seen = 0

        async def counting_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise self._too_large(f"over {seen} bytes (chunked)", limit)  # handled like any APIError
            return message

        await self.app(scope, counting_receive, send)

"""The second /metrics listener (`--metrics-port`): Prometheus' WSGI app on threads of its own, so
a scrape is answered even while the event loop is busy. With `protect_metrics` it asks for the same
API keys as /metrics on the main port, and answers a missing or wrong key with the same 401."""
from __future__ import annotations

import json
import socket
import threading
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

from vqdm.server.errors import APIError
from vqdm.server.handling import key_index


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a scrape in flight never holds up shutdown


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args) -> None:  # noqa: A002 - the stdlib's signature
        """Scrapes every few seconds would drown the server log."""


def _with_keys(app, keys: list[str]):
    def guarded(environ, start_response):
        try:
            key_index(environ.get("HTTP_AUTHORIZATION", ""), keys)
        except APIError as e:
            body = json.dumps(e.payload()).encode()
            start_response(f"{e.status} Unauthorized", [("Content-Type", "application/json"),
                                                        ("Content-Length", str(len(body))), *e.headers.items()])
            return [body]
        return app(environ, start_response)

    return guarded


def start_metrics_server(host: str, port: int, registry: CollectorRegistry, keys: list[str]) -> WSGIServer:
    """Serve `registry` on host:port from a daemon thread, behind `keys` unless that is empty;
    stop it with `.shutdown()` then `.server_close()`."""
    app = make_wsgi_app(registry)
    if keys:
        app = _with_keys(app, keys)
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]  # IPv4 or IPv6, as `host` is
    server_class = type("MetricsServer", (_ThreadingServer,), {"address_family": family})
    server = make_server(host, port, app, server_class, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="vqdm-metrics-port", daemon=True).start()
    return server

"""Forwarding status and cancel to peer replicas (server.replicas) against real HTTP peers that
misbehave: one answers HTML, one a JSON list, one 500, one never answers, one is not listening.
One small threaded HTTP server plays every peer, each under its own path prefix (a peer base URL
may carry a path), and records the request line it received."""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import quote, unquote

import pytest

KEY = "replica-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
WITHIN_S = 7.0  # one peer timeout (peer_timeout_s, 2 s by default) plus slack; asked in turn it took 10 s


class _Peer(BaseHTTPRequestHandler):
    def do_GET(self):
        self._answer()

    def do_DELETE(self):
        self._answer()

    def _answer(self):
        self.server.seen.append((self.command, self.path, self.headers.get("authorization")))
        kind, _, rest = self.path.lstrip("/").partition("/")
        ref = unquote(rest.removeprefix("v1/requests/"))
        if kind == "slow":
            self.server.release.wait(120)
        if kind == "has":
            state = "cancelling" if self.command == "DELETE" else "running"
            self._send(202 if self.command == "DELETE" else 200, "application/json",
                       json.dumps({"id": "req_held_by_peer", "object": "image_generation.request", "state": state,
                                   "label": ref}))
        elif kind == "nonjson":
            self._send(200, "text/html", "<html><body>upstream says hello</body></html>")
        elif kind == "wrongshape":
            self._send(200, "application/json", "[1, 2]")
        elif kind == "broken":
            self._send(500, "text/plain", "Internal Server Error")
        else:  # absent, quoting, slow
            self._send(404, "application/json", json.dumps({"error": {"message": "no such request", "type":
                                                                      "not_found_error", "param": None, "code": None}}))

    def _send(self, status: int, ctype: str, body: str) -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        try:
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the replica gave up on this peer (its timeout): what the slow peer is for

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def peer():
    """peer(kind) -> the base URL of a peer that behaves as `kind`; peer.seen lists what peers got."""
    from vqdm.server.replicas import replica_token  # noqa: F401 - fails early where the module is broken

    server = ThreadingHTTPServer(("127.0.0.1", 0), _Peer)
    server.daemon_threads = True
    server.seen, server.release = [], threading.Event()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def url(kind: str) -> str:
        return f"http://127.0.0.1:{server.server_port}/{kind}"

    url.seen = server.seen
    yield url
    server.release.set()
    server.shutdown()


@pytest.fixture(scope="module")
def down_url():
    """A loopback port with nothing listening: connection refused."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def replica(make_client):
    """replica(*peer_urls) -> a started server (this replica) forwarding to those peers."""
    def make(*peers: str):
        return make_client(api_keys=[KEY], peers=list(peers), warmup=False, advertise_url="http://127.0.0.1:1/self")

    return make


def peer_errors(client, tools) -> dict[str, float]:
    samples = tools.metric_samples(client.get("/metrics").text)
    return {dict(labels)["reason"]: v for (name, labels), v in samples.items() if name == "vqdm_peer_errors_total"}


def timed(fn, *args, **kwargs):
    t0 = time.monotonic()
    r = fn(*args, **kwargs)
    return r, time.monotonic() - t0


def assert_502(r) -> None:
    assert r.status_code == 502, r.text
    err = r.json()["error"]
    assert err["code"] == "peer_unavailable" and err["type"] == "server_error" and err["param"] == "request_id"
    assert "no peer replica" in err["message"] and "127.0.0.1" not in err["message"]  # no internal address


def test_a_peer_answering_non_json_or_a_wrong_shape_is_skipped_and_counted(replica, peer, tools):
    c = replica(peer("nonjson"), peer("wrongshape"), peer("has"))
    r = c.get("/v1/requests/my-label", headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json()["id"] == "req_held_by_peer" and r.json()["label"] == "my-label"
    before = peer_errors(c, tools)
    assert c.delete("/v1/requests/my-label", headers=AUTH).status_code == 202  # a DELETE hears every peer out
    assert peer_errors(c, tools)["malformed"] - before["malformed"] == 2

    c = replica(peer("nonjson"), peer("wrongshape"))
    assert_502(c.get("/v1/requests/my-label", headers=AUTH))
    assert_502(c.delete("/v1/requests/my-label", headers=AUTH))
    assert peer_errors(c, tools) == {"malformed": 4, "timeout": 0, "unreachable": 0, "bad_status": 0,
                                     "unresolved": 0}
    assert c.get("/healthz").status_code == 200


def test_a_slow_peer_costs_one_short_timeout_and_the_other_answer_arrives(replica, peer, tools):
    c = replica(peer("slow"), peer("has"))  # the slow one first: asked in turn, it would hold up the rest
    r, took = timed(c.get, "/v1/requests/my-label", headers=AUTH)
    assert r.status_code == 200 and r.json()["id"] == "req_held_by_peer", r.text
    assert took < WITHIN_S
    r, took = timed(c.delete, "/v1/requests/my-label", headers=AUTH)
    assert r.status_code == 202 and r.json()["state"] == "cancelling", r.text
    assert took < WITHIN_S

    c = replica(peer("slow"), peer("absent"))
    r, took = timed(c.get, "/v1/requests/unknown-label", headers=AUTH)
    assert r.status_code == 404 and r.json()["error"]["code"] == "request_not_found", r.text
    assert took < WITHIN_S
    assert peer_errors(c, tools)["timeout"] == 1


def test_502_only_when_no_peer_could_answer(replica, peer, down_url, tools):
    from vqdm.server.replicas import replica_token

    c = replica(down_url, peer("slow"), peer("broken"))
    r, took = timed(c.get, "/v1/requests/some-label", headers=AUTH)
    assert_502(r)
    assert took < WITHIN_S
    errors = peer_errors(c, tools)
    assert errors["unreachable"] == 1 and errors["timeout"] == 1 and errors["bad_status"] == 1

    # An id naming the down peer asks only it; naming no configured peer contacts nobody: 404.
    down_id = f"req_{replica_token(down_url)}_{'a' * 32}"
    assert_502(c.delete(f"/v1/requests/{down_id}", headers=AUTH))
    stranger = f"req_0badf00d_{'0' * 32}"
    assert c.get(f"/v1/requests/{stranger}", headers=AUTH).status_code == 404
    assert not [target for _, target, _ in peer.seen if stranger in target]

    c = replica(peer("absent"), peer("broken"))  # one peer answered: not there, so 404, not 502
    assert c.get("/v1/requests/some-label", headers=AUTH).status_code == 404


def test_the_id_reaches_the_peer_as_one_exact_path_segment(replica, peer):
    c = replica(peer("quoting"))  # its own prefix: a late request from another test's slow peer is not ours
    prefix = "/quoting/v1/requests/"
    # No "%41"-style escape among them: Starlette's TestClient decodes the path twice (uvicorn once).
    for ref in ("x?a=1", "a#b", "with space", "ünïcødé-☃", "100%", "a;b=c&d", "..", ".", "+"):
        seen = len(peer.seen)
        r = c.get("/v1/requests/" + quote(ref, safe="").replace(".", "%2E"), headers=AUTH)
        assert r.status_code == 404, (ref, r.text)
        ((method, target, auth),) = [s for s in peer.seen[seen:] if s[1].startswith("/quoting/")]
        assert target.startswith(prefix) and not {"?", "#", "/"} & set(target[len(prefix):]), (ref, target)
        assert unquote(target[len(prefix):]) == ref
        assert method == "GET" and auth == AUTH["Authorization"]

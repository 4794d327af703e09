"""Status and cancel behind a load balancer with several replicas (docs/deploy.md, "Replicas").

Each replica runs its own queue, so `GET`/`DELETE /v1/requests/{id}` may land on a replica that
never saw the job. The job id names its replica: `req_<token>_<hex>`, where `token` is a short
hash of the replica's `advertise_url`. A replica that receives a foreign id forwards the call to
the peer with that token, found among its configured `peers` (base URLs, or `dns:HOST:PORT` for
every address a headless Service resolves to). Only configured peers are ever contacted: an id
cannot make the server call an address the client chose. A client's own label (X-Request-Id)
carries no token, so a label not found here is asked of every peer. Forwarded calls carry the
client's Authorization header (every replica holds the same keys) and a marker header so that
they are never forwarded again.

Peers are asked at once, each within `peer_timeout_s`: one slow or dead peer costs a lookup that
bound, never a wait per peer. A peer that times out, cannot be reached, answers 5xx or answers
something that is not a vqdm reply is skipped and counted (`vqdm_peer_errors_total{reason}`); a
404 means it does not hold the job. Only when no peer that might hold the job could answer is the
client told 502.

Without `advertise_url` ids are plain `req_<hex>`: with peers set, a call for a job not found here
is then asked of every peer (as for labels); with no peers nothing is forwarded.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import socket
import uuid
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

import httpx

from vqdm.server.errors import APIError

if TYPE_CHECKING:
    from vqdm.server.metrics import Metrics

log = logging.getLogger("vqdm.server")

FORWARDED_HEADER = "x-vqdm-forwarded"
_ID_RE = re.compile(r"^req_([0-9a-f]{8})_[0-9a-f]{32}$")


def replica_token(url: str) -> str:
    return hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:8]


def token_of(job_id: str) -> str | None:
    m = _ID_RE.match(job_id)
    return m.group(1) if m else None


class PeerUnusable(Exception):
    """A peer gave no usable answer; `reason` is the metric label, a fixed word."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def peer_answer(status: int, content: bytes) -> tuple[int, dict[str, Any]] | None:
    """What a peer's reply says: (status, body) for the job it holds, None for a 404 (not there).
    Raises PeerUnusable for a reply no vqdm replica gives: 5xx, a redirect, a body that is not the
    request object (2xx) or the OpenAI error shape (4xx)."""
    if status == 404:
        return None
    if not 200 <= status < 300 and not 400 <= status < 500:
        raise PeerUnusable("bad_status", f"answered {status}")
    try:
        body = json.loads(content)
    except ValueError:
        raise PeerUnusable("malformed", f"answered {status} with a body that is not JSON") from None
    key, kind = ("id", str) if status < 300 else ("error", dict)  # a request object; the OpenAI error shape
    if not isinstance(body, dict) or not isinstance(body.get(key), kind):
        raise PeerUnusable("malformed", f"answered {status} with JSON that is not a vqdm reply")
    return status, body


class Peers:
    def __init__(self, advertise_url: str | None, peers: list[str], timeout_s: float) -> None:
        self.own = replica_token(advertise_url) if advertise_url else None
        self.advertise_url = advertise_url.rstrip("/") if advertise_url else None
        self.entries = peers
        self.timeout_s = timeout_s

    def new_job_id(self) -> str:
        return f"req_{self.own}_{uuid.uuid4().hex}" if self.own else f"req_{uuid.uuid4().hex}"

    async def urls(self) -> tuple[dict[str, str], int]:
        """(token -> base URL of every peer other than this replica, entries that did not resolve).
        DNS is looked up each time: pods come and go."""
        out: dict[str, str] = {}
        unresolved = 0
        loop = asyncio.get_running_loop()
        for entry in self.entries:
            if entry.startswith("dns:"):
                host, _, port = entry[4:].rpartition(":")
                try:
                    infos = await asyncio.wait_for(loop.getaddrinfo(host, int(port), type=socket.SOCK_STREAM),
                                                   self.timeout_s)
                except (OSError, ValueError, asyncio.TimeoutError) as e:
                    log.warning("peers: cannot resolve %s: %s", entry, e or "timed out")
                    unresolved += 1
                    continue
                for info in infos:
                    addr = info[4][0]
                    url = f"http://[{addr}]:{port}" if ":" in addr else f"http://{addr}:{port}"
                    out[replica_token(url)] = url
            else:
                url = entry.rstrip("/")
                if urlsplit(url).scheme in ("http", "https"):
                    out[replica_token(url)] = url
        out.pop(self.own, None)
        return out, unresolved

    async def forward(self, method: str, ref: str, headers: dict[str, str],
                      metrics: Metrics) -> tuple[int, dict[str, Any]] | None:
        """The answer (status, JSON body) of the peer holding `ref`, or None when no peer has it.
        Raises a 502 APIError when no peer that might hold it could answer."""
        token = token_of(ref)
        if token == self.own and token is not None:
            return None  # ours, and not found here: expired
        peers, unresolved = await self.urls()
        if unresolved:
            metrics.peer_errors.labels("unresolved").inc(unresolved)
        targets = [peers[token]] if token in peers else ([] if token else list(peers.values()))
        if not targets:
            if unresolved:  # the holder may be behind the name that did not resolve
                raise self._unavailable(ref, f"{unresolved} peer name(s) did not resolve")
            return None
        fwd = {k: v for k, v in headers.items() if k in ("authorization",)}
        fwd[FORWARDED_HEADER] = "1"
        # The id as one path segment whatever it holds; dots too, or "." and ".." would be resolved away.
        path = "/v1/requests/" + quote(ref, safe="").replace(".", "%2E")
        reasons: list[str] = []
        found: list[tuple[int, dict[str, Any]]] = []
        async with httpx.AsyncClient(timeout=self.timeout_s) as client:
            tasks = [asyncio.create_task(self._ask(client, method, base + path, fwd)) for base in targets]
            try:
                for done in asyncio.as_completed(tasks):
                    try:
                        answer = await done
                    except PeerUnusable as e:
                        metrics.peer_errors.labels(e.reason).inc()
                        reasons.append(e.reason)
                        continue
                    if answer is not None:
                        found.append(answer)
                        if method == "GET":  # no side effect: the first holder's answer will do
                            break
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        if found:
            return found[0]
        if len(reasons) == len(targets):
            raise self._unavailable(ref, f"{len(targets)} asked: {', '.join(sorted(reasons))}")
        if reasons:
            log.warning("peers: %s %r not found; %d of %d peer(s) could not answer", method, ref,
                        len(reasons), len(targets))
        return None

    async def _ask(self, client: httpx.AsyncClient, method: str, url: str,
                   headers: dict[str, str]) -> tuple[int, dict[str, Any]] | None:
        try:
            # httpx bounds each phase; this bounds the whole exchange (a peer dribbling bytes).
            r = await asyncio.wait_for(client.request(method, url, headers=headers), self.timeout_s)
            return peer_answer(r.status_code, r.content)
        except (httpx.TimeoutException, asyncio.TimeoutError):
            e = PeerUnusable("timeout", f"no answer within {self.timeout_s:g}s")
        except httpx.HTTPError as err:
            e = PeerUnusable("unreachable", f"{type(err).__name__}: {err}")
        except PeerUnusable as err:
            e = err
        log.warning("peers: %s %s: %s", method, url, e)  # the address is for the logs, not the client
        raise e

    def _unavailable(self, ref: str, why: str) -> APIError:
        return APIError(502, f"request {ref!r} is not on this replica, and no peer replica that may hold it could "
                             f"answer ({why}); retry shortly", param="request_id",
                        code="peer_unavailable", reason="peer_unavailable")

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

Without `advertise_url` ids are plain `req_<hex>`: with peers set, a call for a job not found here
is then asked of every peer (as for labels); with no peers nothing is forwarded.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import socket
import uuid
from urllib.parse import urlsplit

import httpx

log = logging.getLogger("vqdm.server")

FORWARDED_HEADER = "x-vqdm-forwarded"
_ID_RE = re.compile(r"^req_([0-9a-f]{8})_[0-9a-f]{32}$")
_TIMEOUT_S = 10.0


def replica_token(url: str) -> str:
    return hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:8]


def token_of(job_id: str) -> str | None:
    m = _ID_RE.match(job_id)
    return m.group(1) if m else None


class Peers:
    def __init__(self, advertise_url: str | None, peers: list[str]) -> None:
        self.own = replica_token(advertise_url) if advertise_url else None
        self.advertise_url = advertise_url.rstrip("/") if advertise_url else None
        self.entries = peers

    def new_job_id(self) -> str:
        return f"req_{self.own}_{uuid.uuid4().hex}" if self.own else f"req_{uuid.uuid4().hex}"

    async def urls(self) -> dict[str, str]:
        """token -> base URL of every peer other than this replica (DNS looked up each time: pods come
        and go)."""
        out: dict[str, str] = {}
        loop = asyncio.get_running_loop()
        for entry in self.entries:
            if entry.startswith("dns:"):
                host, _, port = entry[4:].rpartition(":")
                try:
                    infos = await loop.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
                except (OSError, ValueError) as e:
                    log.warning("peers: cannot resolve %s: %s", entry, e)
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
        return out

    async def forward(self, method: str, ref: str, headers: dict[str, str]):
        """The peer's answer (status, JSON body) for `ref`, or None when no peer has it."""
        token = token_of(ref)
        if token == self.own and token is not None:
            return None  # ours, and not found here: expired
        peers = await self.urls()
        targets = [peers[token]] if token in peers else ([] if token else list(peers.values()))
        if not targets:
            return None
        fwd = {k: v for k, v in headers.items() if k in ("authorization",)}
        fwd[FORWARDED_HEADER] = "1"
        async with httpx.AsyncClient(timeout=_TIMEOUT_S) as client:
            for base in targets:
                try:
                    r = await client.request(method, f"{base}/v1/requests/{ref}", headers=fwd)
                except httpx.HTTPError as e:
                    log.warning("peers: %s %s on %s failed: %s", method, ref, base, e)
                    continue
                if r.status_code != 404:
                    return r.status_code, r.json()
        return None

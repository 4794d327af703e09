"""Encoded images kept for `response_format: "url"` (docs/clients/openai.md, "URLs"): files in one
folder, bounded by a byte cap (oldest removed first) and a time to live.

The folder is the whole state, with no index beside it: a file's name is its id plus its format
(`file-<32 hex>.png`), its modification time when it was stored. So several replicas can share
one folder (`image_store_dir`, a network volume) and a URL made by one works through any of them;
without that setting each server keeps a private temporary folder, removed at shutdown.

The id is the URL's only credential: 128 random bits, as unguessable as an API key, so a client
fetches it with a plain GET (no Authorization header, as browsers and front ends that render the
link do). An id of the wrong form is refused before any path is built from it.

Every method does file I/O: call them in a worker thread, never on the event loop. Files are
written under a temporary name and renamed, so a reader (in any replica) never sees half a file.
Eviction runs after each write (over the cap, or past the TTL); an expired file is also removed
when it is asked for. Replicas racing to remove the same file is harmless: whoever's unlink
succeeds counts it.
"""
from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from vqdm.errors import ConfigError
from vqdm.server.errors import APIError
from vqdm.server.imaging import encode_image

if TYPE_CHECKING:
    from vqdm.server.metrics import Metrics

log = logging.getLogger("vqdm.server")

FILES_PREFIX = "/v1/files"  # GET /v1/files/{id}/content, the path of OpenAI's Files API for a file's bytes
ID_RE = re.compile(r"^file-[0-9a-f]{32}$")
_NAME_RE = re.compile(r"^(file-[0-9a-f]{32})\.(png|jpeg|webp)$")
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
_TMP_PREFIX = ".tmp-"
_STALE_TMP_S = 3600.0  # a temporary file this old was left by a writer that died mid-write


@dataclass(frozen=True)
class StoredImage:
    data: bytes
    media_type: str
    expires_in_s: float


def check_folder(folder: Path) -> None:
    """`vqdm serve` start-up: the configured folder exists (or is made) and this process can write
    in it; else one line naming it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(prefix=_TMP_PREFIX, dir=folder):
            pass
    except OSError as e:
        raise ConfigError(f"image_store_dir {folder}: cannot write there ({e.strerror or e})") from None


class ImageStore:
    """`clock` is wall-clock seconds (files' mtimes compare against it, across replicas too);
    tests pass their own."""

    def __init__(self, folder: Path | None, max_bytes: int, ttl_s: float, metrics: Metrics | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.private = folder is None
        self.folder = Path(tempfile.mkdtemp(prefix="vqdm-images-")) if folder is None else Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_bytes, self.ttl_s, self.metrics, self.clock = max_bytes, ttl_s, metrics, clock

    def put(self, blobs: list[bytes], fmt: str) -> list[str]:
        """Store each encoded image (`fmt` png, jpeg or webp); returns their ids. The files just
        written are never evicted by this call, so the folder may exceed the cap by one reply."""
        ids = []
        now = self.clock()
        for blob in blobs:
            file_id = "file-" + secrets.token_hex(16)
            fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=self.folder)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(blob)
                os.utime(tmp, ns=(int(now * 1e9),) * 2)
                os.replace(tmp, self.folder / f"{file_id}.{fmt}")
            except BaseException:
                _unlink(Path(tmp))  # a full disk leaves no half file behind
                raise
            ids.append(file_id)
        self.sweep(keep=set(ids))
        return ids

    def get(self, file_id: str) -> StoredImage | None:
        """The image, or None when the id is malformed, unknown, evicted or expired (the caller
        answers each alike)."""
        if not ID_RE.match(file_id):
            return None
        for fmt, media_type in MEDIA_TYPES.items():
            path = self.folder / f"{file_id}.{fmt}"
            try:
                f = open(path, "rb")  # once open, an eviction elsewhere cannot cut the read short
            except FileNotFoundError:
                continue
            with f:
                left = os.fstat(f.fileno()).st_mtime + self.ttl_s - self.clock()
                if left > 0:
                    return StoredImage(f.read(), media_type, left)
            self._remove(path, "expired")
            return None
        return None

    def sweep(self, keep: frozenset[str] | set[str] = frozenset()) -> None:
        """Remove expired files, then the oldest until the folder is within the cap (never those in
        `keep`); set the gauges to what stays."""
        now = self.clock()
        files = []  # (mtime ns, name, size, id)
        for entry in os.scandir(self.folder):
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # removed meanwhile (by another replica)
            if entry.name.startswith(_TMP_PREFIX):
                if st.st_mtime + _STALE_TMP_S <= now:
                    _unlink(Path(entry.path))
                continue
            m = _NAME_RE.match(entry.name)
            if m is None:
                continue  # not ours: never touched
            if st.st_mtime + self.ttl_s <= now and m.group(1) not in keep:
                self._remove(Path(entry.path), "expired")
            else:
                files.append((st.st_mtime_ns, entry.name, st.st_size, m.group(1)))
        files.sort()
        total = sum(f[2] for f in files)
        kept = 0
        for _, name, size, file_id in files:  # oldest first
            if total > self.max_bytes and file_id not in keep:
                self._remove(self.folder / name, "size")
                total -= size
            else:
                kept += 1
        if self.metrics is not None:
            self.metrics.image_store_bytes.set(total)
            self.metrics.image_store_files.set(kept)

    def close(self) -> None:
        """Remove the folder if it is this server's private one (a shared folder stays)."""
        if self.private:
            shutil.rmtree(self.folder, ignore_errors=True)

    def _remove(self, path: Path, reason: str) -> None:
        if _unlink(path) and self.metrics is not None:
            self.metrics.image_store_evictions.labels(reason).inc()


def _unlink(path: Path) -> bool:
    try:
        path.unlink()
        return True
    except FileNotFoundError:
        return False


@dataclass(frozen=True)
class ImageLinks:
    """Where a url reply's images go, and the base URL its links start with."""

    store: ImageStore
    base_url: str

    def save(self, images: list, fmt: str, compression: int | None) -> list[str]:
        """Encode and store `images` (PIL); their URLs. Worker thread: encoding and file I/O."""
        blobs = [encode_image(im, fmt, compression) for im in images]
        try:
            ids = self.store.put(blobs, fmt)
        except OSError as e:  # a full or unmounted volume: the operator's to fix, the client's to retry
            log.error("image store %s: cannot write: %s", self.store.folder, e)
            raise APIError(503, "could not store the image for a url reply (the server log says why); retry, or "
                                "use response_format b64_json", code="image_store_failed", reason="image_store",
                           headers={"Retry-After": "5"}) from None
        return [f"{self.base_url}{FILES_PREFIX}/{file_id}/content" for file_id in ids]

"""The image store behind `response_format: "url"` (vqdm.server.image_store), on real folders with
an injected clock: the TTL, the size cap's eviction order, malformed ids, a folder two replicas
share, the temporary folder's removal, and the metrics."""
from __future__ import annotations

import os

import pytest

from vqdm.server.image_store import ID_RE, ImageStore
from vqdm.server.metrics import Metrics


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def blob(size: int, fill: int = 1) -> bytes:
    return bytes([fill]) * size


def test_ttl_expires_and_removes(tmp_path, tools):
    clock, metrics = Clock(), Metrics()
    store = ImageStore(tmp_path, max_bytes=1 << 20, ttl_s=60, metrics=metrics, clock=clock)
    [fid] = store.put([b"\x89PNG-bytes"], "png")
    clock.now += 59.5
    got = store.get(fid)
    assert got.data == b"\x89PNG-bytes" and got.media_type == "image/png" and got.expires_in_s == pytest.approx(0.5)
    clock.now += 0.5
    assert store.get(fid) is None
    assert not list(tmp_path.iterdir())  # asked for once expired, the file is gone
    samples = tools.metric_samples(metrics.exposition().decode())
    assert samples[("vqdm_image_store_evictions_total", (("reason", "expired"),))] == 1
    # Expired files nobody asks for go at the next write's sweep.
    old = store.put([blob(10)], "webp")
    clock.now += 61
    new = store.put([blob(10)], "jpeg")
    assert store.get(old[0]) is None and store.get(new[0]).media_type == "image/jpeg"
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{new[0]}.jpeg"]


def test_size_cap_evicts_oldest_first(tmp_path, tools):
    clock, metrics = Clock(), Metrics()
    store = ImageStore(tmp_path, max_bytes=1 << 20, ttl_s=3600, metrics=metrics, clock=clock)
    size = 300 << 10
    ids = []
    for i in range(3):  # 900 KiB, within the 1 MiB cap
        ids += store.put([blob(size, i)], "png")
        clock.now += 1
    assert all(store.get(i) is not None for i in ids)
    [fourth] = store.put([blob(size, 3)], "png")  # 1.2 MiB: the oldest goes
    assert store.get(ids[0]) is None
    assert [store.get(i).data[0] for i in (*ids[1:], fourth)] == [1, 2, 3]
    clock.now += 1
    two = store.put([blob(size, 4), blob(size, 5)], "png")  # two more: the next two oldest go
    assert store.get(ids[1]) is None and store.get(ids[2]) is None
    assert [store.get(i).data[0] for i in (fourth, *two)] == [3, 4, 5]
    samples = tools.metric_samples(metrics.exposition().decode())
    assert samples[("vqdm_image_store_evictions_total", (("reason", "size"),))] == 3
    assert samples[("vqdm_image_store_files", ())] == 3
    assert samples[("vqdm_image_store_bytes", ())] == 3 * size == sum(p.stat().st_size for p in tmp_path.iterdir())


def test_a_reply_larger_than_the_cap_keeps_its_own_images(tmp_path):
    store = ImageStore(tmp_path, max_bytes=1 << 20, ttl_s=3600, clock=Clock())
    [old] = store.put([blob(100)], "png")
    big = store.put([blob(700 << 10), blob(700 << 10)], "png")
    assert store.get(old) is None and all(store.get(i) is not None for i in big)


@pytest.mark.parametrize("bad", ["", "file-", "file-" + "0" * 31, "file-" + "0" * 33, "file-" + "A" * 32,
                                 "../../etc/passwd", "file-" + "0" * 32 + ".png", "file-" + "0" * 32 + "/..",
                                 "/etc/passwd", "file-" + "0" * 32 + "\x00", "x" * 10_000])
def test_malformed_ids_are_refused_before_any_path(tmp_path, bad):
    store = ImageStore(tmp_path / "store", max_bytes=1 << 20, ttl_s=60, clock=Clock())
    (tmp_path / "passwd").write_bytes(b"secret")
    assert store.get(bad) is None


def test_ids_are_128_random_bits(tmp_path):
    store = ImageStore(tmp_path, max_bytes=1 << 30, ttl_s=60, clock=Clock())
    ids = store.put([b"x"] * 200, "png")
    assert all(ID_RE.match(i) for i in ids) and len(set(ids)) == 200
    # Every hex digit varies across ids: none is a counter or a fixed prefix.
    assert all(len({i[5 + k] for i in ids}) > 8 for k in range(32))


def test_two_replicas_share_one_folder(tmp_path):
    """Either replica serves what the other stored, and the cap holds over the whole folder."""
    clock = Clock()
    a = ImageStore(tmp_path, max_bytes=1 << 20, ttl_s=60, clock=clock)
    b = ImageStore(tmp_path, max_bytes=1 << 20, ttl_s=60, clock=clock)
    [from_a] = a.put([blob(600 << 10, 7)], "png")
    assert b.get(from_a).data == blob(600 << 10, 7)
    clock.now += 1
    [from_b] = b.put([blob(600 << 10, 8)], "webp")  # over the shared cap: b removes a's older file
    assert a.get(from_a) is None and a.get(from_b).media_type == "image/webp"
    b.close()
    a.close()
    assert tmp_path.is_dir() and len(list(tmp_path.iterdir())) == 1  # a configured folder stays


def test_private_folder_is_removed_at_close_and_other_files_are_left_alone(tmp_path):
    store = ImageStore(None, max_bytes=1 << 20, ttl_s=60)
    assert oct(store.folder.stat().st_mode & 0o777) == "0o700"
    store.put([b"x"], "png")
    store.close()
    assert not store.folder.exists()

    shared = ImageStore(tmp_path, max_bytes=1 << 20, ttl_s=60, clock=Clock(2e9))
    (tmp_path / "notes.txt").write_bytes(blob(2 << 20))  # not the store's: never counted, never removed
    stale = tmp_path / ".tmp-dead-writer"
    stale.write_bytes(b"half")
    os.utime(stale, (1e9, 1e9))
    shared.put([b"x"], "png")
    assert (tmp_path / "notes.txt").exists() and not stale.exists()

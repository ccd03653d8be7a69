"""The data directory: key file, crash-safe message log with group commit, ledger view, lock."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import random
import stat
import zlib

import pytest

from p2pml.store import (
    KEY_FILE,
    LEDGER_FILE,
    LOG_FILE,
    LOG_MAGIC,
    MAX_RECORD_BYTES,
    RECORD_HEADER,
    RUNNING_FILE,
    DataDir,
    StoreError,
    default_data_dir,
)


class Dirs:
    """Opens DataDirs and closes, at teardown, every one a test left open (even a failing one)."""

    def __init__(self):
        self.open: list[DataDir] = []

    def __call__(self, path) -> DataDir:
        d = DataDir(path)
        self.open.append(d)
        return d

    def close(self, d: DataDir) -> None:
        self.open.remove(d)
        d.close()


@pytest.fixture
def opened():
    dirs = Dirs()
    yield dirs
    for d in dirs.open:
        d.close()


def frame(record: bytes) -> bytes:
    return RECORD_HEADER.pack(len(record), zlib.crc32(record)) + record


def records(n: int, size: int = 20) -> list[bytes]:
    return [f"record-{i:04d}-".encode() + bytes([i % 256]) * size for i in range(n)]


def log_bytes(path) -> bytes:
    return (path / LOG_FILE).read_bytes()


def fail_fsync_once(monkeypatch):
    real = os.fsync
    calls = {"n": 0}

    def fsync(fd):
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(28, "No space left on device")
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def reread(path, opened) -> list[bytes]:
    d = opened(path)
    try:
        return d.read_log()
    finally:
        opened.close(d)


# -- message log -------------------------------------------------------------------------------


def test_fresh_log(tmp_path, opened):
    d = opened(tmp_path / "data")
    assert d.read_log() == []
    assert log_bytes(d.path) == LOG_MAGIC
    assert d.read_log() == []  # the existing, empty log reads the same
    assert log_bytes(d.path) == LOG_MAGIC


def test_data_dir_created_owner_only(tmp_path, opened):
    d = opened(tmp_path / "a" / "b")
    assert d.path.is_dir()
    assert stat.S_IMODE(d.path.stat().st_mode) & 0o077 == 0


def test_commit_now_round_trip(tmp_path, opened):
    d = opened(tmp_path)
    d.read_log()
    recs = records(5) + [b"", b"\x00" * 1000]
    d.append(recs[:3])
    d.commit_now()
    d.append(recs[3:])
    d.commit_now()
    d.commit_now()  # nothing pending: writes nothing
    opened.close(d)
    assert log_bytes(tmp_path) == LOG_MAGIC + b"".join(frame(r) for r in recs)
    assert reread(tmp_path, opened) == recs


def test_appended_but_not_committed_is_not_written(tmp_path, opened):
    d = opened(tmp_path)
    d.read_log()
    d.append([b"durable"])
    d.commit_now()
    d.append([b"pending"])
    assert reread_bytes_after_magic(tmp_path) == frame(b"durable")


def reread_bytes_after_magic(path) -> bytes:
    return log_bytes(path)[len(LOG_MAGIC):]


async def test_async_commit_round_trip(tmp_path, opened):
    d = opened(tmp_path)
    assert d.read_log() == []
    recs = records(10)
    for r in recs[:4]:
        d.append([r])
    await d.commit()
    assert reread_bytes_after_magic(tmp_path) == b"".join(frame(r) for r in recs[:4])
    d.append(recs[4:])
    await d.commit()
    await d.commit()  # nothing pending
    opened.close(d)
    assert reread(tmp_path, opened) == recs


def test_records_survive_several_restarts(tmp_path, opened):
    expected = []
    for round_ in range(3):
        d = opened(tmp_path)
        assert d.read_log() == expected
        new = [f"restart {round_} item {i}".encode() for i in range(3)]
        d.append(new)
        d.commit_now()
        expected += new
        opened.close(d)
    assert reread(tmp_path, opened) == expected


def write_log(path, recs: list[bytes], tail: bytes = b"") -> bytes:
    data = LOG_MAGIC + b"".join(frame(r) for r in recs) + tail
    path.mkdir(parents=True, exist_ok=True)
    (path / LOG_FILE).write_bytes(data)
    return data


@pytest.mark.parametrize("cut", [1, 4, 8, 9, 15])
def test_torn_tail_record_is_dropped(tmp_path, opened, cut):
    recs = records(3)
    good = LOG_MAGIC + frame(recs[0]) + frame(recs[1])
    full = write_log(tmp_path, recs)
    with open(tmp_path / LOG_FILE, "r+b") as f:
        f.truncate(len(good) + cut)  # inside the third record's header or payload
    assert len(good) + cut < len(full)
    d = opened(tmp_path)
    assert d.read_log() == recs[:2]
    assert log_bytes(tmp_path) == good  # truncated to the last intact record
    # New records follow the intact ones and read back after a restart.
    d.append([b"after the crash"])
    d.commit_now()
    opened.close(d)
    assert reread(tmp_path, opened) == recs[:2] + [b"after the crash"]


def test_dropped_tail_is_logged(tmp_path, opened, caplog):
    recs = records(2)
    write_log(tmp_path, recs, tail=b"\x00\x00")
    with caplog.at_level(logging.WARNING, logger="p2pml.store"):
        assert opened(tmp_path).read_log() == recs
    assert any("dropping 2 damaged bytes" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("tail", [b"\x00", b"\x00\x00\x00\x05", b"\x00\x00\x00\x05\xab\xcd\xef",
                                  RECORD_HEADER.pack(MAX_RECORD_BYTES + 1, 0) + b"x" * 10,
                                  RECORD_HEADER.pack(2**32 - 1, 0)],
                         ids=["1-byte", "half-header", "7-byte", "oversized", "max-length"])
def test_torn_or_impossible_header_is_dropped(tmp_path, opened, tail):
    recs = records(4)
    good = write_log(tmp_path, recs)
    with open(tmp_path / LOG_FILE, "ab") as f:
        f.write(tail)
    d = opened(tmp_path)
    assert d.read_log() == recs
    assert log_bytes(tmp_path) == good


@pytest.mark.parametrize("where", ["payload", "crc", "length"])
def test_corrupt_record_and_everything_after_dropped(tmp_path, opened, where):
    recs = records(5)
    data = bytearray(write_log(tmp_path, recs))
    start = len(LOG_MAGIC) + len(frame(recs[0])) + len(frame(recs[1]))  # the third record
    offset = {"payload": start + RECORD_HEADER.size + 3, "crc": start + 5, "length": start + 3}[where]
    data[offset] ^= 0x01 if where != "length" else 0x02  # length - 2 or + 2: the CRC no longer fits
    (tmp_path / LOG_FILE).write_bytes(bytes(data))
    d = opened(tmp_path)
    assert d.read_log() == recs[:2]
    assert log_bytes(tmp_path) == LOG_MAGIC + frame(recs[0]) + frame(recs[1])
    opened.close(d)
    assert reread(tmp_path, opened) == recs[:2]  # stable: a second read drops nothing more


def test_corrupt_first_record_leaves_empty_log(tmp_path, opened):
    recs = records(2)
    data = bytearray(write_log(tmp_path, recs))
    data[-1] ^= 0xFF
    data[len(LOG_MAGIC) + RECORD_HEADER.size] ^= 0xFF
    (tmp_path / LOG_FILE).write_bytes(bytes(data))
    assert reread(tmp_path, opened) == []
    assert log_bytes(tmp_path) == LOG_MAGIC


@pytest.mark.parametrize("content", [b"P2PMLOG2\n" + frame(b"x"), b"not a log at all", b"P2PMX"],
                         ids=["other-version", "garbage", "short"])
def test_wrong_header_raises_naming_the_file(tmp_path, opened, content):
    (tmp_path / LOG_FILE).write_bytes(content)
    d = opened(tmp_path)
    with pytest.raises(StoreError) as info:
        d.read_log()
    assert str(tmp_path / LOG_FILE) in str(info.value)
    assert (tmp_path / LOG_FILE).read_bytes() == content  # someone else's file is left alone


async def test_concurrent_commits(tmp_path, opened):
    d = opened(tmp_path)
    d.read_log()
    rng = random.Random(1234)
    n_tasks, per_task = 60, 3
    done = []

    async def worker(i: int) -> None:
        for k in range(per_task):
            record = f"task {i:03d} record {k}".encode()
            d.append([record])
            if rng.random() < 0.5:
                await asyncio.sleep(0)
            await d.commit()
            # commit() returned: this record is durable now.
            assert frame(record) in reread_bytes_after_magic(tmp_path)
            if rng.random() < 0.3:
                await asyncio.sleep(0)
        done.append(i)

    await asyncio.wait_for(asyncio.gather(*(worker(i) for i in range(n_tasks))), timeout=30)
    assert sorted(done) == list(range(n_tasks))
    opened.close(d)
    got = reread(tmp_path, opened)
    expected = {f"task {i:03d} record {k}".encode() for i in range(n_tasks) for k in range(per_task)}
    assert len(got) == len(expected)  # nothing written twice
    assert set(got) == expected
    for i in range(n_tasks):  # each task's records in its own order
        mine = [r for r in got if r.startswith(f"task {i:03d} ".encode())]
        assert mine == sorted(mine)


async def test_concurrent_commits_share_writes(tmp_path, opened, monkeypatch):
    """Group commit: callers that arrive while a write is in flight are served by one more write
    (two fsyncs for 21 commits, not 21)."""
    import os

    d = opened(tmp_path)
    d.read_log()
    fsyncs, real_fsync = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (fsyncs.append(fd), real_fsync(fd))[1])
    d.append([b"first"])
    first = asyncio.create_task(d.commit())
    await asyncio.sleep(0)  # first is now writing
    assert d._commit is not None
    followers = []
    for i in range(20):
        d.append([f"follower {i}".encode()])
        followers.append(asyncio.create_task(d.commit()))
    await asyncio.wait_for(asyncio.gather(first, *followers), timeout=10)
    assert 1 <= len(fsyncs) <= 2, fsyncs
    opened.close(d)
    assert reread(tmp_path, opened) == [b"first"] + [f"follower {i}".encode() for i in range(20)]


@pytest.mark.parametrize("content", [b"", LOG_MAGIC[:4]], ids=["empty", "torn-magic"])
def test_log_torn_during_creation_starts_empty(tmp_path, opened, content):
    (tmp_path / LOG_FILE).write_bytes(content)
    assert opened(tmp_path).read_log() == []
    assert log_bytes(tmp_path) == LOG_MAGIC


async def test_cancelled_committer_does_not_cancel_the_others(tmp_path, opened):
    d = opened(tmp_path)
    d.read_log()
    d.append([b"leader"])
    leader = asyncio.create_task(d.commit())
    await asyncio.sleep(0)  # the leader's write is now in flight
    d.append([b"follower"])
    follower = asyncio.create_task(d.commit())
    await asyncio.sleep(0)  # the follower waits for the leader's write
    leader.cancel()
    results = await asyncio.gather(leader, follower, return_exceptions=True)
    assert isinstance(results[0], asyncio.CancelledError)
    # Let the leader's (uncancellable) write in its thread finish before anything else.
    for _ in range(500):
        if frame(b"leader") in reread_bytes_after_magic(tmp_path):
            break
        await asyncio.sleep(0.01)
    assert not follower.cancelled(), "a caller nobody cancelled ended cancelled"
    assert results[1] is None
    assert frame(b"follower") in reread_bytes_after_magic(tmp_path)


# -- ledger view -------------------------------------------------------------------------------


def test_write_ledger(tmp_path, opened):
    d = opened(tmp_path)
    view = {"peers": {"ab" * 16: {"name": "ada", "stake": 1000}}, "rounds": 3, "note": "ünïcode"}
    d.write_ledger(view)
    assert json.loads((tmp_path / LEDGER_FILE).read_text(encoding="utf-8")) == view
    view2 = {"peers": {}, "rounds": 4}
    d.write_ledger(view2)
    assert json.loads((tmp_path / LEDGER_FILE).read_text(encoding="utf-8")) == view2
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


# -- key file ----------------------------------------------------------------------------------


def test_key_created_owner_only_and_reloaded(tmp_path, opened):
    seed = bytes(range(32))
    calls = []

    def generate():
        calls.append(1)
        return seed

    d = opened(tmp_path)
    assert d.load_or_create_seed(generate) == seed
    path = tmp_path / KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes() == seed
    opened.close(d)

    def must_not_generate():
        raise AssertionError("an existing key must be loaded, not replaced")

    d = opened(tmp_path)
    assert d.load_or_create_seed(must_not_generate) == seed
    assert calls == [1]
    assert path.read_bytes() == seed


def test_key_created_owner_only_despite_permissive_umask(tmp_path, opened):
    old = os.umask(0)
    try:
        opened(tmp_path).load_or_create_seed(lambda: os.urandom(32))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / KEY_FILE).stat().st_mode) == 0o600


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_key_readable_by_others_rejected(tmp_path, opened, mode):
    d = opened(tmp_path)
    d.load_or_create_seed(lambda: os.urandom(32))
    path = tmp_path / KEY_FILE
    os.chmod(path, mode)
    with pytest.raises(StoreError) as info:
        d.load_or_create_seed(lambda: os.urandom(32))
    assert str(path) in str(info.value) and "chmod 600" in str(info.value)


@pytest.mark.parametrize("size", [0, 31, 33, 64])
def test_damaged_key_rejected(tmp_path, opened, size):
    path = tmp_path / KEY_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(b"k" * size)
    d = opened(tmp_path)
    with pytest.raises(StoreError) as info:
        d.load_or_create_seed(lambda: os.urandom(32))
    assert str(path) in str(info.value) and f"{size} bytes" in str(info.value)
    assert path.read_bytes() == b"k" * size  # not overwritten


# -- lock ----------------------------------------------------------------------------------------


def test_running_marker_tells_a_crash_from_a_clean_stop(tmp_path, opened):
    d = opened(tmp_path)
    assert d.last_run_crashed() is False  # a fresh data dir: nothing ran before
    d.begin_run()
    d.begin_run()  # idempotent
    assert (tmp_path / RUNNING_FILE).exists()
    opened.close(d)  # closed without end_run: as after kill -9
    d = opened(tmp_path)
    assert d.last_run_crashed() is True
    d.end_run()
    assert not (tmp_path / RUNNING_FILE).exists()
    d.end_run()  # nothing to remove: no error
    opened.close(d)
    d = opened(tmp_path)
    assert d.last_run_crashed() is False


def test_second_data_dir_refused_while_open(tmp_path, opened):
    first = opened(tmp_path)
    with pytest.raises(StoreError, match="in use"):
        DataDir(tmp_path)
    with pytest.raises(StoreError) as info:
        DataDir(tmp_path)
    assert str(tmp_path) in str(info.value)
    opened.close(first)
    second = opened(tmp_path)
    assert second.read_log() == []
    with pytest.raises(StoreError, match="in use"):
        DataDir(tmp_path)


def test_lock_is_per_directory(tmp_path, opened):
    opened(tmp_path / "one")
    opened(tmp_path / "two")  # a different directory is not blocked


def test_default_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert default_data_dir(8003) == tmp_path / "p2pml" / "peer-8003"
    assert default_data_dir(8003) != default_data_dir(8004)


async def test_background_commit_drains_what_arrives_during_another_commit(tmp_path, opened):
    d = opened(tmp_path)
    d.read_log()
    d.append([b"vote"])
    first = asyncio.create_task(d.commit())
    await asyncio.sleep(0)  # a commit is in flight
    d.append([b"ws-batch"])
    d.commit_soon()  # unacknowledged intake: nobody waits
    await first
    for _ in range(200):
        if not d._pending and not d._soon:
            break
        await asyncio.sleep(0.01)
    opened.close(d)
    assert reread(tmp_path, opened) == [b"vote", b"ws-batch"]


async def test_failed_write_is_cut_back_and_retried(tmp_path, opened, monkeypatch):
    d = opened(tmp_path)
    d.read_log()
    d.append([b"first"])
    await d.commit()
    fail_fsync_once(monkeypatch)
    d.append([b"second"])
    with pytest.raises(OSError):
        await d.commit()
    d.append([b"third"])
    await d.commit()  # acknowledged: it must survive a restart, behind nothing torn
    opened.close(d)
    assert reread(tmp_path, opened) == [b"first", b"second", b"third"]


async def test_records_are_read_back_by_the_offset_append_gave(tmp_path, opened, monkeypatch):
    """What lets a node keep old envelopes on disk only: ``append`` says where each record will
    be, ``durable_end`` says when it is there, ``read_at`` reads it back, after a failed and
    retried write and after a restart (``read_records`` gives the same offsets)."""
    d = opened(tmp_path)
    d.read_log()
    recs = records(6, size=37) + [b""]
    where = d.append(recs[:3])
    assert d.durable_end <= where[0]
    await d.commit()
    assert d.durable_end > where[-1]
    fail_fsync_once(monkeypatch)
    where += d.append(recs[3:5])
    with pytest.raises(OSError):
        await d.commit()
    assert d.durable_end <= where[3]  # cut back: not there
    where += d.append(recs[5:])
    await d.commit()
    assert [d.read_at(w) for w in where] == recs
    for bad in (where[1] + 1, d.durable_end, 0):
        with pytest.raises(StoreError, match="no intact record"):
            d.read_at(bad)
    opened.close(d)
    d = opened(tmp_path)
    assert d.read_records() == list(zip(where, recs))
    assert d.append([b"after"]) == [d.durable_end]
    d.commit_now()
    assert d.read_at(d.read_records()[-1][0]) == b"after"


async def test_holdings_keep_only_the_latest_envelopes_in_memory(tmp_path, opened):
    """Older envelopes leave memory once durable in the log, and are read back from it;
    one not yet durable stays in memory whatever its age."""
    import hashlib

    from p2pml.gossip import Holdings

    d = opened(tmp_path)
    d.read_log()
    h = Holdings(2, d.read_at, lambda: d.durable_end)
    recs = records(6)
    ids = [hashlib.sha256(r).digest() for r in recs]
    for mid, raw in zip(ids[:4], recs[:4]):
        h.add(mid, raw, d.append([raw])[0])
    assert len(list(h.recent())) == 4  # nothing durable yet: all kept
    await d.commit()
    for mid, raw in zip(ids[4:], recs[4:]):
        h.add(mid, raw, d.append([raw])[0])
    assert [mid for mid, _ in h.recent()] == ids[4:]  # the latest two (not durable yet)
    assert len(h) == 6 and all(mid in h for mid in ids)
    view = h.id_view()
    assert sorted(view[i] for i in range(len(view))) == sorted(ids)
    # anti-entropy lists the ids of a bucket from memory and from the compact table alike
    assert sorted(i for b in range(256) for i in h.bucket_ids(b)) == sorted(ids)
    for b in (ids[0][0], ids[5][0]):
        assert h.bucket_ids(b) == sorted(mid for mid in ids if mid[0] == b)
    assert [h.get(mid) for mid in ids] == recs
    assert h.get(b"\0" * 32) is None
    h.add(ids[0], b"again", None)  # a duplicate changes nothing
    assert len(h) == 6 and h.get(ids[0]) == recs[0]
    before = h.summary()
    assert h.differing(before) == []



async def test_a_failed_write_keeps_its_place_whoever_waits(tmp_path, opened, monkeypatch):
    """A failed write's records go back in front before anyone sees the write as over: a commit
    that starts right then, and a caller cancelled meanwhile, move no record off the offset
    ``append`` gave it."""
    for cancel in (False, True):
        d = opened(tmp_path / str(cancel))
        d.read_log()
        fail_fsync_once(monkeypatch)
        first = [f"first {i}".encode() + b"x" * 40 for i in range(3)]
        where = d.append(first)
        waiter = asyncio.ensure_future(d.commit())
        await asyncio.sleep(0)  # its write is in flight
        later = [f"later {i}".encode() + b"x" * 40 for i in range(3)]
        where += d.append(later)
        if cancel:
            waiter.cancel()
        while d._commit is not None and not d._commit.done():
            await asyncio.sleep(0)
        other = asyncio.ensure_future(d.commit())  # before the failed caller resumes
        await asyncio.gather(waiter, other, return_exceptions=True)
        await d.commit()
        assert [d.read_at(w) for w in where] == first + later, cancel
        opened.close(d)
        assert reread(tmp_path / str(cancel), opened) == first + later


async def test_a_write_torn_part_way_is_cut_back(tmp_path, opened):
    """A write that fails after part of it reached the file (disk full) is cut back, so the
    records after it are where ``append`` said, and survive a restart."""
    import resource
    import signal

    d = opened(tmp_path)
    d.read_log()
    recs = [f"record {i}".encode() + b"x" * 40 for i in range(6)]
    where = d.append(recs[:2])
    await d.commit()
    size = (tmp_path / LOG_FILE).stat().st_size
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG, as ENOSPC, not a kill
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (size + 30, hard))  # full 30 bytes on
        where += d.append(recs[2:4])
        with pytest.raises(OSError):
            await d.commit()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)
    assert (tmp_path / LOG_FILE).stat().st_size == size
    where += d.append(recs[4:])
    await d.commit()
    assert [d.read_at(w) for w in where] == recs
    opened.close(d)
    assert reread(tmp_path, opened) == recs


def test_sync_answers_reach_every_differing_bucket():
    """When more buckets differ than one /sync answer covers, the answered ones vary, so the
    last bucket is reached too (a peer lacking a registration keeps refusing its author's
    messages: always answering the first buckets starved it of the one it needed)."""
    import hashlib

    import msgpack

    from p2pml.gossip import BUCKETS, MAX_SYNC_BUCKETS, Gossip, Holdings

    h = Holdings()
    for b in range(BUCKETS):  # one message in every bucket
        n = 0
        while (mid := hashlib.sha256(bytes([b]) + n.to_bytes(4, "big")).digest())[0] != b:
            n += 1
        h.add(mid, b"envelope %d" % b)
    gossip = Gossip("ada", [], h, None, request_timeout_ms=1000, interval_ms=500)
    empty = Holdings().summary()
    seen = set()
    for _ in range(60):
        buckets, ids, settled = msgpack.unpackb(gossip.answer_sync(empty))
        assert len(buckets) == MAX_SYNC_BUCKETS == len(ids) and buckets == sorted(buckets) == settled
        seen |= set(buckets)
    assert seen == set(range(BUCKETS))


async def test_caught_up_after_fetching_what_a_complete_sync_listed():
    """A node is caught up with a peer (what lets it clear its crash marker) once every bucket
    has been settled by some sync: it matched, or the answer listed it whole and the node holds
    what it listed. Under constant load something is always missing at the moment of a sync,
    so "nothing missing" was never true and the marker stayed for good. A sync that answered
    only some of the differing buckets settles only those."""
    from p2pml.config import PeerConfig
    from p2pml.gossip import BUCKETS, MAX_SYNC_BUCKETS, Gossip, Holdings
    from p2pml.ledger import Query
    from p2pml.wire import Identity, message_id, pack

    gid = b"\x07" * 32
    author = Identity.from_seed(b"\x01" * 32)
    signed = [author.sign(gid, Query(n + 1, ((5.1, 3.5, 1.4, 0.2),))) for n in range(1200)]
    by_bucket = {}
    for s in signed:
        by_bucket.setdefault(s.msg.id[0], s)

    def holdings(messages):
        h = Holdings()
        for s in messages:
            h.add(s.msg.id, s.raw)
        return h

    def pair(ours, theirs):
        mine = holdings(ours)
        peer = Gossip("bo", [], holdings(theirs), None, request_timeout_ms=1000, interval_ms=500)

        async def ingest(envs, source):
            for key, body, _ in envs:
                mine.add(message_id(gid, key, body), pack([key, body, _]))
            return {"accepted": len(envs)}

        me = Gossip("ada", [PeerConfig("bo", "127.0.0.1", 1, "knn")], mine, ingest,
                    request_timeout_ms=1000, interval_ms=500)

        async def post(link, path, data):  # the peer's answers, without the network
            import msgpack
            asked = msgpack.unpackb(data)
            return peer.answer_sync(asked) if path == "/sync" else peer.answer_fetch(asked)

        me._post = post
        return me, mine

    few = list(by_bucket.values())[:10]  # the peer holds 10 messages we lack: a few buckets differ
    me, mine = pair([], few)
    await me.reconcile(me.links["bo"])
    assert all(s.msg.id in mine for s in few) and "bo" in me.caught_up

    every = list(by_bucket.values())  # one in every bucket: more differ than one answer covers
    assert len(every) == BUCKETS > MAX_SYNC_BUCKETS
    me, mine = pair([], every)
    await me.reconcile(me.links["bo"])
    assert sum(s.msg.id in mine for s in every) == MAX_SYNC_BUCKETS and "bo" not in me.caught_up
    for _ in range(200):  # the other buckets are answered in later syncs
        await me.reconcile(me.links["bo"])
        if "bo" in me.caught_up:
            break
    assert all(s.msg.id in mine for s in every) and "bo" in me.caught_up


def test_a_bucket_cut_short_by_the_answer_limit_is_not_settled(monkeypatch):
    """An answer lists at most MAX_SYNC_IDS ids: a bucket it cuts short is not settled (the
    asker cannot hold what was not listed), every matching one is."""
    import hashlib

    import msgpack

    from p2pml import gossip as g

    monkeypatch.setattr(g, "MAX_SYNC_IDS", 3)
    h = g.Holdings()
    n = 0
    while len(h) < 5:  # five messages in bucket 7
        mid = hashlib.sha256(n.to_bytes(4, "big")).digest()
        if mid[0] == 7:
            h.add(mid, b"envelope")
        n += 1
    peer = g.Gossip("bo", [], h, None, request_timeout_ms=1000, interval_ms=500)
    buckets, ids, settled = msgpack.unpackb(peer.answer_sync(g.Holdings().summary()))
    assert buckets == [7] and len(ids) == 3
    assert settled == [b for b in range(g.BUCKETS) if b != 7]


@functools.cache
def _signed_queries(n: int) -> tuple:
    """``n`` signed one-row queries by one author (signing thousands takes a while: once)."""
    from p2pml.ledger import Query
    from p2pml.wire import Identity

    author = Identity.from_seed(b"\x01" * 32)
    return tuple(author.sign(SYNC_GID, Query(k + 1, ((5.1, 3.5, 1.4, 0.2),))) for k in range(n))


SYNC_GID = b"\x07" * 32


def _in_fullest_bucket(n: int) -> tuple[int, list]:
    """The bucket holding the most of ``_signed_queries(n)``, and those messages, by id."""
    by_bucket: dict[int, list] = {}
    for s in _signed_queries(n):
        by_bucket.setdefault(s.msg.id[0], []).append(s)
    big = max(range(255), key=lambda b: len(by_bucket.get(b, ())))
    return big, sorted(by_bucket[big], key=lambda s: s.msg.id)


def _sync_pair(theirs, ours=(), accept=lambda mid, mine: True, serve=lambda ids: ids,
               old_fields: int = 3, refuses_pages: bool = False):
    """A node ("ada") holding ``ours`` and a peer ("bo") holding ``theirs``, the node's
    requests answered by the peer's own /sync and /fetch code without the network. ``accept``
    decides which fetched messages the node takes (the others are refused, as for a missing
    registration); ``serve`` which asked ids the peer's /fetch serves; an older peer answers
    ``old_fields`` fields, and refuses a paged /sync if ``refuses_pages``. Returns the node,
    its holdings, the peer's holdings, the pages each /sync sent (None if none) and what the
    node queued for the peer."""
    import msgpack

    from p2pml import gossip as g
    from p2pml.config import PeerConfig
    from p2pml.wire import message_id, pack

    peer_h, mine = g.Holdings(), g.Holdings()
    for s in theirs:
        peer_h.add(s.msg.id, s.raw)
    for s in ours:
        mine.add(s.msg.id, s.raw)
    peer = g.Gossip("bo", [], peer_h, None, request_timeout_ms=1000, interval_ms=500)

    async def ingest(envs, source):
        for key, body, sig in envs:
            mid = message_id(SYNC_GID, key, body)
            if accept(mid, mine):
                mine.add(mid, pack([key, body, sig]))
        return {"accepted": len(envs)}

    me = g.Gossip("ada", [PeerConfig("bo", "127.0.0.1", 1, "knn")], mine, ingest,
                  request_timeout_ms=1000, interval_ms=500)
    pages, pushed = [], []

    async def post(link, path, data):
        asked = msgpack.unpackb(data)
        if path == "/fetch":
            return peer.answer_fetch(serve(asked))
        paged = len(asked) == 2
        pages.append(asked[1] if paged else None)
        if paged and refuses_pages:
            return None
        return pack(msgpack.unpackb(peer.answer_sync(asked))[:old_fields])

    me._post = post
    me._enqueue = lambda link, envs: pushed.extend(envs)
    return me, mine, peer_h, pages, pushed


async def _reconcile_until_caught_up(me, times: int) -> None:
    for _ in range(times):
        await me.reconcile(me.links["bo"])
        if "bo" in me.caught_up:
            return


async def test_a_bucket_larger_than_one_answer_is_paged_through(monkeypatch):
    """A bucket holding more ids than one /sync answer lists is paged through: each answer lists
    its ids after the last one the asker holds, sorted, until the rest fits; then it is settled
    and the asker is caught up. Before, only its first MAX_SYNC_IDS ids ever travelled."""
    from p2pml import gossip as g

    monkeypatch.setattr(g, "MAX_SYNC_IDS", 3)
    _, bucket = _in_fullest_bucket(3000)
    theirs, ours = bucket[:-2], bucket[-2:]  # two the peer lacks
    assert len(theirs) >= 3 * g.MAX_SYNC_IDS  # three pages at least
    me, mine, _, asked_pages, pushed = _sync_pair(theirs, ours)
    await _reconcile_until_caught_up(me, len(theirs))
    assert all(s.msg.id in mine for s in theirs) and "bo" in me.caught_up
    assert asked_pages[0] is None  # the first sync asks with the digest alone (as before)
    pages = [p[0][1] for p in asked_pages[1:]]  # then on from the last id held, in order
    assert pages == sorted(pages) and len(pages) == len(set(pages)) >= 2
    assert me._pages["bo"] == {}  # settled: no page left
    # pushed back: what the peer lacks, each once; never what it listed or paged past
    assert sorted(pushed) == sorted(s.raw for s in ours)


def test_a_malformed_sync_page_is_refused():
    import hashlib

    import pytest

    from p2pml import gossip as g

    peer = g.Gossip("bo", [], g.Holdings(), None, request_timeout_ms=1000, interval_ms=500)
    digest = g.Holdings().summary()
    other = hashlib.sha256(b"x").digest()
    for pages, match in (("x", "at most"), ([[other[0] ^ 1, other]], "in that bucket"),
                         ([[1, b"short"]], "bucket, the id"), ([[1, other]] * 65, "at most")):
        with pytest.raises(ValueError, match=match):
            peer.answer_sync([digest, pages])


async def test_anti_entropy_goes_on_with_a_peer_that_does_not_page(monkeypatch):
    """An older peer answers [buckets, ids] (no settled list: nothing is paged with it), or
    refuses a paged /sync (the node then asks it without pages for PAGING_RETRY_S): either way
    what it gets later still reaches the node. (A review found both stopping anti-entropy with
    that peer for good.)"""
    from p2pml import gossip as g

    signed = _signed_queries(5200)
    me, mine, peer_h, syncs, _ = _sync_pair(signed[:20], old_fields=2)
    await me.reconcile(me.links["bo"])
    assert all(s.msg.id in mine for s in signed[:20]) and me._pages["bo"] == {}
    for s in signed[100:120]:
        peer_h.add(s.msg.id, s.raw)
    await me.reconcile(me.links["bo"])
    assert all(s.msg.id in mine for s in signed[100:120]) and syncs == [None, None]

    monkeypatch.setattr(g, "MAX_SYNC_IDS", 3)
    big, bucket = _in_fullest_bucket(3000)
    me, mine, peer_h, syncs, _ = _sync_pair(bucket, refuses_pages=True)
    await me.reconcile(me.links["bo"])  # cut short: a page is set
    assert me._pages["bo"]
    await me.reconcile(me.links["bo"])  # refused: no more pages for a while
    # (in buckets before the big one, which is larger: an answer of 3 ids lists them first)
    later = [s for s in signed[5000:] if s.msg.id[0] < big][:20]
    for s in later:
        peer_h.add(s.msg.id, s.raw)
    for _ in range(60):  # 3 ids an answer
        await me.reconcile(me.links["bo"])
    assert syncs[0] is None and syncs[1] is not None and not any(syncs[2:])
    assert all(s.msg.id in mine for s in later)


async def test_paging_passes_messages_refused_for_now(monkeypatch):
    """Messages refused until their author's registration arrives do not keep a bucket on its
    first page: the pages move on once each listed id was fetched (held or refused), so a
    registration further on in the bucket travels, and the next pass takes the rest (a bucket
    counts as settled only after a pass of pages that left nothing lacking)."""
    from p2pml import gossip as g

    monkeypatch.setattr(g, "MAX_SYNC_IDS", 3)
    _, bucket = _in_fullest_bucket(3000)
    registration = bucket[-1].msg.id  # stands for it: last in its bucket, the rest wait for it
    me, mine, _, _, _ = _sync_pair(bucket, accept=lambda mid, mine: mid == registration or registration in mine)
    await _reconcile_until_caught_up(me, 4 * len(bucket))
    assert all(s.msg.id in mine for s in bucket) and "bo" in me.caught_up


async def test_one_reconciliation_with_a_peer_at_a_time():
    """The start-up reconciliation and the periodic ones overlap: a second one with the same
    peer while one is under way does nothing (a review showed two at once paging on from
    state the other had changed, up to counting a bucket as covered that was not)."""
    import asyncio

    import msgpack

    from p2pml import gossip as g
    from p2pml.config import PeerConfig

    peer = g.Gossip("bo", [], g.Holdings(), None, request_timeout_ms=1000, interval_ms=500)
    me = g.Gossip("ada", [PeerConfig("bo", "127.0.0.1", 1, "knn"), PeerConfig("cy", "127.0.0.1", 2, "svm")],
                  g.Holdings(), None, request_timeout_ms=1000, interval_ms=500)
    release, syncs = asyncio.Event(), []

    async def post(link, path, data):
        syncs.append(link.cfg.name)
        await release.wait()
        return peer.answer_sync(msgpack.unpackb(data))

    me._post = post
    first = asyncio.ensure_future(me.reconcile(me.links["bo"]))
    await asyncio.sleep(0)
    await asyncio.wait_for(me.reconcile(me.links["bo"]), 1)  # returns at once: one is under way
    other = asyncio.ensure_future(me.reconcile(me.links["cy"]))  # another peer: goes ahead
    await asyncio.sleep(0)
    assert syncs == ["bo", "cy"]
    release.set()
    await asyncio.gather(first, other)
    await me.reconcile(me.links["bo"])  # and once it is over, the next one runs
    assert syncs == ["bo", "cy", "bo"] and "bo" in me.caught_up


async def test_a_bucket_that_keeps_differing_does_not_starve_the_others(monkeypatch):
    """A peer lists an id it cannot serve (its log lost it, or it lies): the bucket keeps
    differing, but its pages move on past that id (the fetch answer was not cut for size), and
    answers list the smallest buckets first, so a message in another bucket still travels."""
    from p2pml import gossip as g

    monkeypatch.setattr(g, "MAX_SYNC_IDS", 3)
    big, bucket = _in_fullest_bucket(4000)
    bucket = bucket[:9]
    other = next(s for s in _signed_queries(4000) if s.msg.id[0] > big)  # sorts after it
    lost = bucket[4].msg.id
    me, mine, _, _, _ = _sync_pair(bucket + [other], serve=lambda ids: [i for i in ids if i != lost])
    for _ in range(20):
        await me.reconcile(me.links["bo"])
    assert other.msg.id in mine
    assert sum(s.msg.id in mine for s in bucket) == 8 and lost not in mine
    assert "bo" not in me.caught_up  # the lost one is still lacking: never "caught up"


async def test_a_last_page_fetched_in_part_is_asked_again(monkeypatch):
    """When one sync cannot fetch every id its answer listed (at most FETCHES_PER_SYNC fetches of
    MAX_BATCH_MESSAGES ids), the page stays where it was, the last page of a bucket included:
    the next sync lists the same ids, not the bucket from its beginning."""
    from p2pml import gossip as g

    monkeypatch.setattr(g, "MAX_SYNC_IDS", 3)
    monkeypatch.setattr(g, "FETCHES_PER_SYNC", 1)
    monkeypatch.setattr(g, "MAX_BATCH_MESSAGES", 1)  # one id a sync
    _, bucket = _in_fullest_bucket(3000)
    bucket = bucket[:9]
    me, mine, _, pages, _ = _sync_pair(bucket)
    await _reconcile_until_caught_up(me, 40)
    assert all(s.msg.id in mine for s in bucket) and "bo" in me.caught_up
    assert len(pages) <= len(bucket) + 1  # one id a sync, and one sync to see it settled

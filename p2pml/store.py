"""A node's data directory: its key, its append-only message log, its ledger file.

Everything a node accepted is in ``messages.log`` as length- and CRC-framed records, written
before the node acknowledges it (group commit: one fsync covers every record queued meanwhile).
A torn or corrupt tail, as a crash mid-write leaves, is detected, logged and cut off; records
before it are kept. ``ledger.json`` is a derived view, replaced atomically; the log is the truth.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import queue
import struct
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

LOG_MAGIC = b"P2PMLOG1\n"  # file header: format name and version
RECORD_HEADER = struct.Struct(">II")  # payload length, CRC-32 of the payload
MAX_RECORD_BYTES = 1 << 20  # anything larger is corruption, not a message
READ_AHEAD = 4096  # bytes read_at asks for first (a record's header and, mostly, all of it)
KEY_FILE = "node.key"
LOG_FILE = "messages.log"
LEDGER_FILE = "ledger.json"
LOCK_FILE = "lock"
# Present while a node runs, removed once it stopped cleanly (everything it signed durable): at
# start, its presence means the last run ended in a crash, which may have lost votes this node
# had already sent (votes leave before their fsync; see Node.start).
RUNNING_FILE = "running"
# Unacknowledged intake waits this long for company before its fsync: one fsync per burst
# instead of one per gossip frame (fsync was the largest CPU cost per process after
# verification). Nobody waits on it; a crash may lose it; its senders hold it durably.
BACKGROUND_COMMIT_DELAY_S = 0.2
# Appended but not yet durable: beyond this (a disk that keeps failing), a node takes nothing
# more until the log catches up, so its memory stays bounded (peers resend, anti-entropy repairs).
MAX_UNWRITTEN_BYTES = 64 << 20


def _resolve(fut: asyncio.Future, outcome: int | Exception) -> None:
    if not fut.done():
        if isinstance(outcome, Exception):
            fut.set_exception(outcome)
        else:
            fut.set_result(outcome)


class StoreError(RuntimeError):
    """The data directory cannot be used; the message says why and what to do."""


def default_data_dir(port: int) -> Path:
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "p2pml" / f"peer-{port}"


def write_atomic(path: Path, data: bytes) -> None:
    """Temporary file, fsync, rename over, fsync the directory: old or new, never torn."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class DataDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._lock_fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StoreError(f"cannot use data dir {self.path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise StoreError(f"data dir {self.path} is in use by another running node") from None
        self._log = None
        self._pending: list[bytes] = []
        self._commit: asyncio.Future | None = None
        self._soon: set[asyncio.Task] = set()
        self._jobs: queue.SimpleQueue | None = None  # to the writer thread, started on first use
        self._writer_thread: threading.Thread | None = None
        self.damaged_tail = 0  # bytes cut off the log's end at the last read_log
        # Where the next appended record will start, and how far the log is durable: a record
        # is read back by its offset (``read_at``) once it is below ``durable_end``.
        self._end = 0
        self.durable_end = 0
        self._reader: int | None = None  # a read-only descriptor for read_at
        self._reader_lock = threading.Lock()

    # -- key ------------------------------------------------------------------------------------

    def load_or_create_seed(self, generate) -> bytes:
        """The 32-byte Ed25519 seed, created owner-only on first start."""
        path = self.path / KEY_FILE
        if path.exists():
            if path.stat().st_mode & 0o077:
                raise StoreError(f"{path} is readable by others; run: chmod 600 {path}")
            seed = path.read_bytes()
            if len(seed) != 32:
                raise StoreError(f"{path} is damaged ({len(seed)} bytes, expected 32)")
            return seed
        seed = generate()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(seed)
            f.flush()
            os.fsync(f.fileno())
        return seed

    # -- message log ----------------------------------------------------------------------------

    def read_log(self) -> list[bytes]:
        """All intact records; a damaged tail is logged and truncated away."""
        return [payload for _, payload in self.records()]

    def read_records(self) -> list[tuple[int, bytes]]:
        return list(self.records())

    def records(self) -> Iterator[tuple[int, bytes]]:
        """Every intact record with its offset (for ``read_at``), read a piece at a time (a
        long log is never in memory at once); once all are read, a damaged tail is logged and
        truncated away. Appends go after them."""
        path = self.path / LOG_FILE
        self._end = self.durable_end = len(LOG_MAGIC)
        if not path.exists():
            write_atomic(path, LOG_MAGIC)
            return
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(len(LOG_MAGIC))
            if len(head) < len(LOG_MAGIC) and LOG_MAGIC.startswith(head):
                log.warning("%s was torn while being created; starting it again", path)
                write_atomic(path, LOG_MAGIC)
                return
            if head != LOG_MAGIC:
                raise StoreError(f"{path} is not a p2pml v1 message log (unknown header "
                                 f"{head!r}); move it away to start empty")
            self.durable_end = size  # what is read back while reading is on the disk
            pos = len(LOG_MAGIC)
            count = 0
            while len(header := f.read(RECORD_HEADER.size)) == RECORD_HEADER.size:
                length, crc = RECORD_HEADER.unpack(header)
                if length > MAX_RECORD_BYTES:
                    break
                payload = f.read(length)
                if len(payload) != length or zlib.crc32(payload) != crc:
                    break
                yield pos, payload
                count += 1
                pos += RECORD_HEADER.size + length
        if pos < size:
            self.damaged_tail = size - pos
            log.warning("%s: dropping %d damaged bytes at offset %d after %d intact records",
                        path, size - pos, pos, count)
            with open(path, "r+b") as f:
                f.truncate(pos)
                f.flush()
                os.fsync(f.fileno())
        self._end = self.durable_end = pos

    def read_at(self, offset: int) -> bytes:
        """The record at ``offset`` (as ``append`` or ``records`` gave it), once durable.
        Raises StoreError if it is not there intact (the file was changed under the node)."""
        if self._reader is None:
            with self._reader_lock:  # the loop and a ledger rebuild's thread both read
                if self._reader is None:
                    self._reader = os.open(self.path / LOG_FILE, os.O_RDONLY)
        data = os.pread(self._reader, READ_AHEAD, offset)  # most records fit: one call
        if len(data) >= RECORD_HEADER.size:
            length, crc = RECORD_HEADER.unpack_from(data)
            if length <= MAX_RECORD_BYTES:
                payload = data[RECORD_HEADER.size:RECORD_HEADER.size + length]
                if len(payload) < length:
                    payload += os.pread(self._reader, length - len(payload),
                                        offset + RECORD_HEADER.size + len(payload))
                if len(payload) == length and zlib.crc32(payload) == crc:
                    return payload
        raise StoreError(f"{self.path / LOG_FILE}: no intact record at offset {offset}")

    def _open_log(self):
        if self._log is None:
            self._log = open(self.path / LOG_FILE, "ab")  # noqa: SIM115 - held open for appends
        return self._log

    def append(self, raws: list[bytes]) -> list[int]:
        """Queue records; they are written and fsynced by the next ``commit``. Returns where
        each will be: records are written in this order, and a failed write is cut back off and
        retried first, so the offsets hold (``read_at`` them once below ``durable_end``)."""
        if not self._end:  # appending without having read the log: after what is there
            path = self.path / LOG_FILE
            self._end = self.durable_end = path.stat().st_size if path.exists() else 0
        self._pending.extend(raws)
        offsets = []
        for raw in raws:
            offsets.append(self._end)
            self._end += RECORD_HEADER.size + len(raw)
        return offsets

    @property
    def unwritten(self) -> int:
        """Bytes appended and not yet durable."""
        return self._end - self.durable_end

    def backlog(self) -> str | None:
        """Why nothing more should be appended now (None: go on)."""
        if self.unwritten <= MAX_UNWRITTEN_BYTES:
            return None
        return (f"{self.unwritten / (1 << 20):.1f} MiB already accepted are waiting to be written "
                f"to {self.path / LOG_FILE} (writing it keeps failing); try again later")

    def _write(self, records: list[bytes], expected: int) -> int:
        """Append and fsync; on failure cut the file back to where it was, so that a torn
        write never sits in front of records written (and acknowledged) after it. Returns
        the log's durable end. ``expected``: where the file ends now (offsets were promised
        from there; anything else is refused loudly rather than served wrong later)."""
        f = self._open_log()
        start = f.tell()
        if start != expected:
            raise StoreError(f"{self.path / LOG_FILE} ends at {start}, not at {expected} where "
                             "its next record was promised")
        try:
            f.write(b"".join(RECORD_HEADER.pack(len(r), zlib.crc32(r)) + r for r in records))
            f.flush()
            os.fsync(f.fileno())
            return f.tell()
        except OSError:
            self._log = None
            try:
                f.close()  # flushes what is buffered again: may fail again; cut back anyway
            except OSError:
                pass
            with open(self.path / LOG_FILE, "r+b") as g:
                g.truncate(start)
                os.fsync(g.fileno())
            raise

    async def commit(self) -> None:
        """Make everything appended so far durable. Concurrent callers share one fsync; the
        write runs in its own task, so a caller that is cancelled cancels nobody else's commit."""
        while (inflight := self._commit) is not None and not inflight.done():
            await asyncio.shield(inflight)  # a write is in flight, and ours may not be in it
        if not self._pending:
            return
        records, self._pending = self._pending, []
        self._commit = self._in_writer(records)
        await asyncio.shield(self._commit)  # a failed write's records are back in _pending

    def _in_writer(self, records: list[bytes]) -> asyncio.Future:
        """``_write(records)`` in this log's own thread (fsync blocks; the loop must not). One
        long-lived thread fed by a queue costs about a third less per write than a thread-pool
        hand-off (``asyncio.to_thread``), and every commit pays it."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        done.add_done_callback(lambda f: f.exception())  # seen even if every waiter is gone
        if self._jobs is None:
            self._jobs = queue.SimpleQueue()
            self._writer_thread = threading.Thread(target=self._writer, args=(self._jobs,),
                                                   name=f"log {self.path.name}", daemon=True)
            self._writer_thread.start()
        self._jobs.put((records, self.durable_end, loop, done))  # one write at a time: it ends there
        return done

    def _writer(self, jobs: queue.SimpleQueue) -> None:
        # Waking this thread must not preempt the event loop's thread while that holds the GIL
        # (the loop then stalls until the writer drops the GIL again): under load, 7% of the GIL
        # samples sat on the hand-off; as a batch thread (woken, it waits for a free core or
        # the next tick), 2%.
        try:
            os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
        except (AttributeError, OSError):  # not Linux, or not allowed: the default policy
            pass
        while (job := jobs.get()) is not None:
            records, expected, loop, done = job
            try:
                outcome = self._write(records, expected)
            except Exception as exc:  # noqa: BLE001 - handed to the waiting commit
                outcome = exc
            try:
                loop.call_soon_threadsafe(self._finish, done, records, outcome)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass

    def commit_soon(self) -> None:
        """Make what is pending durable without anyone waiting: for intake that acknowledges
        nothing. One background task commits until nothing is pending."""
        if self._pending and not self._soon:
            task = asyncio.ensure_future(self._commit_all())
            self._soon.add(task)
            task.add_done_callback(self._soon.discard)

    async def _commit_all(self) -> None:
        while self._pending:
            await asyncio.sleep(BACKGROUND_COMMIT_DELAY_S)
            try:
                await self.commit()
            except OSError:
                await asyncio.sleep(1.0)  # logged by _finish; the disk may come back

    def _finish(self, done: asyncio.Future, records: list[bytes], outcome: int | Exception) -> None:
        """On the loop, before anyone sees the write as over: a failed write's records go
        back to the front of what is pending (whoever waited, even if nobody does any more),
        so they keep their place and offsets; a successful one moves ``durable_end``."""
        if self._commit is done:
            self._commit = None
        if isinstance(outcome, Exception):
            self._pending[:0] = records
            log.error("writing %s failed: %s", self.path / LOG_FILE, outcome)
            if isinstance(outcome, OSError):  # a broken promise of offsets is not retried
                self.commit_soon()  # retried until it works, whoever else writes or waits (or not)
        else:
            self.durable_end = max(self.durable_end, outcome)
        _resolve(done, outcome)

    def commit_now(self) -> None:
        """Synchronous commit, for start-up and shutdown."""
        records, self._pending = self._pending, []
        if records:
            try:
                self.durable_end = self._write(records, self.durable_end)
            except Exception:
                self._pending[:0] = records
                raise

    # -- running marker -------------------------------------------------------------------------

    def last_run_crashed(self) -> bool:
        """Whether the last run ended without ``end_run``: in a crash (or before it had caught
        up on what the crash may have lost, see Node.close)."""
        return (self.path / RUNNING_FILE).exists()

    def begin_run(self) -> None:
        """Mark this data dir as in use by a node that is about to send what it signs (durably)."""
        path = self.path / RUNNING_FILE
        if not path.exists():
            write_atomic(path, b"a p2pml node is running, or stopped without a clean shutdown\n")

    def end_run(self) -> None:
        """After everything this node signed is durable: the next start is a clean one."""
        path = self.path / RUNNING_FILE
        if path.exists():
            path.unlink()
            dir_fd = os.open(self.path, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    # -- ledger view ----------------------------------------------------------------------------

    def write_ledger(self, view: dict) -> None:
        data = json.dumps(view, indent=1, sort_keys=True).encode() + b"\n"
        write_atomic(self.path / LEDGER_FILE, data)

    def close(self) -> None:
        if self._jobs is not None:
            self._jobs.put(None)  # the writer ends once the writes queued before it are done
            self._writer_thread.join(30)
            self._jobs = self._writer_thread = None
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._reader is not None:
            os.close(self._reader)
            self._reader = None
        os.close(self._lock_fd)

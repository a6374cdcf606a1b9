"""The publisher's backlog on disk: append-only spill files with durable replay offsets, adopted from dead processes.

A spill file stays exclusively locked (``flock``) by its owner while the owner lives, so one that nobody holds
belongs to a process that died: any other publisher may adopt it and replay it. The owner's appends are
group-committed (``flywheel.groupcommit``): each is on stable storage within ``spill_fsync_ms``. An append the disk
refuses (full, quota) leaves the file as it was, so the caller can keep its events and try again later.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from flywheel.events import Event, Topic, encode, new_id
from flywheel.groupcommit import GroupCommit
from flywheel.storage import atomic_write_text

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Record:
    """One encoded event as sent to Kafka or stored in a spill file line."""

    topic: str
    key: bytes | None
    payload: bytes

    def line(self) -> bytes:
        # Tab-separated; the JSON payload never contains a raw tab or newline.
        return b"%s\t%s\t%s\n" % (self.topic.encode(), (self.key or b"").hex().encode(), self.payload)

    @classmethod
    def parse(cls, line: bytes) -> Record:
        topic, key, payload = line.split(b"\t", 2)
        return cls(Topic(topic.decode()).value, bytes.fromhex(key.decode()) or None, payload)

    @classmethod
    def of(cls, event: Event) -> Record:
        return cls(event.topic.value, event.key(), encode(event))


class SpillFile:
    """An append-only file of events plus how far it has been replayed; an exclusive lock marks its owner alive."""

    def __init__(self, path: Path, fd: int, fsync_interval: float | None = None, owner: str = "") -> None:
        self.path = path
        self._fd = fd
        self.size = os.fstat(fd).st_size
        self.offset = self._read_offset()
        #: Syncs the appends of a file this process writes (its thread is named after ``owner``); adopted files are
        #: only read.
        self.commit = GroupCommit(fd, owner, fsync_interval) if fsync_interval is not None else None

    @classmethod
    def create(cls, directory: Path, prefix: str, fsync_interval: float | None = None) -> SpillFile:
        """A new locked spill file; it only gets its final name once locked, so nobody adopts it by mistake.

        With ``fsync_interval`` (seconds) its appends are group-committed, and its name is on stable storage too.
        """
        directory.mkdir(parents=True, exist_ok=True)
        name = f"{prefix}-{new_id()}.spill"
        tmp = directory / f".{name}.new"
        fd = os.open(tmp, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.replace(tmp, directory / name)
            if fsync_interval is not None:
                # Without the directory entry on disk, synced appends would be lost with the file's name.
                _fsync_directory(directory)
        except OSError:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        return cls(directory / name, fd, fsync_interval, owner=prefix)

    @classmethod
    def adopt(cls, path: Path) -> SpillFile | None:
        """Take over the spill file of a process that died; None while its owner still holds the lock."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_APPEND)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        if not path.exists():
            # Another process adopted, replayed and removed it between our open and lock.
            os.close(fd)
            return None
        return cls(path, fd)

    @property
    def _offset_path(self) -> Path:
        return self.path.with_name(self.path.name + ".offset")

    def _read_offset(self) -> int:
        try:
            return min(int(self._offset_path.read_text()), self.size)
        except (FileNotFoundError, ValueError):
            return 0

    @property
    def pending(self) -> int:
        """Bytes not yet replayed."""
        return self.size - self.offset

    def append(self, data: bytes) -> None:
        """Append whole lines, all or none: on an error (``ENOSPC``, ...) the file is cut back and the error raised."""
        view = memoryview(data)
        try:
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
            if self.commit is not None:
                self.commit.appended()
        except OSError:
            # A half-written line would swallow the next append's first line on replay. Shrinking needs no space.
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self.size)
            raise
        self.size += len(data)

    def read(self, max_records: int) -> tuple[list[tuple[int, Record]], int, int]:
        """Up to ``max_records`` records from the replay offset: (line offset, record) pairs, end offset, bad lines."""
        size = 1 << 20
        while True:
            data = os.pread(self._fd, size, self.offset)
            end = data.rfind(b"\n")
            if end >= 0 or len(data) < size:
                break
            size *= 2
        records: list[tuple[int, Record]] = []
        bad = 0
        position = self.offset
        for line in data[: end + 1].splitlines(keepends=True):
            if len(records) == max_records:
                break
            try:
                records.append((position, Record.parse(line.rstrip(b"\n"))))
            except ValueError:
                bad += 1
            position += len(line)
        if end < 0 and data and self.offset + len(data) == self.size:
            # A torn last line, from a process killed mid-write: nothing can be recovered from it.
            bad += 1
            position = self.size
        return records, position, bad

    def advance(self, offset: int) -> None:
        """Mark everything before ``offset`` as delivered, durably."""
        self.offset = offset
        atomic_write_text(self._offset_path, str(offset))

    def reset(self) -> None:
        """Empty the fully replayed file so it can take new events."""
        os.ftruncate(self._fd, 0)
        self.size = self.offset = 0
        self._offset_path.unlink(missing_ok=True)

    def remove(self) -> None:
        """Delete the file and release it."""
        self.path.unlink(missing_ok=True)
        self._offset_path.unlink(missing_ok=True)
        self.close()

    def close(self) -> None:
        """Sync and release the file, leaving it for another process to adopt."""
        if self._fd < 0:
            return
        if self.commit is not None:
            self.commit.close()
        try:
            os.fsync(self._fd)
        except OSError as exc:
            logger.warning("cannot fsync %s before closing it (%s); its last appends may be lost on power loss",
                           self.path, exc)
        os.close(self._fd)
        self._fd = -1


class Backlog:
    """A publisher's own spill file (created on first use) and the adopted files of dead processes, replayed first.

    The own file's appends are fsynced within ``fsync_interval`` seconds (0: before each append returns).

    Not thread-safe: the publisher holds its lock around every call but ``find_orphans()``, ``read()`` and
    ``delivered()``, which only its own thread makes.
    """

    def __init__(self, directory: Path, prefix: str, max_bytes: int, fsync_interval: float) -> None:
        self.directory = directory
        self.prefix = prefix
        self.max_bytes = max_bytes
        self.fsync_interval = fsync_interval
        self.own: SpillFile | None = None
        self.orphans: list[SpillFile] = []
        #: Lines of the chunk being replayed that Kafka took, by file and offset, so a retry skips them.
        self._delivered: set[tuple[Path, int]] = set()

    def append(self, records: list[Record]) -> tuple[dict[str, int], dict[str, int]]:
        """Append to the own file what fits under ``max_bytes``; (spilled, dropped) record counts by topic.

        Raises ``OSError`` when the disk refuses the append; nothing of ``records`` is then on disk.
        """
        if self.own is None:
            self.own = SpillFile.create(self.directory, self.prefix, self.fsync_interval)
        lines: list[bytes] = []
        size = self.own.size
        spilled: dict[str, int] = {}
        dropped: dict[str, int] = {}
        for record in records:
            line = record.line()
            if size + len(line) > self.max_bytes:
                dropped[record.topic] = dropped.get(record.topic, 0) + 1
                continue
            lines.append(line)
            size += len(line)
            spilled[record.topic] = spilled.get(record.topic, 0) + 1
        if lines:
            self.own.append(b"".join(lines))
        return spilled, dropped

    def find_orphans(self) -> list[SpillFile]:
        """Adopt the spill files of dead processes that are not ours yet; those with nothing to replay are deleted."""
        known = {spill.path for spill in self.orphans} | ({self.own.path} if self.own else set())
        found = []
        for path in sorted(self.directory.glob("*.spill")):
            if path in known:
                continue
            spill = SpillFile.adopt(path)
            if spill is None:
                continue
            if spill.pending == 0:
                spill.remove()
                continue
            logger.info("adopted spill file %s with %d bytes to replay", path.name, spill.pending)
            found.append(spill)
        return found

    @property
    def pending(self) -> int:
        """Bytes not yet replayed, over every file."""
        return sum(spill.pending for spill in self.orphans) + (self.own.pending if self.own else 0)

    def sync_fault(self) -> str | None:
        """Why appends to the own file are not reaching stable storage right now, or None when they are."""
        own = self.own
        return own.commit.health_detail() if own is not None and own.commit is not None else None

    def has_pending(self) -> bool:
        """Whether anything waits for replay."""
        return bool(self.orphans) or (self.own is not None and self.own.pending > 0)

    def next_source(self) -> SpillFile | None:
        """The file to replay from now: adopted files first, as their events are older."""
        return self.orphans[0] if self.orphans else self.own

    def read(self, source: SpillFile, max_records: int) -> tuple[list[tuple[int, Record]], int]:
        """The next records of ``source`` not delivered yet, with their offsets, and the offset after them."""
        lines, end, bad = source.read(max_records)
        if bad:
            logger.warning("skipped %d unreadable lines in %s", bad, source.path)
        return [(pos, record) for pos, record in lines if (source.path, pos) not in self._delivered], end

    def delivered(self, source: SpillFile, offsets: list[int]) -> None:
        """Remember which records of a chunk that failed got through, so its retry does not send them twice."""
        self._delivered.update((source.path, offset) for offset in offsets)

    def replayed(self, source: SpillFile, offset: int) -> None:
        """Mark ``source`` delivered up to ``offset``; an adopted file is deleted once fully replayed."""
        try:
            source.advance(offset)
        except OSError as exc:
            # Replay goes on from the offset in memory; only a crash before the next write replays (duplicates) them.
            logger.warning("cannot record the replay offset of %s (%s); continuing", source.path.name, exc)
        self._delivered.clear()
        if source is not self.own and source.pending == 0:
            logger.info("replayed spill file %s of a previous process", source.path.name)
            source.remove()
            self.orphans.remove(source)

    def drained(self) -> None:
        """Empty the fully replayed own file, so it does not grow across outages."""
        if self.own is not None and self.own.size:
            self.own.reset()

    def close(self) -> None:
        """Delete the files with nothing left to replay and release the others for another process to adopt."""
        for spill in [*self.orphans, *([self.own] if self.own else [])]:
            if spill.pending == 0:
                spill.remove()
            else:
                spill.close()
        self.orphans.clear()
        self.own = None


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

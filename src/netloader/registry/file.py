"""``file:///some/dir``: the embedded registry, for a filesystem every instance sees (one host, NFS, a volume).

One JSON file per source, named ``<model key>-<identity key>-<source id>.json``, written whole to a hidden
temporary file and then renamed over the old one, every heartbeat. Liveness is the file's modification time
(set by the filesystem when the rename lands, not by what the record claims): a file older than its record's
``ttl`` is dead, ignored, and removed by whoever reads it. A lookup is one directory listing plus one bounded read
per matching file. Every read is bounded: no symlinks, no FIFOs or devices, at most 64 KiB per file.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import secrets
import stat
import time

from ..errors import RegistryError
from ..manifest import Identity
from .base import (
    DEFAULT_TTL,
    MAX_CLOCK_SKEW,
    MAX_RECORD_BYTES,
    MAX_RECORDS_PER_LISTING,
    MAX_RECORDS_PER_LOOKUP,
    LiveSource,
    Registry,
    SourceRecord,
    holds,
    identity_key,
    model_key,
    parse_record,
    skipped,
)

logger = logging.getLogger("netloader")

_NAME = re.compile(r"^([0-9a-f]{16})-([0-9a-f]{32})-([0-9a-f]{16})\.json$")
_TMP_PREFIX = ".tmp-"
#: directory entries one listing looks at, at most (a directory flooded with junk cannot stall a reader)
MAX_ENTRIES = 100_000


class FileRegistry(Registry):
    def __init__(self, url: str, directory: str) -> None:
        self.url = url
        self.directory = directory

    def _path(self, record: SourceRecord) -> str:
        name = f"{model_key(record.model_id)}-{identity_key(record.identity)}-{record.source_id}.json"
        return os.path.join(self.directory, name)

    # -- writing ---------------------------------------------------------------------------------------------
    def publish(self, record: SourceRecord) -> None:
        data = record.to_json()
        tmp = os.path.join(self.directory, f"{_TMP_PREFIX}{record.source_id}-{secrets.token_hex(4)}")
        try:
            os.makedirs(self.directory, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, self._path(record))
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError as exc:
            raise RegistryError(f"cannot write to registry {self.url}: {exc.strerror or exc}") from None

    def remove(self, record: SourceRecord) -> None:
        try:
            os.unlink(self._path(record))
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise RegistryError(f"cannot remove from registry {self.url}: {exc.strerror or exc}") from None

    # -- reading ---------------------------------------------------------------------------------------------
    def _names(self) -> list[tuple[str, str, str]]:
        """(model key, identity key, name) of every record file; stale temporary files are removed."""
        out = []
        try:
            with os.scandir(self.directory) as entries:
                for count, entry in enumerate(entries):
                    if count >= MAX_ENTRIES:
                        skipped.warning(self.directory, "netloader registry: %s holds more than %d entries; "
                                        "looking at the first ones only", self.directory, MAX_ENTRIES)
                        break
                    match = _NAME.match(entry.name)
                    if match:
                        out.append((match.group(1), match.group(2), entry.name))
                    elif entry.name.startswith(_TMP_PREFIX):
                        self._remove_if_stale(entry.path, DEFAULT_TTL)
        except FileNotFoundError:
            return []  # nothing published yet
        except OSError as exc:
            raise RegistryError(f"cannot list registry {self.url}: {exc.strerror or exc}") from None
        return out

    def _read(self, name: str, ident_key: str | None, identity: Identity | None = None) -> LiveSource | None:
        """The live record in ``name``, or None: missing, unreadable, not a regular file, too large, invalid,
        not of the identity its name says, or dead (then removed)."""
        path = os.path.join(self.directory, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT,):
                skipped.warning(path, "netloader registry: skipping %s: %s", path, exc.strerror or exc)
            return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                skipped.warning(path, "netloader registry: skipping %s: not a regular file", path)
                return None
            age = time.time() - st.st_mtime
            if st.st_size > MAX_RECORD_BYTES:
                skipped.warning(path, "netloader registry: skipping %s: larger than %d bytes", path, MAX_RECORD_BYTES)
                self._remove_if_stale(path, DEFAULT_TTL, st)
                return None
            data = os.read(fd, MAX_RECORD_BYTES + 1)
        except OSError as exc:
            skipped.warning(path, "netloader registry: skipping %s: %s", path, exc.strerror or exc)
            return None
        finally:
            os.close(fd)
        record = parse_record(data, path)
        ttl = record.ttl if record is not None else DEFAULT_TTL
        if age > ttl:
            self._remove_if_stale(path, ttl, st)
            return None
        if record is None:
            return None
        if age < -MAX_CLOCK_SKEW:  # a modification time far in the future: set by hand, not by a heartbeat
            skipped.warning(path, "netloader registry: skipping %s: modified in the future", path)
            return None
        if not (holds(record, identity) if identity is not None else identity_key(record.identity) == ident_key):
            skipped.warning(path, "netloader registry: skipping %s: its identity is not the one its name says", path)
            return None
        return LiveSource(record, max(age, 0.0))

    def _remove_if_stale(self, path: str, ttl: float, seen: os.stat_result | None = None) -> None:
        """Remove ``path`` if it is still older than ``ttl`` and (if given) still the file ``seen``."""
        try:
            now = os.stat(path, follow_symlinks=False)
            if time.time() - now.st_mtime <= ttl or (seen is not None and now.st_ino != seen.st_ino):
                return  # refreshed meanwhile
            os.unlink(path)
            logger.info("netloader registry: removed %s (no heartbeat for %.0f s)", path, time.time() - now.st_mtime)
        except OSError:
            pass  # gone already, or not ours to remove: readers ignore it either way

    def lookup(self, identity: Identity) -> list[LiveSource]:
        mkey, ikey = model_key(identity.model_id), identity_key(identity)
        out: list[LiveSource] = []
        for m, i, name in self._names():
            if m == mkey and i == ikey:
                live = self._read(name, ikey, identity)
                if live is not None:
                    out.append(live)
                    if len(out) >= MAX_RECORDS_PER_LOOKUP:
                        break
        return out

    def count_other_identities(self, identity: Identity) -> int:
        mkey, ikey = model_key(identity.model_id), identity_key(identity)
        count = 0
        for m, i, name in self._names():
            if m == mkey and i != ikey:
                live = self._read(name, i)
                count += live is not None and live.record.model_id == identity.model_id
                if count >= MAX_RECORDS_PER_LISTING:
                    break
        return count

    def listing(self, model_id: str | None = None) -> list[LiveSource]:
        mkey = model_key(model_id) if model_id is not None else None
        out = []
        for m, i, name in self._names():
            if mkey is None or m == mkey:
                live = self._read(name, i)
                if live is not None and (model_id is None or live.record.model_id == model_id):
                    out.append(live)
                    if len(out) >= MAX_RECORDS_PER_LISTING:
                        break
        return out

"""One writer per cache store: a lock file beside the store, created exclusively, naming host and pid.

Two `kt-cache build` runs into one store would interleave their shard writes and codec fits (and one of
them dies in zarr with a traceback, by luck of timing). A build therefore holds `<store>.lock` while it
runs: the file is created with `O_CREAT | O_EXCL` (atomic on a local filesystem), and holds the host,
the pid and the command of its owner. A second writer gets one line naming them and exit code 2.

A lock is stale when its owner ran on this host and that process is gone (killed, crashed): it is taken
over. A lock from another host cannot be checked from here; the message says which file (or object) to remove
once that build is known to be dead.

Object stores (fsspec URLs) get the same object through fsspec's exclusive mode "xb". What that promises:
- s3:// (s3fs): a conditional create, PutObject with `If-None-Match: *`; of two builds creating the lock at once,
  the store accepts one and refuses the other (412 PreconditionFailed). AWS S3 has kept this promise since
  August 2024, and so do MinIO, Ceph RGW and moto. An S3-compatible server that ignores the header would accept
  both: to narrow that case the lock is looked for first (a second build started after the first is refused on
  any server); only two builds starting within the same moment could then both proceed.
- other protocols: whatever the filesystem's "xb" does (gcsfs and others check existence first: best effort).
The lock object also records host and pid, so a stale one (a killed build) is recognised as on a local disk.

Why not `fcntl.flock`: it is advisory per open file, does not survive onto object stores, and leaves no
record of who holds the store; a named file does both and is what users can see and remove.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path
from urllib.parse import urlsplit

import fsspec

from kt.config import utc_now
from kt.errors import UserError
from kt.storage import filesystem, storage_error

SUFFIX = ".lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class StoreLock:
    """`with StoreLock(url): ...` holds the store at `url` for one writer (see the module docstring)."""

    def __init__(self, url: str, storage_options: dict | None = None):
        self.url = str(url).rstrip("/")
        split = urlsplit(self.url)
        if "://" not in self.url or split.scheme == "file":
            path = os.path.abspath(split.path if split.scheme == "file" else self.url)
            self.fs, self.path, self.local = fsspec.filesystem("file"), path + SUFFIX, True
        else:
            self.fs, root = filesystem(self.url, storage_options, "write")  # one line for a missing package
            self.path, self.local = root + SUFFIX, False
        self.owner = {"host": platform.node(), "pid": os.getpid(), "created": utc_now(),
                      "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:])}
        self.held = False

    def acquire(self) -> None:
        for _ in range(2):  # a second try after removing a stale lock
            try:
                created = self._create()
            except (PermissionError, FileNotFoundError) as e:
                if not self.local:  # no bucket, denied credentials
                    raise storage_error(self.url, e, "write") from None
                raise UserError(f"cannot write {self.url}: cannot create its lock file {self.path}: "
                                f"{e.strerror or e}") from None
            except OSError as e:  # a parent that is a file, a read-only location
                raise UserError(f"cannot write {self.url}: cannot create its lock file {self.path}: "
                                f"{e.strerror or e}") from None
            if created:
                self.held = True
                return
            holder = self._read()
            if holder is not None and holder.get("host") == platform.node() and isinstance(holder.get("pid"), int) \
                    and not _pid_alive(holder["pid"]):
                self._remove()  # its process is gone: stale
                continue
            who = (f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('created')}"
                   if holder else "an unreadable lock")
            raise UserError(f"{self.url} is being written by another build ({who}); wait for it, or remove "
                            f"{self.where} once that build is known to be dead")
        raise UserError(f"could not lock {self.url}: {self.path} keeps reappearing; is another build starting?")

    @property
    def where(self) -> str:
        """The lock as a user names it: a path, or the object's URL."""
        return self.path if self.local else f"{self.url}{SUFFIX}"

    def release(self) -> None:
        if self.held:
            holder = self._read()
            if holder is None or (holder.get("host"), holder.get("pid")) == (self.owner["host"], self.owner["pid"]):
                self._remove()
            self.held = False

    def __enter__(self) -> "StoreLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    # -- the file ------------------------------------------------------------------------------------
    def _create(self) -> bool:
        data = json.dumps(self.owner).encode()
        if self.local:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return True
        self.fs.invalidate_cache(self.path)
        if self.fs.exists(self.path):  # on any server, a lock already there is seen (see the module docstring)
            return False
        try:
            with self.fs.open(self.path, "xb") as f:  # s3fs: PutObject If-None-Match: *
                f.write(data)
        except FileExistsError:
            return False
        return True

    def _read(self) -> dict | None:
        try:
            with self.fs.open(self.path, "rb") as f:
                value = json.loads(f.read())
            return value if isinstance(value, dict) else None
        except (FileNotFoundError, ValueError):
            return None

    def _remove(self) -> None:
        try:
            self.fs.rm_file(self.path)
        except FileNotFoundError:
            pass

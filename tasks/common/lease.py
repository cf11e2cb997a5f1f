"""A run's exclusive lease on its OUT: two runs never write one OUT at the same time.

Every job's flow takes the lease before it plans and gives it back when it ends (also on an
error or Ctrl-C). The lease is one small file, ``OUT/lease.json``: the holder (run name, host,
pid, a random token), when it was taken and when its holder was last alive. A second run that
finds it stops at once, naming the holder and when it was last alive.

- **Exclusive on local disks and S3.** It is created only if absent, and every later write is
  conditional on the writer's own last write: on S3 with conditional ``PutObject``
  (``If-None-Match: *``, ``If-Match: <ETag>``), locally under an exclusive ``flock`` of a lock
  file in the temp directory keyed by OUT's path (a local file system: not NFS). A holder that lost its lease can never
  overwrite the new holder's.
- **A holder that died lets go.** A background thread rewrites ``heartbeat_at`` every
  ``ttl / 4`` seconds. A lease whose heartbeat is older than ``ttl`` has expired, and one whose
  holder was on this host and is no longer running (its pid is gone) has expired at once; the
  next run takes it over with the same conditional write, so of two runs racing for an expired
  lease exactly one wins.

``ttl`` is :data:`DEFAULT_TTL` seconds unless the environment sets ``DENSEPURE_LEASE_TTL``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import socket
import tempfile
import threading
import uuid
from datetime import datetime, timezone

from typing import TYPE_CHECKING

from tasks.common import storage

if TYPE_CHECKING:  # the handle hands itself in (RunDir.lease): no import at run time
    from tasks.common.run_dir import RunDir

__all__ = ["Lease", "LeaseHeldError", "LeaseLostError", "DEFAULT_TTL", "lease_ttl"]

log = logging.getLogger("densepure.lease")

DEFAULT_TTL = 120.0
_FILE = "lease.json"


class _Changed(Exception):
    """A conditional write found another version than the one it was conditioned on."""


class LeaseHeldError(ValueError):
    """Another run holds OUT's lease; the message names it and when it was last alive."""


class LeaseLostError(ValueError):
    """This run's lease was taken over (its heartbeat stopped for longer than the ttl)."""


def lease_ttl() -> float:
    """The lease's time to live in seconds (``DENSEPURE_LEASE_TTL``, default :data:`DEFAULT_TTL`)."""
    raw = os.environ.get("DENSEPURE_LEASE_TTL")
    try:
        ttl = float(raw) if raw else DEFAULT_TTL
    except ValueError:
        raise ValueError(f"DENSEPURE_LEASE_TTL={raw!r}: expected a number of seconds, e.g. 120") from None
    if not ttl > 0:
        raise ValueError(f"DENSEPURE_LEASE_TTL={raw!r}: must be > 0 seconds")
    return ttl


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _iso(t: datetime) -> str:
    return t.isoformat(timespec="seconds")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class Lease:
    """The lease of one run on ``run`` (see the module docstring); a context manager.

    Args:
        run: the OUT.
        holder: what the lease names as its holder (the job and run name, for messages).
        ttl: seconds without a heartbeat after which the lease has expired.
    """

    def __init__(self, run: RunDir, holder: str, ttl: float | None = None):
        self.run = run
        self.uri = run.path(_FILE)
        self.ttl = lease_ttl() if ttl is None else float(ttl)
        self.doc = {"holder": holder, "host": socket.gethostname(), "pid": os.getpid(),
                    "token": uuid.uuid4().hex, "acquired_at": "", "heartbeat_at": "", "ttl": self.ttl}
        self._version: str | None = None  # of our last write: the ETag on S3, the text locally
        self._made_dir: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: str | None = None  # why the lease was lost, once it is

    # -- the file, written only conditionally -----------------------------------------------
    # S3: conditional PutObject (If-None-Match to create, If-Match on our last ETag to replace).
    # Locally: every read-modify-write of lease.json holds an exclusive flock (see _locked), and
    # the version compared is the file's whole text.
    def _split(self) -> tuple[str, str]:
        bucket, _, key = self.uri[len("s3://"):].partition("/")
        return bucket, key

    @contextlib.contextmanager
    def _locked(self):
        # The lock file lives in the temp dir, not in OUT (OUT holds results only); it is keyed
        # by OUT's absolute path, so every process on this host locks the same file.
        key = hashlib.sha1(os.path.abspath(self.uri).encode()).hexdigest()[:16]
        with open(os.path.join(tempfile.gettempdir(), f"densepure-lease-{key}.lock"), "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _s3(self, action: str, method: str, **kwargs):
        """One S3 request on the lease object. A failed condition raises :class:`_Changed`, an
        existing object on If-None-Match FileExistsError; anything else (an unreachable endpoint,
        a missing bucket) a StorageError that names OUT and what to check."""
        bucket, key = self._split()
        try:
            return self.run.fs.call_s3(method, Bucket=bucket, Key=key, **kwargs)
        except (FileExistsError, FileNotFoundError):
            raise
        except Exception as exc:  # noqa: BLE001 - botocore's errors are no OSError
            if "pre-condition" in str(exc) or "PreconditionFailed" in str(exc):
                raise _Changed() from None
            raise storage.wrap_error(self.uri, action, exc) from exc

    def _read(self) -> tuple[dict | None, str | None]:
        """The current lease document and its version (ETag on S3, the text locally); (None, None) if none."""
        try:
            if self.run.is_s3:
                resp = self._s3("read", "head_object")
                return json.loads(self.run.read_bytes(self.uri)), resp["ETag"]
            with open(self.uri, encoding="utf-8") as f:
                text = f.read()
            return json.loads(text), text
        except FileNotFoundError:
            return None, None
        except ValueError:  # a torn or foreign file: its heartbeat cannot be read, so it has expired
            return {"holder": "an unreadable lease file", "heartbeat_at": "", "ttl": 0}, "unreadable"

    def _write_local(self) -> str:
        text = json.dumps(self.doc, indent=2)
        tmp = f"{self.uri}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.uri)
        return text

    def _create(self) -> bool:
        """Write our document if no lease file exists; False when one does."""
        if self.run.is_s3:
            try:
                resp = self._s3("write", "put_object", Body=json.dumps(self.doc, indent=2).encode(), IfNoneMatch="*")
            except (FileExistsError, _Changed):
                return False
            self._version = resp["ETag"]
            return True
        with self._locked():
            if os.path.exists(self.uri):
                return False
            root = os.path.dirname(os.path.abspath(self.uri))
            if not os.path.isdir(root):
                os.makedirs(root)
                self._made_dir = root  # removed again on release if the run left it empty
            self._version = self._write_local()
            return True

    def _replace(self, version: str | None) -> bool:
        """Overwrite the lease whose version is ``version`` with our document; False if it changed."""
        if self.run.is_s3:
            try:
                resp = self._s3("write", "put_object", Body=json.dumps(self.doc, indent=2).encode(), IfMatch=version)
            except (_Changed, FileNotFoundError):
                return False
            self._version = resp["ETag"]
            return True
        with self._locked():
            if self._read()[1] != version:
                return False
            self._version = self._write_local()
            return True

    def _expired(self, doc: dict) -> str | None:
        """Why a lease document no longer holds (None while it does)."""
        try:
            beat = datetime.fromisoformat(doc.get("heartbeat_at") or doc.get("acquired_at") or "")
        except ValueError:
            return "its heartbeat cannot be read"
        age = (_now() - beat).total_seconds()
        if age > float(doc.get("ttl") or self.ttl):
            return f"no heartbeat for {age:.0f} s"
        if doc.get("host") == socket.gethostname() and isinstance(doc.get("pid"), int) \
                and doc["pid"] != os.getpid() and not _pid_alive(doc["pid"]):
            return f"its process {doc['pid']} on this host has ended"
        return None

    # -- the protocol ----------------------------------------------------------------------
    def acquire(self) -> "Lease":
        """Take the lease, or raise :class:`LeaseHeldError` naming the holder. Starts the heartbeat."""
        for _ in range(5):  # a lost race for an expired lease: look again
            now = _iso(_now())
            self.doc.update(acquired_at=now, heartbeat_at=now)
            if self._create():
                break
            doc, version = self._read()
            if doc is None:
                continue  # released in between
            why = self._expired(doc)
            if why is None:
                raise LeaseHeldError(
                    f"{self.run} is in use by another run: {doc.get('holder')} (host {doc.get('host')}, pid "
                    f"{doc.get('pid')}), started {doc.get('acquired_at')}, last alive {doc.get('heartbeat_at')}. "
                    f"Two runs never write one OUT at once: wait for it to finish (its lease expires "
                    f"{float(doc.get('ttl') or self.ttl):.0f} s after its last heartbeat if it died), or "
                    f"choose another --out.")
            if self._replace(version):
                log.warning("%s: took over the lease of %s (%s)", self.run, doc.get("holder"), why)
                break
        else:
            raise LeaseHeldError(f"{self.run}: could not take the lease (other runs keep taking it); retry")
        self._thread = threading.Thread(target=self._beat, name="densepure-lease", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                self.heartbeat()
            except Exception as exc:  # noqa: BLE001 - a transient storage error: try again next beat
                log.warning("%s: lease heartbeat failed (%s); retrying", self.run, exc)

    def heartbeat(self) -> None:
        """Say this run is alive; marks the lease lost if another run took it over."""
        if self.lost:
            return
        self.doc["heartbeat_at"] = _iso(_now())
        if not self._replace(self._version):
            doc, _ = self._read()
            self.lost = f"taken over by {doc.get('holder') if doc else 'nobody (deleted)'}"
            log.error("%s: this run's lease was %s", self.run, self.lost)

    def check(self) -> None:
        """Raise :class:`LeaseLostError` if the lease was lost (called before publishing results)."""
        if self.lost:
            raise LeaseLostError(f"{self.run}: this run lost its lease ({self.lost}); another run now writes this "
                                 f"OUT, so nothing more is published by this one")

    def release(self) -> None:
        """Stop the heartbeat and delete the lease file if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.lost:
            return
        try:
            if self.run.is_s3:
                self._s3("delete", "delete_object", IfMatch=self._version)
            else:
                with self._locked():
                    if self._read()[1] == self._version:
                        os.unlink(self.uri)
                    if self._made_dir and not os.listdir(self._made_dir):
                        os.rmdir(self._made_dir)  # a refused run leaves no trace
        except (OSError, FileNotFoundError, _Changed) as exc:
            log.warning("%s: could not release the lease (%s); it expires by itself", self.run, exc)

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

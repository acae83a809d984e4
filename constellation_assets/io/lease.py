"""One writer per output location: a lease object beside the outputs.

A run creates ``{dir}/.lease_{name}.json`` atomically before writing anything and removes it when it ends:

* local disk: ``os.open(O_CREAT | O_EXCL)``, which fails when the file exists;
* S3: ``PutObject`` with ``If-None-Match: *`` (conditional write; AWS S3 since 2024, MinIO, moto >= 5.0.15),
  which fails with 412 Precondition Failed when the key exists. Stores without conditional writes reply 501
  NotImplemented: the lease then refuses to start (set ``injection.lease_timeout_s`` and run one writer per
  location by hand) rather than pretend to be exclusive.

The lease holds the holder's host, pid, start time, a random token and the time it was last renewed. A
background thread renews it every ``timeout_s / 4``; a lease not renewed for ``timeout_s`` (its holder died or
lost the network), or held by a process that no longer exists on this host, is stale and is taken over: locally
by renaming it away (``os.rename`` succeeds for one process only), on S3 by a conditional overwrite
(``If-Match`` on the stale lease's ETag). A second run either waits (``wait_s``) or gets :class:`LeaseHeldError`
naming the holder.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from constellation_assets.io.uri import DataAccessError, get_fs, is_s3, join_uri

log = logging.getLogger(__name__)

__all__ = ["Lease", "LeaseHeldError", "LeaseLostError", "lease_uri"]

#: An unreadable local lease younger than this is being written by its creator, not abandoned.
UNREADABLE_GRACE_S = 10.0


class LeaseHeldError(RuntimeError):
    """Another live run holds the output location."""


class LeaseLostError(RuntimeError):
    """This run's lease was taken over (it was not renewed in time): it must not record the run."""


def lease_uri(directory: str, name: str) -> str:
    return join_uri(directory, f".lease_{name}.json")


def _now() -> float:
    return time.time()


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Lease:
    """Exclusive lease on an output location (context manager). ``describe()`` tells who holds it."""

    def __init__(
        self,
        uri: str,
        storage_options: dict | None = None,
        *,
        timeout_s: float = 900.0,
        wait_s: float = 0.0,
        purpose: str = "",
    ):
        self.uri = uri
        self.so = storage_options
        self.timeout_s = float(timeout_s)
        self.wait_s = float(wait_s)
        self.purpose = purpose
        self.token = uuid.uuid4().hex
        self.started = _now()
        self._etag: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.lost = False
        self.held = False

    # ------------------------------------------------------------------ content
    def _body(self) -> bytes:
        return json.dumps(
            {
                "record_type": "constellation.lease/v1",
                "token": self.token,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "started_utc": _iso(self.started),
                "started_unix": self.started,
                "renewed_unix": _now(),
                "timeout_s": self.timeout_s,
                "purpose": self.purpose,
            },
            indent=2,
        ).encode()

    @staticmethod
    def describe_holder(info: dict | None) -> str:
        if not info:
            return "an unknown holder"
        age = _now() - float(info.get("renewed_unix", 0) or 0)
        return (
            f"host {info.get('host')!r} pid {info.get('pid')} since {info.get('started_utc')} "
            f"(renewed {age:.0f} s ago{', ' + info['purpose'] if info.get('purpose') else ''})"
        )

    def _stale(self, info: dict | None) -> bool:
        if info is None:
            # unreadable: being written right now (local create + write is not one step), or its writer died
            # mid-write. S3 puts are atomic, so there it is garbage; locally wait until it is a few seconds old.
            if is_s3(self.uri):
                return True
            try:
                return _now() - os.stat(self._path()).st_mtime > UNREADABLE_GRACE_S
            except FileNotFoundError:
                return True
        renewed = float(info.get("renewed_unix", 0) or 0)
        timeout = float(info.get("timeout_s", self.timeout_s) or self.timeout_s)
        if _now() - renewed > timeout:
            return True
        if info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int):
            return not _pid_alive(int(info["pid"]))
        return False

    # ------------------------------------------------------------------ storage
    def _s3(self):
        fs, path = get_fs(self.uri, self.so)
        bucket, _, key = path.partition("/")
        return fs, bucket, key

    def _read(self) -> tuple[dict | None, str | None, bool]:
        """(lease content or None if unreadable, S3 ETag, exists)."""
        if is_s3(self.uri):
            from fsspec.asyn import sync

            fs, bucket, key = self._s3()

            async def _get():
                resp = await fs._call_s3("get_object", Bucket=bucket, Key=key)
                async with resp["Body"] as body:
                    return await body.read(), resp.get("ETag")

            try:
                data, etag = sync(fs.loop, _get)
            except FileNotFoundError:
                return None, None, False
        else:
            try:
                with open(self._path(), "rb") as f:
                    data = f.read()
            except FileNotFoundError:
                return None, None, False
            etag = None
        try:
            return json.loads(data), etag, True
        except (ValueError, TypeError):
            return None, etag, True

    def _path(self) -> str:
        return get_fs(self.uri, self.so)[1]

    def _create(self) -> bool:
        body = self._body()
        if is_s3(self.uri):
            fs, bucket, key = self._s3()
            try:
                resp = fs.call_s3("put_object", Bucket=bucket, Key=key, Body=body, IfNoneMatch="*")
            except Exception as exc:  # noqa: BLE001
                if _precondition_failed(exc):
                    return False
                if "NotImplemented" in str(exc) or "501" in str(exc):
                    raise DataAccessError(
                        self.uri,
                        "This S3 store does not support conditional writes (If-None-Match), so concurrent runs "
                        "cannot be kept apart",
                        "use a store with conditional writes (AWS S3, MinIO, Ceph >= 18) or a local output",
                    ) from exc
                raise _as_access_error(exc, self.uri) from exc
            self._etag = resp.get("ETag")
            return True
        path = self._path()
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError as exc:
            raise _as_access_error(exc, self.uri) from exc
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(body)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise _as_access_error(exc, self.uri) from exc
        return True

    def _take_over(self, etag: str | None) -> bool:
        """Replace a stale lease; True when this process won the takeover."""
        if is_s3(self.uri):
            fs, bucket, key = self._s3()
            kw: dict[str, Any] = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
            try:
                resp = fs.call_s3("put_object", Bucket=bucket, Key=key, Body=self._body(), **kw)
            except Exception as exc:  # noqa: BLE001
                if _precondition_failed(exc) or isinstance(exc, FileNotFoundError):
                    return False
                raise _as_access_error(exc, self.uri) from exc
            self._etag = resp.get("ETag")
            return True
        path = self._path()
        aside = f"{path}.stale-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(path, aside)  # only one of several racing processes succeeds
        except FileNotFoundError:
            return False
        with contextlib.suppress(OSError):
            os.unlink(aside)
        return self._create()

    # ------------------------------------------------------------------ protocol
    def acquire(self) -> Lease:
        deadline = _now() + self.wait_s
        delay = 0.2
        while True:
            if self._create():
                break
            info, etag, exists = self._read()
            if not exists:
                time.sleep(0.01)  # released meanwhile: try again
                continue
            if self._stale(info):
                log.warning("%s: taking over a stale lease held by %s", self.uri, self.describe_holder(info))
                if self._take_over(etag):
                    break
                continue
            if _now() >= deadline:
                raise LeaseHeldError(
                    f"{self.uri}: another run is writing this output location ({self.describe_holder(info)}). "
                    f"Wait for it to finish (or set injection.lease_wait_s to wait), or use another "
                    f"variant/experiment_id/output. If that run is dead, its lease is taken over "
                    f"{float((info or {}).get('timeout_s', self.timeout_s)):.0f} s after its last renewal, "
                    f"or delete the lease file."
                )
            time.sleep(min(delay, max(0.0, deadline - _now())) or 0.05)
            delay = min(delay * 2, 5.0)
        self.held = True
        self._thread = threading.Thread(target=self._renew_loop, name="lease-renew", daemon=True)
        self._thread.start()
        return self

    def _renew_loop(self) -> None:
        interval = max(0.05, self.timeout_s / 4.0)
        while not self._stop.wait(interval):
            try:
                self.renew()
            except Exception as exc:  # noqa: BLE001 - reported through .lost / check()
                log.warning("%s: could not renew the lease (%s)", self.uri, exc)

    def renew(self) -> None:
        with self._lock:
            if not self.held or self.lost:
                return
            info, etag, _ = self._read()
            if not info or info.get("token") != self.token:
                self.lost = True
                return
            if is_s3(self.uri):
                fs, bucket, key = self._s3()
                try:
                    resp = fs.call_s3(
                        "put_object", Bucket=bucket, Key=key, Body=self._body(), IfMatch=etag or "*"
                    )
                    self._etag = resp.get("ETag")
                except Exception as exc:  # noqa: BLE001
                    if _precondition_failed(exc):
                        self.lost = True
                        return
                    raise
            else:
                path = self._path()
                tmp = f"{path}.renew-{self.token[:8]}"
                with open(tmp, "wb") as f:
                    f.write(self._body())
                os.replace(tmp, path)

    def check(self) -> None:
        """Raise :class:`LeaseLostError` unless this process still holds the lease (call before recording)."""
        info, _, _ = self._read()
        if self.lost or not info or info.get("token") != self.token:
            self.lost = True
            raise LeaseLostError(
                f"{self.uri}: this run's lease was taken over by {self.describe_holder(info)} (it was not "
                "renewed for injection.lease_timeout_s); the run record was not written. Re-run when the "
                "other run has finished."
            )

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            if not self.held:
                return
            self.held = False
            info, etag, _ = self._read()
            if not info or info.get("token") != self.token:
                return  # taken over: not ours to remove
            try:
                fs, path = get_fs(self.uri, self.so)
                if is_s3(self.uri):
                    _, bucket, key = self._s3()
                    fs.call_s3("delete_object", Bucket=bucket, Key=key, **({"IfMatch": etag} if etag else {}))
                else:
                    os.unlink(path)
            except Exception as exc:  # noqa: BLE001 - a left-over lease goes stale and is taken over
                log.warning(
                    "%s: could not remove the lease (%s); it goes stale after its timeout", self.uri, exc
                )

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _precondition_failed(exc: BaseException) -> bool:
    # s3fs turns 412 Precondition Failed into FileExistsError ("pre-conditions you specified did not hold")
    text = f"{type(exc).__name__} {exc}"
    return isinstance(exc, FileExistsError) or any(
        m in text for m in ("PreconditionFailed", "pre-conditions", "412", "ConditionalRequestConflict")
    )


def _as_access_error(exc: BaseException, uri: str) -> DataAccessError:
    return DataAccessError(
        uri,
        f"Cannot create the run's lease ({type(exc).__name__}: {exc})",
        "check that the output location exists and is writable (bucket name, credentials, disk space)",
    )

"""One URI layer (fsspec) for local paths and ``s3://`` URIs.

Every reader and writer in the project goes through these functions, so a local demo and a production run on
S3 (AWS, or any S3-compatible store through ``endpoint_url``) use the same code.

Writes are atomic: data goes to a temporary name first and only appears under its final name once complete
(``os.replace`` locally; a single PUT on S3, which is atomic per object). A crash mid-write therefore never
leaves a partial file that looks complete.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec

__all__ = [
    "DataAccessError",
    "atomic_output",
    "atomic_write_bytes",
    "atomic_write_text",
    "get_fs",
    "is_s3",
    "is_transient_error",
    "join_uri",
    "list_uri",
    "open_uri",
    "redact_uri",
    "read_bytes",
    "read_text",
    "storage_options_for",
    "uri_exists",
]

#: Total attempts per S3 request made by botocore ("standard" retry mode: 5xx, throttling such as
#: 503 SlowDown, dropped connections and timeouts, with exponential backoff and jitter).
S3_RETRY_ATTEMPTS = 4
#: Attempts of s3fs's own layer around each call (it also covers a body cut off mid-read, which botocore
#: cannot retry). Retry layers multiply: botocore x s3fs = 8 requests at most per operation, so a persistent
#: fault ends in a clear DataAccessError after ~10-20 s instead of minutes.
S3FS_RETRIES = 2
#: Attempts of this module's own layer for S3, only for a response body cut off mid-transfer (s3fs retries
#: those S3FS_RETRIES times but a flaky link needs a few more) and 429 Too Many Requests (botocore retries
#: S3's 503 SlowDown but not the 429 of some S3-compatible stores); other S3 errors are not retried again.
S3_BODY_RETRY_ATTEMPTS = 3
_BODY_ERRORS = frozenset({"ClientPayloadError", "IncompleteRead", "ContentLengthError", "ProtocolError"})
#: Per-request socket timeouts (seconds) for S3.
S3_CONNECT_TIMEOUT_S = 10
S3_READ_TIMEOUT_S = 60


_URI_CREDENTIALS_RE = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<cred>[^/@\s]+)@")
_QUERY_SECRET_RE = re.compile(
    r"(?P<k>X-Amz-Signature|X-Amz-Credential|X-Amz-Security-Token|password|passwd|token|secret|sig)"
    r"=(?P<v>[^&\s]+)",
    re.I,
)


def redact_uri(text: str) -> str:
    """``text`` with credentials in URIs (``scheme://user:secret@host``) and signed-URL parameters removed."""
    text = _URI_CREDENTIALS_RE.sub(lambda m: f"{m.group('scheme')}***@", str(text))
    return _QUERY_SECRET_RE.sub(lambda m: f"{m.group('k')}=***", text)


class DataAccessError(RuntimeError):
    """An input or output location could not be read or written. The message names the URI and the fix.

    Credentials embedded in the URI (``user:secret@`` or signed-URL parameters) are redacted from the
    message and from ``.uri``.
    """

    def __init__(self, uri: str, problem: str, hint: str = ""):
        uri = str(uri)
        # the underlying error may quote the secret without its scheme (e.g. as a "bucket name")
        for m in list(_URI_CREDENTIALS_RE.finditer(uri)) + list(_QUERY_SECRET_RE.finditer(uri)):
            secret = m.group("cred") if "cred" in m.groupdict() else m.group("v")
            problem = str(problem).replace(secret, "***")
        self.uri = redact_uri(uri)
        self.problem = redact_uri(problem)
        self.hint = hint
        msg = f"{self.problem}: {self.uri}"
        if hint:
            msg += f"\n  What to do: {hint}"
        super().__init__(msg)


def is_s3(uri: str | os.PathLike) -> bool:
    return str(uri).startswith(("s3://", "s3a://"))


def _normalise(uri: str | os.PathLike) -> str:
    uri = str(uri)
    if uri.startswith("s3a://"):
        uri = "s3://" + uri[len("s3a://") :]
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    return uri


def join_uri(base: str | os.PathLike, *parts: str | int) -> str:
    """Join path parts onto a local path or s3:// URI with single slashes."""
    base = _normalise(base)
    if is_s3(base):
        out = base.rstrip("/")
        for p in parts:
            out += "/" + str(p).strip("/")
        return out
    return str(Path(base).joinpath(*(str(p) for p in parts)))


def storage_options_for(uri: str, s3_settings: Any | None = None) -> dict:
    """fsspec storage options for ``uri`` from an S3 settings object (``endpoint_url``, ``anon``, ``region``).

    Credentials are never taken from config files: s3fs/botocore read them from the environment
    (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN / AWS_PROFILE) or an instance role.
    """
    if not is_s3(uri):
        return {}
    opts: dict[str, Any] = {}
    client_kwargs: dict[str, Any] = {}
    config_kwargs: dict[str, Any] = {
        # "standard", not "adaptive": adaptive's client-side rate limiter can stall a throttled client for
        # minutes, which turns a persistent fault into a hang instead of a clear error.
        "retries": {"max_attempts": S3_RETRY_ATTEMPTS, "mode": "standard"},
        "connect_timeout": S3_CONNECT_TIMEOUT_S,
        "read_timeout": S3_READ_TIMEOUT_S,
    }
    if s3_settings is not None:
        endpoint = getattr(s3_settings, "endpoint_url", None)
        if endpoint:
            client_kwargs["endpoint_url"] = endpoint
        region = getattr(s3_settings, "region", None)
        if region:
            client_kwargs["region_name"] = region
        if getattr(s3_settings, "anon", False):
            opts["anon"] = True
    opts["client_kwargs"] = client_kwargs
    opts["config_kwargs"] = config_kwargs
    return opts


def get_fs(
    uri: str | os.PathLike, storage_options: dict | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """Filesystem and path within it for a local path or s3:// URI."""
    uri = _normalise(uri)
    if is_s3(uri):
        try:
            fs = fsspec.filesystem("s3", **(storage_options or {}))
        except Exception as exc:  # bad storage options (e.g. an unknown client setting)
            raise _translate(exc, uri) from exc
        fs.retries = min(getattr(fs, "retries", S3FS_RETRIES), S3FS_RETRIES)
        return fs, uri[len("s3://") :]
    return fsspec.filesystem("file"), str(Path(uri).expanduser().absolute())


_TRANSIENT_NAMES = frozenset(
    {
        "EndpointConnectionError",
        "ConnectTimeoutError",
        "ReadTimeoutError",
        "ConnectionClosedError",
        "ServerDisconnectedError",
        "ClientPayloadError",
        "ClientOSError",
        "IncompleteRead",
        "ResponseParserError",
        "HTTPClientError",
        "FSTimeoutError",
    }
)
_SERVICE_MARKERS = (
    "reduce your request rate",
    "slowdown",
    "slow down",
    "internalerror",
    "internal error",
    "service unavailable",
    "serviceunavailable",
    "throttl",
    "too many requests",
    "bad gateway",
    "gateway timeout",
)


def is_transient_error(exc: BaseException) -> bool:
    """Throttling, 5xx and connection-level failures (worth retrying), as opposed to missing/denied/bad input."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (TimeoutError, ConnectionError)) or type(exc).__name__ in _TRANSIENT_NAMES:
            return True
        text = str(exc).lower()
        if any(m in text for m in _SERVICE_MARKERS):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _translate(exc: BaseException, uri: str) -> DataAccessError:
    if isinstance(exc, DataAccessError):
        return exc
    uri = str(uri)
    if isinstance(exc, FileNotFoundError):
        return DataAccessError(uri, "Not found", "check the path/URI in your config and that the data exists")
    if isinstance(exc, PermissionError):
        return DataAccessError(
            uri,
            f"Access denied ({exc})",
            "check credentials in the environment (AWS_* variables) or set data.s3.anon: true for public buckets",
        )
    name = type(exc).__name__
    if name in ("NoCredentialsError", "PartialCredentialsError"):
        return DataAccessError(
            uri,
            "No S3 credentials found",
            "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) in the environment, "
            "or data.s3.anon: true for a public bucket",
        )
    if is_s3(uri) and is_transient_error(exc):
        return DataAccessError(
            uri,
            f"S3 kept failing after retries with backoff (up to {S3_RETRY_ATTEMPTS * S3FS_RETRIES} attempts; "
            f"{name}: {exc})",
            "the storage service is throttling, erroring or unreachable: check data.s3.endpoint_url and the "
            "network, then re-run (completed outputs are kept; nothing partial was written)",
        )
    return DataAccessError(
        uri,
        f"Could not access ({name}: {exc})",
        "check that the location is reachable (network, endpoint_url, bucket name) and retry",
    )


def _retrying(fn, uri: str, attempts: int | None = None):
    """Run ``fn``; retry transient errors (not 'not found' or 'denied') a bounded number of times, then raise
    a DataAccessError naming ``uri``.

    S3 calls are already retried with backoff by botocore and s3fs (see :data:`S3_RETRY_ATTEMPTS`), so by
    default they are not retried again here (retry layers multiply); local paths get 3 attempts.
    """
    s3 = is_s3(uri)
    n = attempts if attempts is not None else (S3_BODY_RETRY_ATTEMPTS if s3 else 3)
    delay = 0.2
    for i in range(n):
        try:
            return fn()
        except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as exc:
            raise _translate(exc, uri) from exc
        except Exception as exc:
            if s3 and attempts is None:
                # only what botocore does not retry is retried again here: a response body cut off
                # mid-transfer, and 429 Too Many Requests (sent by some S3-compatible stores)
                transient = _is_cut_off_body(exc) or "too many requests" in str(exc).lower()
            else:
                transient = isinstance(exc, OSError) or is_transient_error(exc)
            if not transient or i == n - 1:
                raise _translate(exc, uri) from exc
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


def _is_cut_off_body(exc: BaseException) -> bool:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if type(exc).__name__ in _BODY_ERRORS:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


@contextlib.contextmanager
def open_uri(
    uri: str | os.PathLike, mode: str = "rb", storage_options: dict | None = None, **kwargs
) -> Iterator:
    """Open a local path or s3:// URI for reading (use :func:`atomic_output` for writing final outputs)."""
    fs, path = get_fs(uri, storage_options)
    try:
        f = _retrying(lambda: fs.open(path, mode, **kwargs), str(uri))
    except DataAccessError:
        raise
    except Exception as exc:
        raise _translate(exc, str(uri)) from exc
    with f:
        try:
            yield f
        except (OSError, TimeoutError) as exc:
            # An S3 read that kept failing after the retries (throttling, 5xx, dropped connections) becomes
            # a DataAccessError naming the URI; the caller's own errors pass through unchanged.
            if is_s3(uri) and not isinstance(exc, FileNotFoundError) and is_transient_error(exc):
                raise _translate(exc, str(uri)) from exc
            raise


def read_bytes(uri: str | os.PathLike, storage_options: dict | None = None) -> bytes:
    fs, path = get_fs(uri, storage_options)
    return _retrying(lambda: fs.cat_file(path), str(uri))


def read_text(uri: str | os.PathLike, storage_options: dict | None = None, encoding: str = "utf-8") -> str:
    return read_bytes(uri, storage_options).decode(encoding)


def uri_exists(uri: str | os.PathLike, storage_options: dict | None = None) -> bool:
    fs, path = get_fs(uri, storage_options)
    try:
        return bool(fs.exists(path))
    except FileNotFoundError:
        return False
    except Exception as exc:
        raise _translate(exc, str(uri)) from exc


def list_uri(
    prefix: str | os.PathLike, storage_options: dict | None = None, recursive: bool = False
) -> list[str]:
    """List entries below ``prefix`` as full URIs (files only when ``recursive``), sorted. Missing prefix -> []."""
    prefix = _normalise(prefix)
    fs, path = get_fs(prefix, storage_options)

    def _ls():
        if recursive:
            return fs.find(path)
        return fs.ls(path, detail=False)

    try:
        entries = _retrying(_ls, prefix)
    except DataAccessError as exc:
        if exc.problem == "Not found":
            return []
        raise
    if is_s3(prefix):
        return sorted("s3://" + e for e in entries)
    return sorted(str(e) for e in entries)


@contextlib.contextmanager
def atomic_output(
    uri: str | os.PathLike, storage_options: dict | None = None, suffix: str = ""
) -> Iterator[str]:
    """Context manager yielding a local temporary file path; on success it becomes ``uri``, on error nothing.

    Local: the temp file lives in the destination directory (hidden ``.name.tmp-*``), then ``os.replace``.
    S3: the temp file is local and uploaded in one PUT once complete.
    """
    uri = _normalise(uri)
    if is_s3(uri):
        tmpdir = tempfile.mkdtemp(prefix="constellation-")
        tmp = os.path.join(tmpdir, "part" + (suffix or Path(uri).suffix))
        try:
            yield tmp
            fs, path = get_fs(uri, storage_options)
            _retrying(lambda: fs.put_file(tmp, path), uri)
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)
        return
    dest = Path(uri).expanduser().absolute()
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _translate(exc, str(dest.parent)) from exc
    tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:12]}{suffix}"
    try:
        yield str(tmp)
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def atomic_write_bytes(uri: str | os.PathLike, data: bytes, storage_options: dict | None = None) -> str:
    with atomic_output(uri, storage_options) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return _normalise(uri) if is_s3(uri) else str(Path(_normalise(uri)).expanduser().absolute())


def atomic_write_text(
    uri: str | os.PathLike, text: str, storage_options: dict | None = None, encoding: str = "utf-8"
) -> str:
    return atomic_write_bytes(uri, text.encode(encoding), storage_options)

"""One writer per output location: the lease (local O_EXCL, S3 If-None-Match) refuses, waits, takes over."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from constellation_assets.io.lease import Lease, LeaseHeldError, LeaseLostError, lease_uri


def _leases(uri, so=None, **kw):
    return Lease(uri, so, **kw), Lease(uri, so, **kw)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_second_writer_refused_then_admitted_after_release(tmp_path, where, request):
    if where == "s3":
        s3 = request.getfixturevalue("moto_s3")
        uri, so = lease_uri(f"s3://{s3['bucket']}/out/phase4c/v1", "exp"), s3["storage_options"]
    else:
        uri, so = lease_uri(str(tmp_path / "out"), "exp"), None
    a, b = _leases(uri, so, timeout_s=60)
    with a:
        with pytest.raises(LeaseHeldError) as ei:
            b.acquire()
        msg = str(ei.value)
        assert socket.gethostname() in msg and f"pid {os.getpid()}" in msg and "lease_wait_s" in msg
        a.check()  # still ours
    # released: the lease object is gone and the next writer gets it
    with b:
        b.check()


def test_waiting_writer_gets_the_lease_when_the_holder_ends(tmp_path):
    uri = lease_uri(str(tmp_path), "exp")
    code = (
        "import time,sys; from constellation_assets.io.lease import Lease; "
        f"l=Lease({uri!r}, timeout_s=60).acquire(); print('held', flush=True); time.sleep(1.5); l.release()"
    )
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    t0 = time.monotonic()
    with Lease(uri, timeout_s=60, wait_s=30):
        waited = time.monotonic() - t0
    p.wait(10)
    assert 0.3 < waited < 20


def test_dead_holder_taken_over_and_holder_record_kept(tmp_path):
    uri = lease_uri(str(tmp_path), "exp")
    # a lease left by a process that was killed (same host, pid gone)
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    body = {
        "token": "x",
        "host": socket.gethostname(),
        "pid": p.pid,
        "renewed_unix": time.time(),
        "timeout_s": 900,
    }
    (tmp_path / ".lease_exp.json").write_text(json.dumps(body))
    with Lease(uri, timeout_s=900) as lease:
        info = json.loads((tmp_path / ".lease_exp.json").read_text())
        assert (
            info["token"] == lease.token and info["pid"] == os.getpid() and info["started_utc"].endswith("Z")
        )
    assert not (tmp_path / ".lease_exp.json").exists()


@pytest.mark.parametrize("where", ["local", "s3"])
def test_stale_lease_after_timeout_and_lost_lease_detected(tmp_path, where, request):
    if where == "s3":
        s3 = request.getfixturevalue("moto_s3")
        uri, so = lease_uri(f"s3://{s3['bucket']}/o", "exp"), s3["storage_options"]
    else:
        uri, so = lease_uri(str(tmp_path), "exp"), None
    a = Lease(uri, so, timeout_s=0.6)
    a.acquire()
    a._stop.set()  # the holder stops renewing (hung or partitioned)
    a._thread.join()
    time.sleep(0.8)
    b = Lease(uri, so, timeout_s=60)
    b.acquire()  # took over the stale lease
    with pytest.raises(LeaseLostError):
        a.check()
    a.release()  # does not remove b's lease
    b.check()
    b.release()

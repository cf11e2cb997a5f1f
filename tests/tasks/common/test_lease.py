"""tasks/common/lease.py: one run per OUT, on a local disk and on S3 (moto, conditional writes)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import pytest

from tasks.common.lease import Lease, LeaseHeldError, LeaseLostError, lease_ttl
from tasks.common.run_dir import RunDir


def _doc(run: RunDir) -> dict:
    return json.loads(run.read_text(run.path("lease.json")))


def _plant(run: RunDir, **fields) -> None:
    """A lease written by another process (as its holder would)."""
    now = datetime.now(timezone.utc)
    doc = {"holder": "densepure certify, run name 'other'", "host": "other-host", "pid": 1, "token": "t",
           "acquired_at": now.isoformat(timespec="seconds"), "heartbeat_at": now.isoformat(timespec="seconds"),
           "ttl": 60, **fields}
    run.write_text(run.path("lease.json"), json.dumps(doc))


@pytest.fixture(params=["local", "s3"])
def run(request, tmp_path, monkeypatch):
    if request.param == "local":
        return RunDir(str(tmp_path / "out"))
    endpoint = request.getfixturevalue("s3_endpoint")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    run = RunDir(f"s3://lease-bucket/{request.node.name.split('[')[0]}")
    if not run.fs.exists("lease-bucket"):
        run.fs.mkdir("lease-bucket")
    return run


def test_one_holder_at_a_time_and_the_second_is_told_who(run):
    with Lease(run, "densepure certify, run name 'first'", ttl=30) as first:
        doc = _doc(run)
        assert doc["holder"] == "densepure certify, run name 'first'" and doc["pid"] == os.getpid()
        with pytest.raises(LeaseHeldError, match=r"in use by another run: densepure certify, run name 'first' "
                                                 r"\(host .*pid \d+\), started .*last alive .*choose another --out"):
            Lease(run, "second", ttl=30).acquire()
        first.heartbeat()
        assert _doc(run)["heartbeat_at"] >= doc["heartbeat_at"] and not first.lost
    assert not run.exists(run.path("lease.json"))  # released
    with Lease(run, "third", ttl=30):  # free again
        pass


def test_a_lease_without_heartbeat_expires_and_exactly_one_run_takes_it(run):
    old = (datetime.now(timezone.utc) - timedelta(seconds=120)).isoformat(timespec="seconds")
    _plant(run, heartbeat_at=old, acquired_at=old)
    with Lease(run, "taker", ttl=30) as taker:
        assert _doc(run)["holder"] == "taker"
        with pytest.raises(LeaseHeldError):
            Lease(run, "late", ttl=30).acquire()
        taker.check()


def test_a_live_foreign_lease_is_respected_and_a_dead_local_holder_lets_go(run):
    _plant(run)  # another host, fresh heartbeat
    with pytest.raises(LeaseHeldError, match="other-host"):
        Lease(run, "mine", ttl=30).acquire()
    # a holder on this host whose process has ended: expired at once, whatever its heartbeat
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    _plant(run, host=socket.gethostname(), pid=int(dead.stdout))
    with Lease(run, "mine", ttl=30):
        assert _doc(run)["holder"] == "mine"


def test_a_holder_whose_lease_was_taken_over_notices_and_publishes_nothing(run):
    holder = Lease(run, "slow", ttl=30).acquire()
    holder._stop.set()  # its heartbeat stalls...
    old = (datetime.now(timezone.utc) - timedelta(seconds=120)).isoformat(timespec="seconds")
    doc = _doc(run)
    run.write_text(run.path("lease.json"), json.dumps({**doc, "heartbeat_at": old, "host": "elsewhere"}))
    with Lease(run, "new", ttl=30):  # ... and another run takes the expired lease over
        holder.heartbeat()
        assert holder.lost and "new" in holder.lost
        with pytest.raises(LeaseLostError, match="lost its lease"):
            holder.check()
        holder.release()  # never deletes the new holder's lease
        assert _doc(run)["holder"] == "new"


def test_a_refused_run_leaves_no_directory_and_the_ttl_comes_from_the_environment(tmp_path, monkeypatch):
    run = RunDir(str(tmp_path / "fresh"))
    with Lease(run, "x", ttl=5):
        assert (tmp_path / "fresh" / "lease.json").exists()
    assert not (tmp_path / "fresh").exists()
    monkeypatch.setenv("DENSEPURE_LEASE_TTL", "7")
    assert lease_ttl() == 7.0 and Lease(run, "y").ttl == 7.0
    monkeypatch.setenv("DENSEPURE_LEASE_TTL", "soon")
    with pytest.raises(ValueError, match="DENSEPURE_LEASE_TTL='soon'"):
        lease_ttl()

"""Every service started locally listens on loopback only: Ray (and its workers) here."""

import os
import shutil
import tempfile

from netcheck import LOOPBACK, descendants, listening_addresses

from tasks.common.raypool import _start_local_ray

def test_local_ray_listens_on_loopback_only(monkeypatch):
    import ray

    temp = tempfile.mkdtemp(prefix="dp-ray-")  # short: Ray's socket paths must fit in 107 bytes
    monkeypatch.setenv("RAY_TMPDIR", temp)
    _start_local_ray(num_cpus=1)
    try:
        assert ray.util.get_node_ip_address() == "127.0.0.1"

        @ray.remote(num_cpus=0.5)
        def ping():
            return "pong"

        assert ray.get(ping.remote()) == "pong"  # a worker is up too
        sockets = listening_addresses(descendants(os.getpid()))
        assert sockets, "found no listening sockets of the local Ray cluster"
        assert all(addr in LOOPBACK for addr, _ in sockets), sockets
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)

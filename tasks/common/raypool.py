"""Running shards on a pool of Ray actors: the one place where the pipeline starts or joins Ray.

Both jobs use it: the vote stage (``tasks/certify/vote.py``, :class:`~tasks.certify.vote.VoteWorker`) and the
attack stage (``tasks/attack/worker.py``, :class:`~tasks.attack.worker.AttackWorker`). Each actor is built
once (it loads the models once) and then runs task after task; Ray restarts a killed actor and
retries its task (``max_restarts``, ``max_task_retries``), and because every shard is written
whole and atomically under its final name, a retry never duplicates or loses a row.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

from tasks.common.faults import record_driver_process_group

__all__ = ["run_on_actors", "join_ray", "check_ray_address", "RayAddressError"]


class _TokenAuthNotice(logging.Filter):
    """Drops Ray's notice that it turned token authentication on for a new local cluster.

    Authentication stays on (Ray's default: a token in ~/.ray/auth_token); the notice asked
    nothing of the user and was printed by every run. Ray's warning that authentication is OFF
    is kept: that one matters.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"


def _pin_loopback(why: str) -> None:
    """Make this process's Ray use 127.0.0.1 as its own address (never the machine's other one).

    Without it Ray binds a local cluster's services to the machine's non-loopback address, and a
    driver joining ``127.0.0.1:PORT`` rewrites it to that address and dials it. Ray reads the
    variable once, at import, into ray_constants (this process) and again in every process it
    spawns (raylet, workers): set both, then verify.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray
    from ray._private import ray_constants

    # The driver's copy: Ray may have been imported before the line above (by another module, a
    # test, a notebook), and then it would read the stale value. This writes a private Ray
    # constant, so it is done only on the Ray minor version it was verified on
    # (requirements/lock.txt); on another one the name or its meaning may have changed and the
    # write would silently do nothing.
    verified = (2, 60)
    installed = tuple(int(part) for part in re.findall(r"\d+", ray.__version__)[:2])
    if installed != verified or not hasattr(ray_constants, "ENABLE_RAY_CLUSTER"):
        raise RuntimeError(
            f"{why} on loopback is verified on Ray {verified[0]}.{verified[1]}.x only "
            f"(it sets the private ray._private.ray_constants.ENABLE_RAY_CLUSTER); Ray {ray.__version__} is "
            f"installed. Install the tested version (make setup; requirements/lock.txt), or start Ray "
            f"yourself on loopback (ray start --head --node-ip-address=127.0.0.1 --include-dashboard=false) "
            f"and pass --ray-address 127.0.0.1:6379")
    ray_constants.ENABLE_RAY_CLUSTER = False


def _start_local_ray(num_cpus: int | None = None) -> str:
    """Start Ray on loopback only (no dashboard); returns the private temp dir of its session files.

    The dir is new (under ``$RAY_TMPDIR`` when set, else the system's temp dir) and the caller
    removes it after ``ray.shutdown()``: each run used to leave one behind. Its name is short:
    Ray's socket paths inside it must fit in 107 bytes.
    """
    _pin_loopback("starting a local Ray")
    import ray
    record_driver_process_group()  # before Ray starts the processes that inherit the environment
    auth_log = logging.getLogger(_AUTH_LOGGER)
    if not any(isinstance(f, _TokenAuthNotice) for f in auth_log.filters):
        auth_log.addFilter(_TokenAuthNotice())
    temp_dir = tempfile.mkdtemp(prefix="dp-ray-", dir=os.environ.get("RAY_TMPDIR") or None)
    try:
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, _temp_dir=temp_dir,
                 _node_ip_address="127.0.0.1", log_to_driver=False, configure_logging=False)
    except BaseException:
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    node_ip = ray.util.get_node_ip_address()
    if node_ip != "127.0.0.1":
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise RuntimeError(f"local Ray bound to {node_ip}, not loopback; set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 "
                           f"before anything imports ray, or pass --ray-address to use a cluster")
    return temp_dir


class RayAddressError(ConnectionError):
    """``--ray-address`` names no reachable Ray cluster."""


#: Seconds to wait for a TCP answer at --ray-address before giving up (Ray's own wait is minutes).
CONNECT_TIMEOUT_S = 5.0


def check_ray_address(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Fail within ``timeout`` seconds, naming ``address``, when nothing listens there.

    ``address`` is ``host:port`` (or ``ray://host:port``, Ray Client); ``auto`` is left to Ray
    (it reads the local cluster's address file and fails at once when there is none). Without
    this check ``ray.init`` retried for minutes, ignored Ctrl-C and blamed the Prefect connection.
    """
    import socket

    if address == "auto":
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise RayAddressError(f"--ray-address {address!r}: expected host:port (e.g. 127.0.0.1:6379, the address "
                              f"`ray start --head` prints), ray://host:10001, or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise RayAddressError(
            f"--ray-address {address}: no Ray cluster answers there ({exc.strerror or exc} within {timeout:g} s). "
            f"Start it (ray start --head --port {port}) and check the host and port, or leave out --ray-address "
            f"to run on a local Ray") from None


_LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}


def join_ray(address: str) -> None:
    """Connect this driver to the Ray cluster at ``address`` (checked first: :func:`check_ray_address`).

    A loopback address stays loopback: Ray would otherwise replace 127.0.0.1 by the machine's
    other address and dial that (a cluster of several nodes on one machine is then run in a
    network namespace that has only loopback, where 127.0.0.1 is right for every node).
    """
    import ray

    check_ray_address(address)
    if address.split("://", 1)[-1].rpartition(":")[0] in _LOOPBACK:
        _pin_loopback("joining a Ray cluster")
    ray.init(address=address, log_to_driver=False)


def run_on_actors(actor_class: type, actor_args: Callable[[str, int | None], tuple], tasks: Sequence[Any],
                  method: str, *, workers: int | None = None, ray_address: str | None = None,
                  on_result: Callable[[Any], None] | None = None) -> list[Any]:
    """Run ``actor.<method>(task)`` for every task on a pool of actors; results as they finish.

    Args:
        actor_class: a plain class; it becomes a Ray actor with restarts and task retries.
        actor_args: ``(actor name, torch threads or None) -> constructor arguments``.
        tasks: picklable task objects.
        method: the name of the actor method that runs one task.
        workers: actors; default one per GPU where the cluster has GPUs, else 1 (never more
            than tasks).
        ray_address: join this cluster; None starts Ray on loopback (and shuts it down after).
        on_result: called with each result as it arrives.

    Actors take one GPU each where there are GPUs; otherwise half a CPU each (whole-CPU actors
    on 2 cores starve Ray's own tasks) and all cores divided among them as torch threads.
    """
    import ray
    from ray.util import ActorPool

    if not tasks:
        return []
    results: list[Any] = []
    started_here, temp_dir = False, None
    if not ray.is_initialized():
        if ray_address:
            join_ray(ray_address)
        else:
            temp_dir = _start_local_ray()
        started_here = True
    try:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        cpus = int(ray.cluster_resources().get("CPU", 1))
        n_workers = max(1, min(workers or (gpus if gpus else 1), len(tasks)))
        if gpus:
            options, threads = {"num_gpus": 1, "num_cpus": 1}, None
        else:
            options, threads = {"num_cpus": 0.5}, max(1, cpus // n_workers)
        remote_class = ray.remote(max_restarts=3, max_task_retries=3)(actor_class)
        actors = [remote_class.options(**options).remote(*actor_args(f"actor-{i}", threads))
                  for i in range(n_workers)]
        pool = ActorPool(actors)
        for res in pool.map_unordered(lambda a, t: getattr(a, method).remote(t), list(tasks)):
            results.append(res)
            if on_result:
                on_result(res)
        for a in actors:
            ray.kill(a)
    finally:
        if started_here:
            ray.shutdown()
        if temp_dir:  # the session's logs and sockets: nothing in them is needed after the run
            shutil.rmtree(temp_dir, ignore_errors=True)
    return results

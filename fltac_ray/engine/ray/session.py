"""Start or join Ray. A Ray we start ourselves binds every process to 127.0.0.1.

Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER once, when it is imported: with it at 0, the node
address resolves to the loopback address, so GCS, raylet, object manager and workers listen on
127.0.0.1 only (checked with `ss -ltnp`). That is both a secure default for users and a rule of
our CI machines, which forbid traffic to any other address.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from fltac_ray.config import EngineConfig

LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


EXPOSED_DASHBOARD_WARNING = (
    "WARNING: engine.dashboard_host = {host!r} exposes Ray's dashboard and job API beyond this "
    "machine. Anyone who can reach it can run code on your cluster. Keep 127.0.0.1 and reach "
    "it through an SSH tunnel (ray dashboard cluster.yaml), with Ray's token authentication on."
)


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost
        return False


def ray_init_kwargs(engine: EngineConfig) -> dict:
    """Arguments for starting a local Ray: bound to loopback, dashboard only on request."""
    return {
        "num_cpus": engine.num_cpus,
        "num_gpus": engine.num_gpus,
        "include_dashboard": engine.dashboard,
        "dashboard_host": engine.dashboard_host,
        "dashboard_port": engine.dashboard_port,
    }


def _force_loopback() -> None:
    os.environ[LOOPBACK_ENV] = "0"
    if "ray._private.ray_constants" in sys.modules:  # ray imported before us: fix the constant too
        sys.modules["ray._private.ray_constants"].ENABLE_RAY_CLUSTER = False


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, naming engine.ray_address, when nothing accepts a connection at a
    host:port address (Ray itself retries its GCS for about a minute). "auto", "local" and
    ray:// client addresses are left to Ray."""
    import socket

    from fltac_ray.errors import ResourceUnavailableError

    if address in ("auto", "local") or "://" in address or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    if not port.isdigit():
        return
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return
    except OSError as exc:
        raise ResourceUnavailableError(
            f"engine.ray_address = {address!r}: no Ray cluster answers there ({exc.strerror or exc}); "
            "start one (`ray start --head`), or give the head node's GCS address (host:6379), or "
            "leave engine.ray_address unset to start a local Ray") from None


def _start_ray(engine: EngineConfig, say: Callable[[str], None]) -> None:
    """Join engine.ray_address, or start a Ray on this machine (loopback, token authentication)."""
    import ray

    kwargs: dict = {"logging_level": logging.WARNING, "log_to_driver": True}
    if engine.ray_address is not None:
        check_reachable(engine.ray_address)
        ray.init(address=engine.ray_address, **kwargs)
        return
    if engine.dashboard and not is_loopback(engine.dashboard_host):
        print(EXPOSED_DASHBOARD_WARNING.format(host=engine.dashboard_host), file=sys.stderr, flush=True)
    # The Ray we start listens on 127.0.0.1 with token authentication (token in
    # ~/.ray/auth_token, see docs/sweeps.md); Ray's notice saying so on every start is noise here.
    notice = logging.getLogger("ray._private.authentication.authentication_token_setup")
    level = notice.level
    notice.setLevel(logging.ERROR)
    try:
        context = ray.init(**ray_init_kwargs(engine), **kwargs)
    finally:
        notice.setLevel(level)
    if engine.dashboard and context.dashboard_url:
        say(f"  Ray dashboard: http://{context.dashboard_url}")


@contextmanager
def ray_session(engine: EngineConfig, say: Callable[[str], None] = print) -> Iterator[bool]:
    """Yield True when this call started Ray (and will stop it), False when Ray was running.
    `say` prints the dashboard's URL and the metrics endpoint (a muted Progress.say: nothing)."""
    if engine.ray_address is None:
        _force_loopback()
    import ray

    started = not ray.is_initialized()
    if started:
        _start_ray(engine, say)
    if engine.metrics:
        say(f"  Ray metrics (Prometheus text, ray_fltac_*): {metrics_endpoint()}")
    try:
        yield started
    finally:
        if started:
            ray.shutdown()


def metrics_endpoint() -> str:
    """The URL where this driver's node serves the run's metrics: the driver records them
    (telemetry.py), and every node serves what its processes record at its MetricsExportPort."""
    import ray

    here = ray.get_runtime_context().get_node_id()
    node = next((n for n in ray.nodes() if n["NodeID"] == here), None)
    if node is None:
        return "(unknown: this driver's node is not in ray.nodes())"
    return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"


def cluster_totals() -> tuple[float, float]:
    import ray

    resources = ray.cluster_resources()
    return float(resources.get("CPU", 0.0)), float(resources.get("GPU", 0.0))

"""A scale-from-zero Ray cluster on this machine for tests: Ray's fake multi-node autoscaler
(what ray.cluster_utils.AutoscalingCluster starts), adapted to share the machine.

AutoscalingCluster itself cannot be used as shipped in Ray 2.60: its base config file
(autoscaler/_private/fake_multi_node/example.yaml) is missing from the wheel, it binds the head
to the fixed port 6379, and it starts and stops with `ray stop --force`, which would also kill
the test suite's own Ray session. This one writes the whole config itself, takes free loopback
ports, and on shutdown kills only the processes of its own session folder. `ray start` also
records its address in <temp>/ray/ray_current_cluster, where every later `ray.init()` without
an address would try to join it: shutdown puts back what the file said before.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LocalAutoscalingCluster:
    """A head with `head_cpus` and an autoscaler that adds up to `max_nodes` nodes of
    `node_cpus` CPUs when tasks, actors or placement groups wait for resources, and removes
    them after `idle_timeout_minutes` idle. Connect with ray.init(address=cluster.address)."""

    def __init__(self, head_cpus: float, node_cpus: float, max_nodes: int, idle_timeout_minutes: float = 1.0):
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.config = {
            "cluster_name": "fltac-ray-test",
            "max_workers": max_nodes,
            "upscaling_speed": 1.0,
            "idle_timeout_minutes": idle_timeout_minutes,
            "provider": {"type": "fake_multinode", "gcs_address": self.address,
                         "disable_launch_config_check": True, "disable_node_updaters": True,
                         "use_node_id_as_ip": True},
            "auth": {"ssh_user": "unused"},
            "available_node_types": {
                "ray.head.default": {"resources": {}, "node_config": {}, "max_workers": 0},
                "node": {"resources": {"CPU": node_cpus}, "node_config": {}, "min_workers": 0,
                         "max_workers": max_nodes},
            },
            "head_node_type": "ray.head.default",
            **{key: [] for key in ("cluster_synced_files", "rsync_exclude", "rsync_filter", "initialization_commands",
                                   "setup_commands", "head_setup_commands", "worker_setup_commands",
                                   "head_start_ray_commands", "worker_start_ray_commands")},
            "file_mounts": {},
            "file_mounts_sync_continuously": False,
        }
        self.head_cpus = head_cpus
        self.session_dir: str | None = None
        self.previous_address: str | None = None

    @staticmethod
    def _address_file() -> Path:
        from ray._common.utils import get_ray_address_file

        return Path(get_ray_address_file(None))

    def start(self) -> None:
        address_file = self._address_file()
        self.previous_address = address_file.read_text() if address_file.is_file() else None
        handle, path = tempfile.mkstemp(prefix="fltac-autoscaler-", suffix=".json")
        with os.fdopen(handle, "w") as file:
            json.dump(self.config, file)
        ray_cli = str(Path(sys.executable).with_name("ray"))
        env = {**os.environ, "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_FAKE_CLUSTER": "1"}
        subprocess.run([ray_cli, "start", "--head", f"--port={self.port}", f"--num-cpus={self.head_cpus}",
                        f"--autoscaling-config={path}", "--include-dashboard=false",
                        f"--ray-client-server-port={free_port()}", "--disable-usage-stats"],
                       env=env, check=True, capture_output=True, timeout=120)

    def connect_info(self) -> None:
        """Call once connected: remember the session folder, which names every process of it."""
        import ray

        self.session_dir = ray._private.worker._global_node.get_session_dir_path()

    def shutdown(self) -> None:
        """Kill the head's and the added nodes' processes: those whose command line names this
        cluster's session folder or port."""
        import psutil

        marks = [f"127.0.0.1:{self.port}", f"--port={self.port}", f"--gcs_server_port={self.port}"]
        if self.session_dir:
            marks.append(self.session_dir)
        address_file = self._address_file()
        if address_file.is_file() and address_file.read_text().strip() == self.address:
            if self.previous_address is None:
                address_file.unlink()
            else:
                address_file.write_text(self.previous_address)
        mine = os.getpid()
        for _ in range(3):
            victims = []
            for process in psutil.process_iter(["pid", "cmdline"]):
                command = " ".join(process.info["cmdline"] or [])
                if process.info["pid"] != mine and any(mark in command for mark in marks):
                    victims.append(process.info["pid"])
            if not victims:
                return
            for pid in victims:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.5)

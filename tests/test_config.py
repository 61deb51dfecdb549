import re
import subprocess
import sys

import pytest
import yaml

from fltac_ray.algorithms.fltac import cluster_count
from fltac_ray.config import ExperimentConfig, build_config, load_config, save_config
from fltac_ray.errors import ConfigError

INVALID = [
    # (raw config, field named in the error, words that must appear)
    ({"model": {"lora": {"rank": 0}}}, "model.lora.rank", "greater than or equal to 1"),
    ({"data": {"dirichlet_alpha": 0}}, "data.dirichlet_alpha", "greater than 0"),
    ({"data": {"dirichlet_alpha": -1.5}}, "data.dirichlet_alpha", "greater than 0"),
    ({"data": {"min_share": 1.0}}, "data.min_share", "less than 1"),
    ({"federation": {"client_fraction": 0}}, "federation.client_fraction", "greater than 0"),
    ({"federation": {"client_fraction": 1.5}}, "federation.client_fraction", "less than or equal to 1"),
    ({"algorithm": {"name": "fltac", "n_clusters": 0}}, "algorithm.n_clusters", "greater than or equal to 1"),
    ({"algorithm": {"name": "fltac", "n_clusters": 31}}, "algorithm.n_clusters", "1..30"),
    ({"federation": {"client_fraction": 0.2}, "algorithm": {"name": "fltac", "n_clusters": 7}},
     "algorithm.n_clusters", "1..6"),
    ({"algorithm": {"name": "fltac", "weighting": "median"}}, "algorithm.weighting", "samples"),
    ({"algorithm": {"name": "fltac", "clustering_backend": "faiss"}}, "algorithm.clustering_backend", "sklearn"),
    ({"federation": {"n_clusters": 2}, "algorithm": {"name": "fltac", "n_clusters": 3}}, "federation.n_clusters",
     "also given as algorithm.n_clusters"),
    ({"data": {"tasks": ["sst2_typo"]}}, "data.tasks", "known tasks"),
    ({"data": {"tasks": []}}, "data.tasks", "at least one"),
    ({"data": {"tasks": ["wordnet_pos", "wordnet_pos"]}}, "data.tasks", "unique"),
    ({"model": {"name": "no-such-model"}}, "model.name", "minilm"),
    ({"algorithm": "fedmystery"}, "algorithm", "fltac"),
    ({"rounds": 0}, "rounds", "greater than or equal to 1"),
    ({"train": {"lr": 0}}, "train.lr", "greater than 0"),
    ({"train": {"local_steps": "many"}}, "train.local_steps", "integer"),
    ({"engine": {"gpus_per_worker": 1.5}}, "engine.gpus_per_worker", "fraction"),
    ({"engine": {"gpus_per_worker": 2}}, "engine.gpus_per_worker", "computes on one GPU"),
    ({"engine": {"gpus_per_worker": -0.1}}, "engine.gpus_per_worker", "greater than or equal to 0"),
    ({"engine": {"clients_per_actor": 1, "num_workers": 2}}, "engine.num_workers", "clients_per_actor"),
    ({"trian": {"lr": 1}}, "trian.lr", "unknown section; did you mean 'train'?"),
    ({"data": {"num_client": 3}}, "data.num_client", "unknown field; did you mean 'num_clients'?"),
    ({"train": {"learning_rate": 1}}, "train.learning_rate", "lr"),
]


@pytest.mark.parametrize(("raw", "field", "words"), INVALID)
def test_invalid_values_name_the_field_and_the_rule(raw, field, words):
    with pytest.raises(ConfigError) as info:
        build_config(raw)
    issues = info.value.issues
    assert any(issue.field == field and words in issue.allowed for issue in issues), str(info.value)
    assert field in str(info.value)


def test_a_bad_setting_given_with_set_says_so_and_the_file_is_not_blamed(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("rounds: 2\ndata: {num_client: 3}\n")
    with pytest.raises(ConfigError) as info:
        load_config(None, ["trian.lr=0.001"])
    assert str(info.value).startswith("invalid experiment configuration in --set:")
    assert "trian.lr = 0.001: (given with --set) unknown section; did you mean 'train'?" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_config(path, ["rounds=0"])
    message = str(info.value)
    assert message.startswith(f"invalid experiment configuration in {path} and --set:")
    assert "rounds = 0: (given with --set) Input should be" in message
    assert "data.num_client = 3: unknown field; did you mean 'num_clients'?" in message  # the file's own
    path.write_text("rounds: 2\n")
    with pytest.raises(ConfigError, match=re.escape(f"in --set (over {path}):")):
        load_config(path, ["rounds=0"])


def test_error_message_shows_the_value():
    with pytest.raises(ConfigError) as info:
        build_config({"data": {"dirichlet_alpha": -1.5}})
    assert "data.dirichlet_alpha = -1.5" in str(info.value)


def test_settings_of_earlier_versions_move_under_the_algorithm():
    """Run folders written before these were algorithm options load (and resume) as they are."""
    moved = build_config({"federation": {"n_clusters": 2, "weighting": "uniform", "kmeans_n_init": 5}})
    assert (moved.options.n_clusters, moved.options.weighting, moved.options.kmeans_n_init) == (2, "uniform", 5)
    assert "n_clusters" not in moved.resolved()["federation"]  # saved where it lives now
    assert build_config({"algorithm": "floral", "floral": {"temperature": 2.0}}).options.temperature == 2.0
    assert build_config({"algorithm": "fedit", "federation": {"fedit_budget": "per_adapter"}}).options.budget == "per_adapter"
    same = build_config({"algorithm": {"name": "fltac", "n_clusters": 2}, "federation": {"n_clusters": 2}})
    assert same.options.n_clusters == 2  # given twice alike: no conflict


def test_cross_field_message_names_field_and_value():
    with pytest.raises(ConfigError) as info:
        build_config({"algorithm": {"name": "fltac", "n_clusters": 31}})
    issue = info.value.issues[0]
    assert (issue.field, issue.value) == ("algorithm.n_clusters", 31)


def test_defaults_follow_the_paper_federation():
    config = ExperimentConfig()
    assert (config.data.num_clients, config.data.dirichlet_alpha, config.data.resolved_min_share) == (10, 0.5, 0.01)
    assert cluster_count(config) == len(config.data.tasks) == 3


def test_share_threshold_scales_with_the_federation_unless_set():
    assert build_config({"data": {"num_clients": 500}}).data.resolved_min_share == pytest.approx(0.0002)
    assert build_config({"data": {"num_clients": 500, "min_share": 0.01}}).data.resolved_min_share == 0.01
    assert ExperimentConfig().resolved()["data"]["min_share"] == 0.01  # written out, as run


def test_yaml_overrides_and_round_trip(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("name: demo\ntrain:\n  lr: 0.01\n")
    config = load_config(path, ["rounds=3", "train.lr=1e-3", "data.tasks=[wordnet_pos]"])
    assert (config.name, config.rounds, config.train.lr, config.data.tasks) == ("demo", 3, 1e-3, ["wordnet_pos"])
    save_config(config, tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    # written as run: K and the share threshold resolved
    assert again.model_copy(update={"algorithm_options": {}}) == config.model_copy(
        update={"data": config.data.model_copy(update={"min_share": 0.01})})
    assert again.options == config.options.model_copy(update={"n_clusters": 1})


@pytest.mark.parametrize(
    ("text", "words"),
    [("name: [unclosed\n", "malformed YAML"), ("- a\n- b\n", "mapping")],
)
def test_malformed_yaml(tmp_path, text, words):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=words):
        load_config(path)


def test_missing_file():
    from fltac_ray.errors import ExperimentFileError

    with pytest.raises(ExperimentFileError, match="experiment file does/not/exist.yaml: no such file"):
        load_config("does/not/exist.yaml")


@pytest.mark.parametrize("override", ["rounds", "=3", "train..lr=1", "rounds.x=1"])
def test_bad_overrides(override):
    with pytest.raises(ConfigError):
        load_config(None, [override])


def test_experiment_files_validate():
    from pathlib import Path

    from fltac_ray.compare import load_variants
    from fltac_ray.tune import load_sweep

    paths = sorted(Path(__file__).parents[1].glob("experiments/*.yaml"))
    assert len(paths) >= 3
    for path in paths:
        raw = yaml.safe_load(path.read_text())
        assert raw  # not empty
        if "search" in raw:  # a sweep file: its base and every grid combination must validate
            spec, _ = load_sweep(path)
            assert spec.search, path
            continue
        variants = load_variants(path)
        if variants is None:
            assert isinstance(load_config(path), ExperimentConfig), path
        else:
            assert len(variants) >= 2, path


def test_config_validation_imports_neither_ray_nor_torch():
    # Validation runs before any Ray process exists and must stay cheap.
    code = (
        "import sys; from fltac_ray.config import build_config; build_config({'rounds': 2}); "
        "print('ray' in sys.modules, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]

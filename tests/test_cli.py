import pandas as pd
import pytest
import yaml

from fltac_ray.cli import main

from .conftest import TINY_EXPERIMENT


@pytest.fixture
def tiny_yaml(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY_EXPERIMENT))
    return path


@pytest.mark.usefixtures("ray_cluster")
def test_run_with_overrides(tiny_yaml, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", str(tiny_yaml), "--set", "rounds=1", "--set", "train.local_steps=1",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "round   1/1" in printed and "cluster acc" in printed
    assert "  Ray metrics (Prometheus text, ray_fltac_*): http://127.0.0.1:" in printed  # this Ray's own port
    assert len(pd.read_csv(out / "rounds.csv")) == 1
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["local_steps"] == 1
    # the final summary table and the report
    assert "best round" in printed and "1 rounds (0 rejected)" in printed
    assert f"[fltac-ray] report: {out / 'report.html'}" in printed and (out / "report.html").is_file()


@pytest.mark.usefixtures("ray_cluster")
def test_quiet_run_without_report_prints_nothing(tiny_yaml, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", str(tiny_yaml), "--set", "rounds=1", "--out", str(out), "--quiet", "--no-report"]) == 0
    assert capsys.readouterr().out == ""
    assert (out / "rounds.csv").is_file() and not (out / "report.html").exists()


def test_bad_config_exits_2_naming_the_field(tiny_yaml, capsys):
    assert main(["run", str(tiny_yaml), "--set", "data.dirichlet_alpha=0"]) == 2
    err = capsys.readouterr().err
    assert "data.dirichlet_alpha = 0" in err and "greater than 0" in err


def test_validate_prints_resolved_config(tiny_yaml, capsys):
    assert main(["validate", str(tiny_yaml), "--set", "seed=5"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["seed"] == 5 and resolved["algorithm"]["n_clusters"] == 3


def test_tasks_lists_registries(capsys):
    assert main(["tasks"]) == 0
    out = capsys.readouterr().out
    assert "wordnet_noun_supersense" in out and "minilm" in out and "fltac" in out


def test_params_prints_the_counts_without_library_warnings(tiny_yaml, capsys):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["params", str(tiny_yaml)]) == 0
    assert "LoRA parameters per adapter" in capsys.readouterr().out
    # peft reads transformers' deprecated is_gradient_checkpointing once per wrapped model
    assert not [w for w in caught if issubclass(w.category, FutureWarning)]

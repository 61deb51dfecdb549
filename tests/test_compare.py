import pandas as pd
import pytest
import yaml

from fltac_ray.cli import main
from fltac_ray.compare import load_variants
from fltac_ray.errors import ConfigError

from .conftest import TINY_EXPERIMENT


def _write(tmp_path, compare, **base):
    raw = {**TINY_EXPERIMENT, **base, "compare": compare}
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_variants_merge_base_entry_and_overrides(tmp_path):
    path = _write(tmp_path, [{"algorithm": "fltac"},
                             {"label": "fedit_r3", "algorithm": "fedit", "model": {"lora": {"rank": 3}}}])
    fltac, fedit = load_variants(path, ["train.lr=0.05"])
    assert (fltac.label, fedit.label) == ("fltac", "fedit_r3")
    assert fedit.config.model.lora.rank == 3 and fedit.config.model.name == "tiny-random-bert"
    assert fltac.config.train.lr == fedit.config.train.lr == 0.05  # --set applies to every entry


def test_plain_experiment_is_not_a_comparison(tmp_path):
    path = tmp_path / "plain.yaml"
    path.write_text(yaml.safe_dump(TINY_EXPERIMENT))
    assert load_variants(path) is None


@pytest.mark.parametrize(
    ("compare", "words"),
    [
        ([], "non-empty list"),
        (["fltac"], "non-empty list"),
        ([{"algorithm": "fltac"}, {"algorithm": "fltac"}], "labels must be unique"),
        ([{"algorithm": "fltac"}, {"label": "b", "data": {"dirichlet_alpha": 5.0}}], "same partition"),
        ([{"algorithm": "fltac"}, {"label": "b", "seed": 3}], "same partition"),
        ([{"algorithm": "fltac"}, {"algorithm": {"name": "fedit", "n_clusters": 2}}], "compare[1] (fedit)"),
    ],
)
def test_bad_comparisons_fail_before_running(tmp_path, compare, words):
    with pytest.raises(ConfigError) as info:
        load_variants(_write(tmp_path, compare))
    assert words in str(info.value)


@pytest.mark.usefixtures("ray_cluster")
def test_comparison_runs_every_variant_and_writes_tables(tmp_path, capsys):
    path = _write(tmp_path, [{"algorithm": "fltac"}, {"algorithm": "local"}], rounds=1)
    out = tmp_path / "cmp"
    assert main(["run", str(path), "--out", str(out)]) == 0
    tidy = pd.read_csv(out / "comparison.csv")
    assert set(tidy["label"]) == {"fltac", "local"}
    assert len(tidy) == 2 * 3 * 2  # variants x tasks x (round 0 and the one round)
    assert sorted(set(tidy["round"])) == [0, 1]
    assert {"algorithm", "lora_rank", "round", "task", "accuracy", "params_up_per_client"} <= set(tidy.columns)
    summary = pd.read_csv(out / "summary.csv").set_index("label")
    assert summary.loc["local", "params_up_per_client_per_round"] == 0
    assert summary.loc["fltac", "params_up_per_client_per_round"] > 0
    assert (out / "fltac" / "metrics.csv").is_file() and (out / "local" / "metrics.csv").is_file()
    # both runs used the same partition
    pd.testing.assert_frame_equal(pd.read_csv(out / "fltac" / "partition.csv"),
                                  pd.read_csv(out / "local" / "partition.csv"))
    assert "params_up/client/round" in capsys.readouterr().out

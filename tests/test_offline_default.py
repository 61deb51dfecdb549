"""The default offline experiment on the real packaged MiniLM and WordNet (slow: ~2 minutes)."""

from pathlib import Path

import pytest

from fltac_ray.config import load_config
from fltac_ray.engine.simulation import Simulation
from fltac_ray.progress import Progress

EXPERIMENT = Path(__file__).parents[1] / "experiments" / "offline_text.yaml"


@pytest.mark.slow
@pytest.mark.usefixtures("ray_cluster")
def test_offline_default_learns_every_task_and_recovers_the_clusters(tmp_path):
    config = load_config(EXPERIMENT, ["rounds=3"])
    if not Path(config.data.wordnet_dir, "data.noun").is_file():
        pytest.skip("WordNet data not installed (apt-get install wordnet-base); CI installs it")
    result = Simulation(config, out=str(tmp_path / "run"), progress=Progress(quiet=True)).run()
    final = result.metrics[result.metrics["round"] == 3]
    assert len(final) == 3
    for row in final.itertuples():
        assert row.accuracy > row.majority_accuracy + 0.1, row
    assert result.rounds["clustering_accuracy"].iloc[-1] == 1.0

    # `fltac-ray report` draws every figure of the issue from this run
    from fltac_ray.cli import main

    assert main(["report", str(result.run_dir)]) == 0
    pngs = {p.stem for p in (result.run_dir / "report").glob("*.png")}
    assert pngs == {"task_accuracy", "clustering", "adapters", "task_radar", "client_tasks", "accuracy_vs_bytes"}
    assert "Not drawn" not in (result.run_dir / "report.html").read_text()


def test_the_quick_profile_runs_the_default_pipeline_in_process_on_the_tiny_model(tmp_path, capsys):
    """`fltac-ray run experiments/offline_text.yaml --quick`: the same pipeline (report and export
    included) in process, on the text modality's tiny model, 4 clients, 2 rounds; a --set given
    with it wins."""
    import yaml

    from fltac_ray.cli import main

    if not Path(load_config(EXPERIMENT).data.wordnet_dir, "data.noun").is_file():
        pytest.skip("WordNet data not installed (apt-get install wordnet-base); CI installs it")
    out = tmp_path / "quick"
    assert main(["run", str(EXPERIMENT), "--quick", "--set", "rounds=1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "[fltac-ray] quick profile: engine.backend=local, model.name=tiny-random-bert" in printed
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["engine"]["backend"] == "local" and saved["model"]["name"] == "tiny-random-bert"
    assert (saved["data"]["num_clients"], saved["data"]["train_per_task"], saved["train"]["local_steps"]) == (4, 64, 2)
    assert saved["rounds"] == 1  # the --set, over the profile's 2
    assert saved["data"]["tasks"] == load_config(EXPERIMENT).data.tasks  # the experiment's own tasks
    assert (out / "report.html").is_file() and (out / "adapters" / "index.json").is_file()
    assert main(["run", "--resume", str(out), "--quick"]) == 2
    assert "no --set, --out or --quick" in capsys.readouterr().err

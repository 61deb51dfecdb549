"""Reliability: every bad input a clear, typed error before any actor starts; every fault an
exact recovery. RELIABILITY_TABLE lists each guarantee (issue 18's rows, then the faults found
since) with the fast cases that assert it on tiny models — a message, or results equal to an
uninterrupted run's — in this file unless a module is named; docs/reliability.md
is the same list in words. test_the_reliability_table_names_existing_tests keeps it honest."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import yaml
from safetensors.numpy import load_file

from fltac_ray.algorithms import AdapterSpec, FederatedAlgorithm, Upload
from fltac_ray.config import build_config
from fltac_ray.engine.messages import PassResult
from fltac_ray.engine.simulation import Simulation
from fltac_ray.errors import AlgorithmError, ConfigError
from fltac_ray.progress import Progress
from fltac_ray.runs.checkpoint import CheckpointError, read_checkpoint
from fltac_ray.server.server import Server

from .conftest import TINY_EXPERIMENT, tiny_config

COMPARED = ["round", "task", "accuracy", "loss", "test_samples"]

RELIABILITY_TABLE = {
    "1 bad data files: DataFileError naming the file, the row or column, what is allowed": [
        "test_hf_data.py::test_a_bad_data_file_is_a_data_file_error_naming_the_file_and_the_problem",
        "test_hf_data.py::test_missing_local_file_is_a_clear_error"],
    "2 unusable output locations: RunFolderError first, before the data; no empty folder left": [
        "test_unusable_output_locations_are_run_folder_errors_before_anything_runs",
        "test_the_run_folder_is_checked_before_the_data_and_a_failed_start_leaves_no_folder"],
    "3 checkpoints: a manifest over every file, names confined, edits refused, fallback": [
        "test_checkpoint.py::test_an_edited_state_is_refused",
        "test_checkpoint.py::test_a_file_named_outside_the_folder_is_refused_even_with_a_matching_manifest",
        "test_checkpoint.py::test_damaged_newest_checkpoint_falls_back_to_the_previous",
        "test_damaged_newest_checkpoint_falls_back_and_redoes_the_round"],
    "4 a worker lost after a stale checkpoint: results equal the uninterrupted run's": [
        "test_worker_killed_mid_round_is_restarted_and_changes_nothing"],
    "5 a run killed in round 1 resumes from the start to the same results": [
        "test_a_run_killed_in_round_1_resumes_from_the_start_to_the_same_results",
        "test_driver_killed_with_sigkill_resumes_to_the_same_results"],
    "6 resume refuses a config edited in a results-changing field, allows resources": [
        "test_resume_refuses_an_edited_config_and_allows_resource_changes"],
    "7 errors by kind, each with its heading; exit codes": [
        "test_every_kind_of_error_has_its_heading_and_exit_code_2",
        "test_resume_of_no_run_dir_or_of_recorded_rounds_without_checkpoint_is_a_clear_error"],
    "8 strict validation (no bool for a number, finite floats, library ranges), sizes against memory, "
    "an unreachable ray_address in seconds": [
        "test_bad_configs_fail_before_ray_is_even_imported", "test_data_memory_estimate_hand_computed",
        "test_an_unreachable_ray_address_fails_in_seconds_naming_it"],
    "9 a round whose uploads are all rejected says so: round line, summary, exit code 3, rounds.csv": [
        "test_a_run_whose_uploads_are_all_rejected_says_so_everywhere",
        "test_server_rejects_bad_uploads_before_aggregating_and_keeps_their_state"],
    "10 run directories stay inside output_dir": ["test_bad_configs_fail_before_ray_is_even_imported"],
    "11 adversarial clients (federation.attack) and screening that holds for FL-TAC": [
        "test_attacks.py::test_three_attackers_hijack_kmeans_unless_screened",
        "test_attacks.py::test_malicious_workers_send_the_attack_and_honest_ones_do_not_change",
        "test_attacks.py::test_screening_on_the_ray_engine_drops_the_attackers_and_says_so",
        "test_attacks.py::test_only_neighbours_catches_a_sign_flip_at_scale_1",
        "test_robust_aggregation_runs_on_the_engine"],
    "12 a worker (or node) lost in any phase: retried, results unchanged": [
        "test_multinode.py::test_a_node_lost_in_each_phase_leaves_the_results_unchanged",
        "test_worker_killed_mid_round_is_restarted_and_changes_nothing"],
    "13 fractional labels refused; crashed checkpoint writes cleaned; one process per run folder": [
        "test_hf_data.py::test_a_bad_data_file_is_a_data_file_error_naming_the_file_and_the_problem",
        "test_checkpoint.py::test_an_unlisted_file_is_refused_and_a_crashed_write_is_cleaned_up",
        "test_a_run_folder_held_by_a_run_is_refused"],
    "round results of a round never closed are dropped; a too-small round is rejected, state kept": [
        "test_server_drops_the_results_of_a_round_it_never_closed",
        "test_round_with_too_few_results_is_rejected_and_state_unchanged",
        "test_failed_clients_are_recorded_when_the_round_still_counts"],
    "issue 33, 3: a run folder of the previous config format resumes, compared by meaning": [
        "test_a_run_folder_of_the_previous_format_resumes_to_the_same_results"],
    "issue 33, 6: the run's decisions recorded and reused; a resume may switch backend, same numbers": [
        "test_resume_refuses_an_edited_config_and_allows_resource_changes",
        "test_a_ray_run_resumes_on_the_local_backend_to_the_same_results",
        "test_resume_of_no_run_dir_or_of_recorded_rounds_without_checkpoint_is_a_clear_error"],
    "issue 33, 1: a resume reads the data files the run was built from (absolute path, SHA-256), refuses changed": [
        "test_a_resume_reads_the_files_the_run_was_built_from_and_refuses_changed_ones",
        "test_data_fingerprints_hand_checked"],
    "issue 33, 2: checkpoint and run-folder files read only as regular files inside the folder": [
        "test_checkpoint.py::test_links_and_special_files_are_refused_not_followed_or_waited_on",
        "test_checkpoint.py::test_regular_file_reading_refuses_links_pipes_and_oversized_files",
        "test_a_run_folder_with_a_link_or_a_pipe_is_not_resumed"],
    "issue 33, 4: every server answer checked like an upload; a bad one ends the run naming the hook": [
        "test_a_server_answer_with_nan_ends_the_run_naming_the_hook_and_keeps_the_last_checkpoint",
        "test_answers_and_merged_adapters_are_checked_like_uploads"],
    "issue 33, 5: screening says when it may not hold (a group apart kept): round line, rounds.csv, summary": [
        "test_attacks.py::test_screening_says_when_half_of_the_uploads_overwhelm_it",
        "test_attacks.py::test_a_group_apart_from_the_rest_hand_computed"],
    "issue 33, 7: library failures are typed errors: the Hub on a push, an MLflow store (checked first)": [
        "test_export.py::test_a_push_that_cannot_reach_the_hub_is_a_resources_error",
        "test_tracking.py::test_an_unwritable_mlflow_store_is_refused_before_anything_starts",
        "test_tracking.py::test_an_mlflow_store_that_does_not_answer_is_a_resources_error_and_closes_nothing"],
    "issue 33, 10: exports written whole, renamed into place; a killed one leaves the previous": [
        "test_export.py::test_an_export_killed_midway_leaves_no_folder_that_looks_like_one",
        "test_export.py::test_a_run_export_replaces_the_previous_one_whole_or_not_at_all"],
    "issue 33, 7 and 8: hostile experiment files (aliases, size, binary) refused in under a second": [
        "test_hostile_experiment_files_are_refused_before_parsing_or_expanding"],
    "issue 33, 9: a data error quotes no file content beyond a short label or header name": [
        "test_a_data_error_quotes_no_file_content", "test_a_short_label_and_a_real_header_are_still_quoted"],
}


def _run(config, out):
    return Simulation(config, out=str(out), progress=Progress(quiet=True)).run()


def _adapters(run_dir):
    folder = run_dir / "adapters"
    found = {p.relative_to(folder).as_posix(): load_file(str(p)) for p in sorted(folder.glob("*/*.safetensors"))}
    assert found, f"no exported adapter under {folder}"  # the comparison must compare something
    return found


def _assert_same_results(a, b):
    pd.testing.assert_frame_equal(a.metrics[COMPARED], b.metrics[COMPARED], rtol=1e-5)
    left, right = _adapters(a.run_dir), _adapters(b.run_dir)
    assert left.keys() == right.keys()
    for name in left:
        for tensor in left[name]:
            np.testing.assert_allclose(left[name][tensor], right[name][tensor], rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def reference(ray_cluster, tmp_path_factory):
    """An uninterrupted 3-round run every recovery must reproduce."""
    return _run(tiny_config(rounds=3, engine={"num_workers": 2}), tmp_path_factory.mktemp("ref") / "run")


@pytest.mark.usefixtures("ray_cluster")
@pytest.mark.parametrize(("checkpoint_every", "kill_round"), [(1, 2), (2, 3)])
def test_worker_killed_mid_round_is_restarted_and_changes_nothing(reference, tmp_path, checkpoint_every,
                                                                   kill_round):
    # (2, 3): the newest checkpoint is a round old when the worker dies (issue 18, item 4); workers
    # hold no client state, so the retried passes start from the committed state all the same
    config = tiny_config(rounds=3, engine={"num_workers": 2, "kill_worker_at": [0, kill_round],
                                           "checkpoint_every": checkpoint_every})
    recovered = _run(config, tmp_path / "run")
    assert (recovered.rounds["status"] == "ok").all()
    assert recovered.rounds["failed_clients"].isna().all()
    _assert_same_results(recovered, reference)


@pytest.mark.usefixtures("ray_cluster")
def test_round_with_too_few_results_is_rejected_and_state_unchanged(tmp_path):
    config = tiny_config(rounds=2, engine={"num_workers": 2, "kill_worker_at": [0, 2], "max_retries": 0,
                                           "keep_checkpoints": 3},
                         federation={"min_completion_rate": 1.0})
    result = _run(config, tmp_path / "run")
    rounds = result.rounds.set_index("round")
    assert rounds.loc[2, "status"] == "rejected"
    assert str(rounds.loc[2, "failed_clients"]).strip()  # names the failed clients
    assert 2 not in set(result.metrics["round"])
    before = read_checkpoint(result.run_dir / "checkpoints" / "round_00001").groups
    after = read_checkpoint(result.run_dir / "checkpoints" / "round_00002").groups
    for group in ("clients", "server"):
        assert before[group].keys() == after[group].keys()
        for key in before[group]:
            np.testing.assert_array_equal(before[group][key], after[group][key])


@pytest.mark.usefixtures("ray_cluster")
def test_failed_clients_are_recorded_when_the_round_still_counts(tmp_path):
    config = tiny_config(rounds=2, engine={"num_workers": 2, "kill_worker_at": [1, 1], "max_retries": 0},
                         federation={"min_completion_rate": 0.0})
    result = _run(config, tmp_path / "run")
    first = result.rounds.set_index("round").loc[1]
    assert first["status"] == "ok" and str(first["failed_clients"]).strip()
    failed = {int(c) for c in str(first["failed_clients"]).split()}
    assert first["adapters"] < 12 and failed  # the failed clients' adapters were not uploaded
    assert result.rounds.set_index("round").loc[2, "status"] == "ok"  # the worker was replaced


def test_driver_killed_with_sigkill_resumes_to_the_same_results(ray_cluster, reference, tmp_path):
    address = ray_cluster.get_runtime_context().gcs_address
    # 20 rounds, so the driver is still running when round 1's checkpoint appears (3 tiny rounds
    # can finish between two polls); rounds 1-3 are compared with the 3-round reference.
    raw = {**TINY_EXPERIMENT, "rounds": 20}
    raw["engine"] = {"num_workers": 2, "ray_address": address}
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(raw))
    run_dir = tmp_path / "run"
    driver = subprocess.Popen([sys.executable, "-m", "fltac_ray.cli", "run", str(path), "--out", str(run_dir),
                               "--quiet"], env={**os.environ, "PYTHONUNBUFFERED": "1"})
    checkpoints = run_dir / "checkpoints"
    while driver.poll() is None and not (checkpoints / "round_00001" / "state.json").is_file():
        time.sleep(0.05)
    assert driver.poll() is None, "the driver finished before it could be killed"
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    resumed = Simulation.resume(run_dir, progress=Progress(quiet=True)).run()
    assert resumed.rounds["round"].tolist() == list(range(1, 21))
    first_three = resumed.metrics[resumed.metrics["round"] <= 3].reset_index(drop=True)
    pd.testing.assert_frame_equal(first_three[COMPARED], reference.metrics[COMPARED], rtol=1e-5)


@pytest.mark.usefixtures("ray_cluster")
def test_damaged_newest_checkpoint_falls_back_and_redoes_the_round(reference, tmp_path, capsys):
    result = _run(tiny_config(rounds=3, engine={"num_workers": 2}), tmp_path / "run")
    newest = result.run_dir / "checkpoints" / "round_00003" / "clients.safetensors"
    newest.write_bytes(newest.read_bytes()[:50])
    resumed = Simulation.resume(result.run_dir, progress=Progress()).run()
    out = capsys.readouterr().out
    assert "skipping checkpoint" in out and "resuming" in out and "after round 2" in out
    _assert_same_results(resumed, reference)


def test_resume_of_no_run_dir_or_of_recorded_rounds_without_checkpoint_is_a_clear_error(tmp_path):
    from fltac_ray.errors import RunFolderError

    with pytest.raises(RunFolderError, match="not a run directory"):
        Simulation.resume(tmp_path)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(tiny_config().resolved()))
    (tmp_path / "rounds.csv").write_text("round,status\n1,ok\n")  # a round recorded, its checkpoint gone
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        Simulation.resume(tmp_path, progress=Progress(quiet=True)).run()
    for text, words in [("{", "decisions.json is not readable JSON"),
                        ('{"min_passes": 2}', "decisions.json must hold exactly"),
                        ('{"min_passes": 0, "gpus_per_worker": 0, "max_batched_adapters": 32, "max_pass_examples": 128}',
                         "decisions.json: min_passes = 0: must be a whole number >= 1")]:
        (tmp_path / "decisions.json").write_text(text)
        with pytest.raises(RunFolderError, match=words):
            Simulation.resume(tmp_path, progress=Progress(quiet=True)).run()


@pytest.mark.usefixtures("ray_cluster")
def test_a_run_killed_in_round_1_resumes_from_the_start_to_the_same_results(reference, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()  # what a run killed before its first checkpoint leaves: its config, empty tables
    (run_dir / "config.yaml").write_text(yaml.safe_dump(tiny_config(rounds=3, engine={"num_workers": 2}).resolved()))
    (run_dir / "rounds.csv").write_text("round,status\n")
    resumed = Simulation.resume(run_dir, progress=Progress()).run()
    assert "starting it over from round 1" in capsys.readouterr().out
    _assert_same_results(resumed, reference)


@pytest.mark.usefixtures("ray_cluster")
def test_resume_refuses_an_edited_config_and_allows_resource_changes(reference, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(reference.run_dir, run_dir)
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    edited = {**saved, "seed": 8, "train": {**saved["train"], "lr": 0.5}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(edited))
    with pytest.raises(ConfigError) as info:
        Simulation.resume(run_dir, progress=Progress(quiet=True)).run()
    message = str(info.value)
    assert "seed = 8: was 0 when round 3 was checkpointed" in message and "train.lr = 0.5" in message
    # resources and reporting may change: the finished run resumes (nothing left to do), saying so
    relaxed = {**saved, "engine": {**saved["engine"], "num_workers": 1, "max_retries": 5}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(relaxed))
    lines = []
    progress = Progress(bar=False)
    progress.say = lines.append
    Simulation.resume(run_dir, progress=progress).run()
    assert any("engine.max_retries" in line and "-> 5" in line and "engine.num_workers 2 -> 1" in line
               for line in lines), lines
    # config.yaml holds the experiment as given; what the run decided at its start is beside it,
    # and a resume on one worker keeps cutting rounds into the first start's 2 passes
    assert saved["engine"]["min_passes"] is None and saved["engine"]["max_batched_adapters"] == "auto"
    decided = json.loads((run_dir / "decisions.json").read_text())
    assert (decided["min_passes"], decided["max_batched_adapters"]) == (2, 32)


@pytest.mark.usefixtures("ray_cluster")
def test_a_ray_run_resumes_on_the_local_backend_to_the_same_results(reference, tmp_path, capsys):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(reference.run_dir, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "round_00003")  # as if stopped after round 2
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    (run_dir / "config.yaml").write_text(yaml.safe_dump({**saved, "engine": {**saved["engine"], "backend": "local"}}))
    resumed = Simulation.resume(run_dir, progress=Progress()).run()
    out = capsys.readouterr().out
    assert "engine.backend 'ray' -> 'local'" in out and "backend local" in out and "after round 2" in out
    _assert_same_results(resumed, reference)


def _previous_format(resolved: dict) -> dict:
    """A resolved config as fltac-ray wrote it before the averaging and K-means settings became
    FL-TAC's options and before decisions.json: `algorithm: fltac`, the options under
    federation, and the engine's decided values in the config itself."""
    import copy

    from fltac_ray.config import MOVED_TO_ALGORITHM

    old = copy.deepcopy(resolved)
    options = dict(old.pop("algorithm"))
    old["algorithm"] = options.pop("name")
    # only the options that format had (FL-TAC's later ones, e.g. cluster_on, did not exist)
    had = {option: key for (_, key), option in MOVED_TO_ALGORITHM.items()}
    old["federation"].update({had[option]: value for option, value in options.items() if option in had})
    old["engine"].update(min_passes=2, max_batched_adapters=32)
    return old


def test_a_run_folder_of_the_previous_format_resumes_to_the_same_results(tmp_path, capsys):
    import shutil

    from fltac_ray.runs.checkpoint import save_checkpoint

    engine = {"backend": "local", "min_passes": 2, "checkpoint_every": 1, "keep_checkpoints": 3}
    whole = _run(tiny_config(rounds=3, engine=engine), tmp_path / "whole")
    run_dir = tmp_path / "old"
    shutil.copytree(whole.run_dir, run_dir)
    (run_dir / "decisions.json").unlink()
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    (run_dir / "config.yaml").write_text(yaml.safe_dump(_previous_format(saved)))
    checkpoints = run_dir / "checkpoints"
    shutil.rmtree(checkpoints / "round_00003")  # as if stopped after round 2
    second = read_checkpoint(checkpoints / "round_00002")
    second.meta["config"] = _previous_format(second.meta["config"])
    shutil.rmtree(checkpoints / "round_00002")
    save_checkpoint(checkpoints, second, keep=3)
    resumed = Simulation.resume(run_dir, progress=Progress()).run()
    out = capsys.readouterr().out
    assert "after round 2" in out and "changed settings" not in out  # the same settings, moved
    _assert_same_results(resumed, whole)


def test_a_run_folder_held_by_a_run_is_refused(tmp_path):
    from fltac_ray.errors import RunFolderError
    from fltac_ray.runs.outputs import hold_run_folder

    held = hold_run_folder(tmp_path)
    with pytest.raises(RunFolderError, match=f"is in use by process {os.getpid()}"):
        hold_run_folder(tmp_path)
    child = subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; "
                            "from fltac_ray.runs.outputs import hold_run_folder; hold_run_folder(Path(sys.argv[1]))",
                            str(tmp_path)], capture_output=True, text=True)
    assert child.returncode != 0 and "RunFolderError" in child.stderr  # another process too
    held.close()
    hold_run_folder(tmp_path).close()  # free again once the holder is done


def _server(config, size: int) -> Server:
    layout = (("layer.lora_A.default.weight", (size,)),)
    server = Server(config, config.algorithm_class, AdapterSpec(layout))
    server.set_initial(np.zeros((1, size), np.float32))
    return server


def _result(uploads: list[Upload], size: int) -> PassResult:
    keys = [u.key for u in uploads]
    return PassResult(uploads, keys, np.zeros((len(keys), size), np.float32))


def _close(server: Server, round_index: int, expected: list, clients: int, *results: PassResult):
    for unit, result in enumerate(results):
        server.receive(round_index, unit, result, None)
    return server.close_round(round_index, expected, clients)


def test_server_drops_the_results_of_a_round_it_never_closed():
    server = _server(build_config({"algorithm": "fedit"}), 3)
    server.receive(1, 0, _result([Upload((0, 0), np.ones(3, np.float32), 2)], 3), None)  # round 1 rejected
    outcome = _close(server, 2, [(1, 0)], 1, _result([Upload((1, 0), np.full(3, 2, np.float32), 2)], 3))
    assert outcome.keys == [(1, 0)] and outcome.uploads == 1
    assert server.state_view().adapter((0, 0)) is None  # round 1's pass never committed
    np.testing.assert_allclose(server.state_view().adapter((1, 0)), [2.0, 2.0, 2.0])
    assert _close(server, 3, [], 0).uploads == 0  # closing empties what was received


def test_server_rejects_bad_uploads_before_aggregating_and_keeps_their_state():
    server = _server(build_config({"algorithm": "fedit"}), 3)
    good = np.ones(3, np.float32)
    uploads = [Upload(key, vector.astype(np.float32), samples) for key, vector, samples in [
        ((0, 0), good, 2), ((1, 0), np.array([np.nan, 1, 1]), 2), ((2, 0), np.array([1, np.inf, 1]), 2),
        ((3, 0), good * 3, 0), ((4, 0), good * 5, 2), ((9, 0), good, 2)]]
    duplicate = Upload((4, 0), good * 100, 2)
    outcome = _close(server, 1, [(0, 0), (1, 0), (2, 0), (3, 0), (4, 0)], 5,
                     _result(uploads, 3), _result([duplicate], 3))
    reasons = dict(outcome.rejected)
    assert "non-finite" in reasons[(1, 0)] and "non-finite" in reasons[(2, 0)]
    assert "sample count" in reasons[(3, 0)]
    assert "unexpected" in reasons[(9, 0)]
    assert "duplicate" in reasons[(4, 0)]
    assert outcome.keys == [(0, 0), (4, 0)]
    assert outcome.uploads == 7 and outcome.params_up == 7 * 3  # every upload received counts
    # (1 + 5) / 2: the duplicate ignored; the accepted clients hold the answer (one stored row)
    state = server.state_view()
    np.testing.assert_allclose(state.adapter((0, 0)), [3.0, 3.0, 3.0])
    np.testing.assert_allclose(state.adapter((4, 0)), [3.0, 3.0, 3.0])
    assert state.adapter((1, 0)) is None  # rejected: as before the round (never trained)
    assert len(state.rows) == 1


def test_server_rejects_wrong_shapes():
    server = _server(build_config({"algorithm": "fedit"}), 4)
    outcome = _close(server, 1, [(0, 0), (1, 0)], 2,
                     _result([Upload((0, 0), np.ones(3, np.float32), 1)], 4),
                     _result([Upload((1, 0), np.ones(4, np.float64), 1)], 4))
    reasons = dict(outcome.rejected)
    assert "shape" in reasons[(0, 0)] and "dtype" in reasons[(1, 0)]
    assert outcome.keys == []


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"algorithm": {"name": "fltac", "aggregation": "trimmed_mean", "trim_fraction": 0.5}}, "algorithm.trim_fraction"),
        ({"algorithm": {"name": "fltac", "aggregation": "trimmed_mean", "trim_fraction": 0.7}}, "algorithm.trim_fraction"),
        ({"algorithm": {"name": "fltac", "trim_fraction": 0.2}}, "algorithm.trim_fraction"),
        ({"algorithm": {"name": "fedit", "aggregation": "krum"}}, "algorithm.aggregation"),
        ({"federation": {"min_completion_rate": 1.5}}, "federation.min_completion_rate"),
    ],
)
def test_impossible_robust_settings_fail_validation(raw, field):
    with pytest.raises(ConfigError) as info:
        build_config(raw)
    assert info.value.issues[0].field == field


@pytest.mark.usefixtures("ray_cluster")
def test_robust_aggregation_runs_on_the_engine(tmp_path):
    config = tiny_config(rounds=1, algorithm={"name": "fltac", "aggregation": "trimmed_mean", "trim_fraction": 0.2})
    result = _run(config, tmp_path / "run")
    assert (result.rounds["status"] == "ok").all()
    saved = yaml.safe_load((result.run_dir / "config.yaml").read_text())
    assert saved["algorithm"]["aggregation"] == "trimmed_mean"
    assert build_config(saved).options.trim_fraction == 0.2


BAD_CONFIGS = [
    ("rounds: 0\n", "rounds"),
    ("data: {dirichlet_alpha: -1}\n", "data.dirichlet_alpha"),
    ("data: {tasks: [no_such_task]}\n", "data.tasks"),
    ("model: {lora: {rank: 0}}\n", "model.lora.rank"),
    ("algorithm: fedmystery\n", "algorithm"),
    ("federation: {client_fraction: 0}\n", "federation.client_fraction"),
    ("algorithm: {name: fltac, aggregation: trimmed_mean, trim_fraction: 0.5}\n", "algorithm.trim_fraction"),
    ("engine: {gpus_per_worker: 0.5}\n", "engine.gpus_per_worker"),
    ("name: [unclosed\n", "malformed YAML"),
    ("- just\n- a list\n", "mapping"),
    ("trian: {lr: 0.1}\n", "trian"),
    # issue 18, item 8: values that used to pass validation and crash or corrupt the run
    ("rounds: true\n", "rounds = True: True is a boolean; give a number"),
    ("seed: 4294967296\n", "seed = 4294967296"),
    ("train: {lr: .inf}\n", "train.lr = inf: Input should be a finite number"),
    ("data: {dirichlet_alpha: .inf}\n", "data.dirichlet_alpha = inf"),
    ("federation: {client_fraction: .nan}\n", "federation.client_fraction = nan"),
    # item 10: the name cannot lead the run directory out of output_dir
    ("name: ../../escaped\n", "name = '../../escaped'"),
    # item 8: sizes this machine cannot hold, refused on an estimate before anything is built
    ("data: {num_clients: 1000000000}\n",
     "resources: the experiment's data would need about 838.2 GiB of memory to prepare (data.num_clients = "
     "1,000,000,000 x 3 tasks x ~300 B = 838.2 GiB), more than"),
    ("data: {tasks: [synthetic_topic], train_per_task: 1000000000}\n",
     "synthetic_topic: data.train_per_task + data.test_per_task = 1,000,000,300 generated examples x ~1324 B"),
]


def test_bad_configs_fail_before_ray_is_even_imported(tmp_path):
    paths = []
    for index, (text, _) in enumerate(BAD_CONFIGS):
        path = tmp_path / f"bad{index}.yaml"
        path.write_text(text)
        paths.append(str(path))
    script = (
        "import contextlib, io, json, sys\n"
        "from fltac_ray.cli import main\n"
        "out = []\n"
        "for path in sys.argv[1:]:\n"
        "    err = io.StringIO()\n"
        "    with contextlib.redirect_stderr(err):\n"
        "        code = main(['run', path])\n"
        "    out.append([code, err.getvalue(), 'ray' in sys.modules])\n"
        "print(json.dumps(out))\n"
    )
    done = subprocess.run([sys.executable, "-c", script, *paths], capture_output=True, text=True, check=True)
    results = json.loads(done.stdout.strip().splitlines()[-1])
    for (text, field), (code, err, ray_imported) in zip(BAD_CONFIGS, results, strict=True):
        assert code == 2, (text, err)
        assert field in err, (text, err)
        assert not ray_imported, text
    assert not any(tmp_path.glob("runs*"))  # no run directory was created


def test_a_pass_result_sends_uploads_that_are_pieces_of_trained_rows_once():
    import pickle

    trained = np.arange(2 * 1000, dtype=np.float32).reshape(2, 1000)
    copied = np.full(1000, 7.0, np.float32)  # not a view: travels as it is
    result = PassResult([Upload((0, 0), trained[0], 3), Upload((1, 0), trained[1, 10:510], 4),
                         Upload((1, 1), copied, 5)], [(0, 0), (1, 0)], trained)
    blob = pickle.dumps(result, protocol=5)
    assert len(blob) < trained.nbytes + copied.nbytes + 2_000  # the views are not sent again
    back = pickle.loads(blob)
    np.testing.assert_array_equal(back.uploads[0].vector, trained[0])
    np.testing.assert_array_equal(back.uploads[1].vector, trained[1, 10:510])
    np.testing.assert_array_equal(back.uploads[2].vector, copied)
    assert np.shares_memory(back.uploads[0].vector, back.trained)  # a view again on arrival
    assert [u.num_samples for u in back.uploads] == [3, 4, 5]
    assert result.uploads[0].vector is not None and result.uploads[0].vector.size == 1000  # sender untouched


@pytest.mark.parametrize(("where", "words"), [
    (lambda tmp: {"out": str(tmp / "a_file" / "run")}, "a_file is a file, not a folder"),
    (lambda tmp: {"output_dir": str(tmp / "a_file" / "runs")}, "a_file is a file, not a folder"),
    (lambda tmp: {"out": "/proc/fltac-ray-run"}, "cannot be created or written"),
])
def test_unusable_output_locations_are_run_folder_errors_before_anything_runs(tmp_path, where, words):
    from fltac_ray.errors import RunFolderError

    (tmp_path / "a_file").write_text("not a folder")
    options = where(tmp_path)
    config = tiny_config(engine={"backend": "local"}, **({"output_dir": options["output_dir"]}
                                                         if "output_dir" in options else {}))
    with pytest.raises(RunFolderError, match=words):
        Simulation(config, out=options.get("out"), progress=Progress(quiet=True)).run()


def test_the_run_folder_is_checked_before_the_data_and_a_failed_start_leaves_no_folder(tmp_path, monkeypatch):
    from fltac_ray.data import sizing
    from fltac_ray.errors import ResourceUnavailableError, RunFolderError

    (tmp_path / "a_file").write_text("not a folder")
    built = []
    monkeypatch.setattr(sizing, "check_data_fits", lambda config: built.append(config))
    with pytest.raises(RunFolderError):
        Simulation(tiny_config(engine={"backend": "local"}), out=str(tmp_path / "a_file" / "run"),
                   progress=Progress(quiet=True)).run()
    assert built == []  # refused before the data was touched
    monkeypatch.undo()
    huge = tiny_config(engine={"backend": "local"}, data={"num_clients": 10**9})
    with pytest.raises(ResourceUnavailableError):
        Simulation(huge, out=str(tmp_path / "new"), progress=Progress(quiet=True)).run()
    assert not (tmp_path / "new").exists()  # made for the run, removed again
    (tmp_path / "empty").mkdir()
    with pytest.raises(ResourceUnavailableError):
        Simulation(huge, out=str(tmp_path / "empty"), progress=Progress(quiet=True)).run()
    assert (tmp_path / "empty").is_dir() and not any((tmp_path / "empty").iterdir())  # the user's: kept


def test_a_run_whose_uploads_are_all_rejected_says_so_everywhere(tmp_path, capsys):
    from fltac_ray.cli import main

    path = tmp_path / "nan.yaml"
    path.write_text(yaml.safe_dump({**TINY_EXPERIMENT, "rounds": 2, "algorithm": "tests.flaky_algorithm:UploadsNaN",
                                    "engine": {"backend": "local"}, "output_dir": str(tmp_path / "runs")}))
    code = main(["run", str(path), "--no-report"])
    captured = capsys.readouterr()
    assert code == 3  # finished, with rejected rounds
    assert "REJECTED: all" in captured.out and "2 rounds (2 rejected)" in captured.out
    assert "no adapters exported" in captured.out and "rounds [1, 2] were rejected" in captured.err
    (run_dir,) = (tmp_path / "runs").iterdir()
    rounds = pd.read_csv(run_dir / "rounds.csv")
    assert rounds["status"].tolist() == ["rejected", "rejected"] and (rounds["rejected_uploads"] > 0).all()
    assert not (run_dir / "adapters").exists()


def test_an_unreachable_ray_address_fails_in_seconds_naming_it():
    import socket

    from fltac_ray.engine.ray.session import check_reachable
    from fltac_ray.errors import ResourceUnavailableError

    with socket.socket() as probe:  # a port nobody listens on: bound, then closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(ResourceUnavailableError, match=f"engine.ray_address = '127.0.0.1:{port}': no Ray cluster"):
        check_reachable(f"127.0.0.1:{port}")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        check_reachable(f"127.0.0.1:{server.getsockname()[1]}")  # something answers: Ray takes over
    check_reachable("auto")


def test_data_memory_estimate_hand_computed():
    from fltac_ray.data.sizing import check_data_fits, data_memory_estimate
    from fltac_ray.errors import ResourceUnavailableError

    # 4 clients x 3 tasks x 300 B; 3 generated tasks x (64 + 32) examples x (300 + 32 x 16) B
    config = tiny_config()
    needed, parts = data_memory_estimate(config)
    assert needed == 4 * 3 * 300 + 3 * 96 * (300 + 32 * 16) and len(parts) == 4
    check_data_fits(config, available=needed)  # fits exactly
    with pytest.raises(ResourceUnavailableError, match=r"would need about 231\.9 KiB .* more than the 1\.0 KiB"):
        check_data_fits(config, available=1024)
    # tasks read from a package are bounded by their source: only the partition counts
    wordnet = tiny_config(data={"tasks": ["wordnet_pos"], "train_per_task": 10**9})
    assert data_memory_estimate(wordnet)[0] == 4 * 1 * 300


def test_the_reliability_table_names_existing_tests():
    import ast
    from pathlib import Path

    here = Path(__file__).parent
    defined: dict[str, set[str]] = {}
    for rows in RELIABILITY_TABLE.values():
        assert rows
        for reference in rows:
            module, _, name = reference.rpartition("::") if "::" in reference else ("test_reliability.py", "", reference)
            if module not in defined:
                tree = ast.parse((here / module).read_text())
                defined[module] = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
            assert name in defined[module], f"{reference}: no such test"


def test_every_kind_of_error_has_its_heading_and_exit_code_2(tmp_path, capsys):
    from fltac_ray.cli import main

    tiny = tmp_path / "tiny.yaml"
    tiny.write_text(yaml.safe_dump({**TINY_EXPERIMENT, "engine": {"backend": "local"}}))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "something").write_text("")
    (tmp_path / "bad.csv").write_bytes(b"\x00\x01binary")
    cases = [
        (["run", str(tmp_path / "missing.yaml")], f"experiment file {tmp_path / 'missing.yaml'}: "),
        (["run", str(tiny), "--set", "rounds=0"], "invalid experiment configuration"),
        (["run", "--resume", str(tmp_path)], f"run folder {tmp_path}: is not a run directory"),
        (["run", str(tiny), "--out", str(tmp_path / "taken")], f"run folder {tmp_path / 'taken'}: --out exists"),
        (["run", str(tiny), "--set", "data.num_clients=1000000000"], "resources: the experiment's data would need"),
        (["run", str(tiny), "--set", "data.tasks=[glue_sst2]", "--set", "model.name=minilm",
          "--set", f"data.files={{glue_sst2: {{train: {tmp_path / 'bad.csv'}, test: {tmp_path / 'bad.csv'}}}}}"], f"data file {tmp_path / 'bad.csv'}"),
    ]
    for argv, heading in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("fltac-ray: error: ") and heading in err.splitlines()[0], (argv, err)
        assert "Traceback" not in err


BILLION_LAUGHS = "\n".join(
    [f"l0: &l0 [{', '.join(['lol'] * 9)}]"]
    + [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 9)]) + "\n"


def test_hostile_experiment_files_are_refused_before_parsing_or_expanding(tmp_path, capsys):
    from fltac_ray.cli import main
    from fltac_ray.config import MAX_EXPERIMENT_BYTES, read_yaml

    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(BILLION_LAUGHS)  # 9^9 lol's once expanded, in 600 bytes
    huge = tmp_path / "huge.yaml"
    huge.write_text("# padding\n" * (MAX_EXPERIMENT_BYTES // 10 + 1))
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"rounds: 2\n\xff\xfe\x00")
    cases = [
        (bomb, "invalid experiment configuration", "expands to more than 100,000 values"),
        (huge, f"experiment file {huge}: ", f"{huge.stat().st_size:,} bytes; an experiment file is YAML of at most"),
        (binary, f"experiment file {binary}: ", "is not UTF-8 text (byte 10 is 0xff)"),
    ]
    for path, heading, words in cases:
        for command in (["validate", str(path)], ["run", str(path)]):
            assert main(command) == 2, command
            err = capsys.readouterr().err
            assert err.startswith("fltac-ray: error: ") and heading in err and words in err, (command, err)
    # a modest alias (one list reused) still loads
    shared = tmp_path / "shared.yaml"
    shared.write_text("tasks: &t [a, b]\nagain: *t\n")
    assert read_yaml(shared) == {"tasks": ["a", "b"], "again": ["a", "b"]}
    flow_bomb = "{" + ", ".join(BILLION_LAUGHS.splitlines()) + "}"  # the same bomb on one line
    assert main(["validate", str(shared), "--set", f"data.tasks={flow_bomb}"]) == 2
    assert "--set data.tasks = " in (err := capsys.readouterr().err) and "expands to more than" in err, err


SECRET = "aws_secret_access_key=wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY"


@pytest.mark.parametrize(("name", "content"), [
    ("secret_first_line.csv", f"{SECRET}\nsecond line\n"),
    ("secret_label.csv", f"sentence,label\na film,1\nanother,{SECRET}\n"),
    ("secret_token_label.csv", "sentence,label\na film,1\nanother,wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY\n"),
    ("secret.tsv", f"{SECRET}\tsecond\nx\ty\n"),
])
def test_a_data_error_quotes_no_file_content(tmp_path, name, content):
    from fltac_ray.data.hf import load_hub_task
    from fltac_ray.errors import DataFileError

    path = tmp_path / name
    path.write_text(content)
    good = tmp_path / "good.csv"
    good.write_text("sentence,label\na film,1\nanother,0\n")
    with pytest.raises(DataFileError) as info:
        load_hub_task("glue_sst2", "text", 5, 5, np.random.default_rng(0), {"train": str(path), "test": str(good)})
    message = str(info.value)
    assert str(path) in message and "EXAMPLEKEY" not in message and "wJalr" not in message, message


def test_a_short_label_and_a_real_header_are_still_quoted():
    from fltac_ray.errors import excerpt, header_excerpt

    assert excerpt("great") == "'great'" and excerpt(0.5) == "0.5"
    assert excerpt("x" * 25) == "(a text of 25 characters, not shown)"
    assert excerpt("a\x1b[2J") == "(a text of 5 characters, not shown)"  # no terminal escapes
    assert header_excerpt(["sentence", "stars"]) == "['sentence', 'stars']"
    assert header_excerpt([f"c{i}" for i in range(14)]).endswith("... (14 columns in all)")
    assert header_excerpt(["key=value"]).startswith("1 column(s) whose names do not look like")


def test_a_run_folder_with_a_link_or_a_pipe_is_not_resumed(tmp_path, capsys):
    import os

    from fltac_ray.cli import main

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump(TINY_EXPERIMENT))
    elsewhere = tmp_path / "rounds.csv"
    elsewhere.write_text("round,status\n1,ok\n")
    (run_dir / "rounds.csv").symlink_to(elsewhere)
    os.mkfifo(run_dir / "metrics.csv")
    assert main(["run", "--resume", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fltac-ray: error: run folder {run_dir}: holds what no run writes: "), err
    assert "metrics.csv is a named pipe" in err and "rounds.csv is a symbolic link" in err, err


class NaNFromRoundTwo(FederatedAlgorithm):
    """FedAvg whose server half breaks in round 2: its answer holds NaN."""

    name = "nan_from_round_two"

    def aggregate(self, uploads, round_index):
        outcome = super().aggregate(uploads, round_index)
        if round_index >= 2:
            outcome.adapters[0, :3] = np.nan
        return outcome


@pytest.mark.parametrize("backend", ["local", "ray"])
def test_a_server_answer_with_nan_ends_the_run_naming_the_hook_and_keeps_the_last_checkpoint(
        ray_cluster, tmp_path, backend):
    config = tiny_config(rounds=3, algorithm=f"{__name__}:NaNFromRoundTwo", engine={"backend": backend})
    with pytest.raises(AlgorithmError) as info:
        _run(config, tmp_path / "run")
    assert str(info.value).startswith("NaNFromRoundTwo.aggregate() in round 2: Aggregate.adapters has non-finite "
                                      "values (NaN or Inf) in row(s) [0]. Nothing of round 2 was committed"), info.value
    assert [p.name for p in sorted((tmp_path / "run" / "checkpoints").iterdir())] == ["round_00001"]
    assert pd.read_csv(tmp_path / "run" / "rounds.csv")["round"].tolist() == [1]
    for exported in (tmp_path / "run").glob("adapters/*/*.safetensors"):
        assert all(np.isfinite(t).all() for t in load_file(str(exported)).values()), exported


def test_answers_and_merged_adapters_are_checked_like_uploads():
    from fltac_ray.server.uploads import answer_problem, merged_problem

    good = np.zeros((2, 5), np.float32)
    assert answer_problem(np.array([0, 1, 1]), good, 3) is None
    assert answer_problem(np.array([0, 2, 1]), good, 3) == "Aggregate.labels holds 0..2, outside the 2 rows of adapters"
    assert answer_problem(np.array([0, 1]), good, 3) == ("Aggregate.labels has shape (2,), expected (3,): one per "
                                                         "accepted upload")
    assert answer_problem(np.array([0.0, 1.0, 1.0]), good, 3) == "Aggregate.labels has dtype float64, expected integers"
    assert answer_problem(np.array([0, 1, 1]), good[0], 3) == ("Aggregate.adapters has shape (5,), expected "
                                                               "(clusters, width)")
    inf = good.copy()
    inf[1, 4] = np.inf
    assert answer_problem(np.array([0, 1, 1]), inf, 3) == ("Aggregate.adapters has non-finite values (NaN or Inf) "
                                                           "in row(s) [1]")
    assert merged_problem(np.zeros(5, np.float32), 5) is None
    assert merged_problem(np.zeros(4, np.float32), 5) == "returned shape (4,), expected (5,)"
    assert merged_problem(np.full(5, np.nan, np.float32), 5) == "returned non-finite values (NaN or Inf)"


def _two_csv_tasks(folder):
    """Two custom CSV tasks in `folder`, by text + label (words from the task's own vocabulary)."""
    rng = np.random.default_rng(7)
    for name, words in (("moods", ["glad", "sad"]), ("colours", ["red", "blue", "green"])):
        rows = [(f"{words[label]} thing {i}", label) for i in range(48) for label in [int(rng.integers(len(words)))]]
        pd.DataFrame(rows, columns=["text", "label"]).to_csv(folder / f"{name}.csv", index=False)


def test_a_resume_reads_the_files_the_run_was_built_from_and_refuses_changed_ones(tmp_path, monkeypatch, capsys):
    from fltac_ray.errors import DataFileError

    first, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    (first / "data").mkdir(parents=True)
    elsewhere.mkdir()
    _two_csv_tasks(first / "data")
    monkeypatch.chdir(first)  # the experiment names its files relative to here
    config = tiny_config(rounds=2, engine={"backend": "local"}, data={
        "tasks": ["moods", "colours"], "train_per_task": 32, "test_per_task": 16,
        "custom_tasks": {"moods": {"train": "data/moods.csv", "num_classes": 2},
                         "colours": {"train": "data/colours.csv", "num_classes": 3}}})
    whole = _run(config, tmp_path / "run")
    recorded = json.loads((whole.run_dir / "data_files.json").read_text())
    assert [(r["setting"], r["path"]) for r in recorded] == [  # absolute, in the settings' order
        ("data.custom_tasks.colours.train", str(first / "data" / "colours.csv")),
        ("data.custom_tasks.moods.train", str(first / "data" / "moods.csv"))]
    newest = whole.run_dir / "checkpoints" / "round_00002" / "clients.safetensors"
    newest.write_bytes(newest.read_bytes()[:50])  # round 2 must be redone on resume

    monkeypatch.chdir(elsewhere)  # data/moods.csv means nothing here
    moods = first / "data" / "moods.csv"
    kept = moods.read_bytes()
    moods.write_bytes(kept.replace(b" thing 0,", b" thing X,"))  # edited after the interruption
    assert moods.read_bytes() != kept
    with pytest.raises(DataFileError) as info:
        Simulation.resume(whole.run_dir, progress=Progress(quiet=True)).run()
    assert str(info.value).startswith(f"data file {moods}: (data.custom_tasks.moods.train) changed since the run "
                                      "started (same size, different content; SHA-256 was "), info.value
    moods.write_bytes(kept)
    resumed = Simulation.resume(whole.run_dir, progress=Progress()).run()
    assert "resuming" in capsys.readouterr().out
    pd.testing.assert_frame_equal(resumed.metrics[COMPARED], whole.metrics[COMPARED], check_exact=True)
    moods.unlink()
    with pytest.raises(DataFileError, match=r"the run was built from this file and it is gone"):
        Simulation.resume(whole.run_dir, progress=Progress(quiet=True)).run()


def test_data_fingerprints_hand_checked(tmp_path):
    import hashlib

    from fltac_ray.errors import RunFolderError
    from fltac_ray.runs.data_files import fingerprint, load_data_files

    file = tmp_path / "a.csv"
    file.write_bytes(b"text,label\nx,1\n")
    assert fingerprint("s", file).sha256 == hashlib.sha256(b"text,label\nx,1\n").hexdigest()
    folder = tmp_path / "set"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "b.bin").write_bytes(b"bb")
    (folder / "a.bin").write_bytes(b"a")
    lines = "".join(f"{name}\0{len(data)}\0{hashlib.sha256(data).hexdigest()}\n"
                    for name, data in (("a.bin", b"a"), ("sub/b.bin", b"bb")))
    assert fingerprint("s", folder).sha256 == hashlib.sha256(lines.encode()).hexdigest()
    assert fingerprint("s", folder).size == 3
    (folder / "sub" / "b.bin").rename(folder / "sub" / "c.bin")  # a rename changes the folder's print
    assert fingerprint("s", folder).sha256 != hashlib.sha256(lines.encode()).hexdigest()
    linked = tmp_path / "linked"  # a folder of links (as a Hugging Face cache snapshot is) prints its files
    linked.mkdir()
    (linked / "a.bin").symlink_to(folder / "a.bin")
    assert fingerprint("s", linked).size == 1
    assert fingerprint("s", linked).sha256 == hashlib.sha256(
        f"a.bin\0{1}\0{hashlib.sha256(b'a').hexdigest()}\n".encode()).hexdigest()
    (tmp_path / "data_files.json").write_text('[{"setting": "x"}]')
    with pytest.raises(RunFolderError, match="data_files.json is not a list of data file records"):
        load_data_files(tmp_path)

"""Local training owned by the algorithm (algorithms/local_training.py) and options owned by the
algorithm (algorithms/options.py): FedProx, SCAFFOLD and FedAdam by hand, batched == one-by-one
for every hook, the options' validation, and the three methods end to end on both backends,
from outside the package and across a resume."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from pydantic import Field

from fltac_ray.algorithms import FederatedAlgorithm, register_algorithm
from fltac_ray.algorithms.base import ClientJob, Uploads
from fltac_ray.algorithms.fedadam import FedAdam
from fltac_ray.algorithms.fedprox import ProximalTerm
from fltac_ray.algorithms.local_training import LocalContext, LocalTraining, rows_of
from fltac_ray.algorithms.options import AlgorithmOptions
from fltac_ray.algorithms.scaffold import ControlVariateCorrection, Scaffold
from fltac_ray.client.batched_training import train_batched
from fltac_ray.client.local_optimizers import BatchedSGD
from fltac_ray.client.training import train_adapter
from fltac_ray.config import apply_overrides, build_config
from fltac_ray.engine.simulation import Simulation
from fltac_ray.errors import ConfigError
from fltac_ray.progress import Progress

from .conftest import tiny_config
from .test_backends import _run, _same
from .test_batched import CPU, _assert_same, _jobs, _model, _one_by_one, _text_split


# --- a method written outside the package, with its own option ---------------------------------
class HomeFedProxOptions(AlgorithmOptions):
    mu: float = Field(default=0.01, ge=0, description="weight of the proximal term")


class HomeProximalTerm(LocalTraining):
    def __init__(self, mu: float) -> None:
        super().__init__()
        self.mu = mu

    def penalty(self, adapters, context):
        anchors = rows_of(context.start, context.active)
        return 0.5 * self.mu * sum((w - a).pow(2).flatten(1).sum(1) for w, a in zip(adapters, anchors, strict=True))


@register_algorithm
class HomeFedProx(FederatedAlgorithm):
    """FedProx as a user writes it in their own file: FedAvg of one adapter per task, each
    local objective plus mu/2 ||w - w_start||^2."""

    name = "home_fedprox"
    summary = "FedAvg with a proximal term, written outside fltac-ray"
    Options = HomeFedProxOptions

    def local_training(self) -> LocalTraining:
        return HomeProximalTerm(self.options.mu)


# --- the hooks by hand --------------------------------------------------------------------------
def test_the_proximal_term_adds_mu_times_the_distance_to_the_start_to_each_gradient():
    w = torch.tensor([[[1.0, 2.0]], [[0.0, -1.0]]], requires_grad=True)  # 2 adapters, one (1, 2) tensor
    start = torch.tensor([[[0.5, 2.0]], [[1.0, 1.0]]])
    context = LocalContext([start], active=2)
    penalty = ProximalTerm(mu=0.2).penalty([w], context)
    # 0.1 x ||w - start||^2: row 0 0.1 x 0.25, row 1 0.1 x (1 + 4)
    torch.testing.assert_close(penalty, torch.tensor([0.025, 0.5]))
    penalty.sum().backward()
    torch.testing.assert_close(w.grad, torch.tensor([[[0.1, 0.0]], [[-0.2, -0.4]]]))  # mu (w - start)
    assert ProximalTerm(mu=0.0).penalty([w], context) is None


def test_the_control_variate_correction_and_an_sgd_step_by_hand():
    params = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    grads = [torch.tensor([[0.5, -0.5], [1.0, 0.0], [9.0, 9.0]])]
    correction = torch.tensor([[0.1, 0.2], [-1.0, 0.0], [5.0, 5.0]])
    context = LocalContext([params.clone()], {"correction": [correction]}, active=2)  # row 2 has finished
    ControlVariateCorrection("sgd").correct_gradients(rows_of(grads, 2), context)
    torch.testing.assert_close(grads[0], torch.tensor([[0.6, -0.3], [0.0, 0.0], [9.0, 9.0]]))
    BatchedSGD([params], lr=0.5, weight_decay=0.0).step(2, grads=grads)
    torch.testing.assert_close(params, torch.tensor([[0.7, 1.15], [2.0, 2.0], [3.0, 3.0]]))
    # weight decay coupled as torch.optim.SGD: p - lr (g + wd p); `take` steps only the chosen rows
    params = torch.tensor([[1.0], [2.0]])
    BatchedSGD([params], lr=0.5, weight_decay=0.1).step(2, take=np.array([False, True]),
                                                        grads=[torch.tensor([[1.0], [1.0]])])
    torch.testing.assert_close(params, torch.tensor([[1.0], [2.0 - 0.5 * (1.0 + 0.2)]]))


def _fedit_family(cls, **options):
    config = tiny_config(algorithm={"name": cls.name, **options}, train={"local_steps": 2, "lr": 0.5})
    algorithm = cls(config)
    algorithm.set_initial(np.array([[1.0, 0.0, -1.0]], np.float32))
    return algorithm


def test_a_scaffold_round_by_hand():
    scaffold = _fedit_family(Scaffold)  # 4 clients, lr 0.5, eta_g 1
    x = np.array([1.0, 0.0, -1.0], np.float32)
    np.testing.assert_array_equal(scaffold.broadcast(), [x, [0, 0, 0]])  # (x, c): c = 0 at first
    scaffold.control = np.array([0.2, 0.0, 0.0], np.float32)
    c_i = np.array([0.0, 0.4, 0.0], np.float32)
    job = ClientJob((1, 0), ("a", "b"), 10, steps=(2, 2), state=c_i)  # K = 4 local steps
    start, meta = scaffold.start(job, None, scaffold.broadcast(), lambda v: 0.0)
    np.testing.assert_array_equal(start, x)  # every client starts from the global adapter
    np.testing.assert_allclose(scaffold.local_inputs(job, meta)["correction"], [0.2, -0.4, 0.0])  # c - c_i
    y = np.array([0.0, 1.0, -1.0], np.float32)
    # c_i+ = c_i - c + (x - y) / (K lr) = [0, .4, 0] - [.2, 0, 0] + [1, -1, 0] / 2
    new_control = np.array([0.3, -0.1, 0.0], np.float32)
    np.testing.assert_allclose(scaffold.keep_state(job, y, meta), new_control, atol=1e-7)
    upload = scaffold.upload(job, y, np.zeros(0), meta)
    np.testing.assert_allclose(upload.extras["control_delta"], new_control - c_i, atol=1e-7)
    assert upload.params == 2 * 3  # the adapter and the control-variate update
    # the server: x <- mean of the uploads (eta_g 1, equal weights); c <- c + sum(delta c) / N
    other = np.array([2.0, 1.0, 1.0], np.float32)
    uploads = Uploads(np.stack([y, other]), np.array([10, 10]),
                      extras={"control_delta": np.stack([new_control - c_i, np.array([0.4, 0.0, 0.8], np.float32)])})
    answer = scaffold.aggregate(uploads, 1)
    np.testing.assert_allclose(answer.adapters, [[1.0, 1.0, 0.0]])
    np.testing.assert_allclose(scaffold.control, [0.2 + (0.3 + 0.4) / 4, (-0.5 + 0.0) / 4, 0.8 / 4], atol=1e-7)
    np.testing.assert_allclose(scaffold.broadcast()[1], scaffold.control)
    assert answer.metrics["control_norm"] == pytest.approx(float(np.linalg.norm(scaffold.control)))
    assert scaffold.download_params(answer, 2) == 2 * 2 * 3  # each upload receives x and c
    # eta_g scales the step from x
    half = _fedit_family(Scaffold, server_lr=0.5)
    np.testing.assert_allclose(half.server_step(np.array([3.0, 0.0, -1.0]), uploads), [2.0, 0.0, -1.0])


def test_a_fedadam_server_step_by_hand_and_its_moments_in_the_server_state():
    fedadam = _fedit_family(FedAdam, server_lr=0.01, beta1=0.9, beta2=0.99, tau=1e-3)
    x = np.array([1.0, 0.0, -1.0])
    uploads = Uploads(np.array([[2.0, -2.0, -1.0]], np.float32), np.array([5]))
    answer = fedadam.aggregate(uploads, 1)
    delta = np.array([1.0, -2.0, 0.0])  # the average minus x
    m, v = 0.1 * delta, 0.01 * delta ** 2
    expected = x + 0.01 * m / (np.sqrt(v) + 1e-3)  # [1 + .01 x .1/.101, -.01 x .2/.201, -1]
    np.testing.assert_allclose(answer.adapters[0], expected, rtol=1e-6)
    assert answer.metrics["server_step_norm"] == pytest.approx(np.linalg.norm(expected - x), rel=1e-6)
    np.testing.assert_allclose(fedadam.first_moment, m, rtol=1e-6)
    np.testing.assert_allclose(fedadam.second_moment, v, rtol=1e-6)
    # a second step continues the moments; a copy restored from state() takes the same step
    copy = _fedit_family(FedAdam, server_lr=0.01, beta1=0.9, beta2=0.99, tau=1e-3)
    copy.load_state({name: value.copy() for name, value in fedadam.state().items()})
    again = Uploads(np.array([[0.0, 0.0, 0.0]], np.float32), np.array([5]))
    np.testing.assert_array_equal(fedadam.aggregate(again, 2).adapters, copy.aggregate(again, 2).adapters)


# --- batched training equals one-by-one training for every hook ---------------------------------
RULES = {
    "proximal": (ProximalTerm(mu=0.5), False),
    "correction": (ControlVariateCorrection(), True),  # a random per-job vector as c - c_i
    "sgd": (LocalTraining("sgd"), False),
    "proximal_sgd_correction": (type("Both", (ProximalTerm, ControlVariateCorrection), {})(0.5, "sgd"), True),
}


@pytest.mark.parametrize("rule_name", sorted(RULES))
def test_batched_training_matches_one_by_one_for_every_local_training_hook(rule_name):
    rule, corrected = RULES[rule_name]
    model = _model("tiny-random-bert", "text", head_classes=4)
    splits = [(_text_split(40, 2, 0), 2), (_text_split(40, 4, 1), 4), (_text_split(40, 3, 2), 3)]

    def with_inputs(jobs):
        for j, job in enumerate(jobs):
            # the anchor differs from the start, as from a multi-task adapter's second task on
            job.anchor = job.start + np.random.default_rng([9, j]).normal(0, 0.05, job.start.size).astype(np.float32)
            if corrected:
                job.inputs = {"correction": np.random.default_rng([8, j]).normal(0, 0.5, job.start.size)
                              .astype(np.float32)}
        return jobs

    steps = [5, 5, 3]  # job 2 leaves the pass early
    jobs = with_inputs(_jobs(model, splits, steps))
    single = [
        train_adapter(
            model, job.start, job.split, job.indices, job.num_classes, job.steps, 4, 1e-2, 0.01,
            np.random.default_rng([1, j]), CPU, rule=rule, anchor=job.anchor, inputs=job.inputs)
        for j, job in enumerate(jobs)]
    batched = train_batched(model, with_inputs(_jobs(model, splits, steps)), 4, 1e-2, 0.01, CPU, rule=rule)
    _assert_same(batched, single)
    # and the hook changed the result: plain AdamW from the same starts ends elsewhere
    plain = _one_by_one(model, _jobs(model, splits, steps), 4, 1e-2, 0.01)
    assert all(np.abs(b.adapter - p.adapter).max() > 1e-4 for b, p in zip(batched, plain, strict=True))


# --- options owned by the algorithm -------------------------------------------------------------
def test_options_are_given_under_the_algorithm_and_checked_with_errors_naming_them():
    config = tiny_config(algorithm={"name": "fedprox", "mu": 0.1})
    assert config.algorithm == "fedprox" and config.options.mu == 0.1
    assert config.options.local_optimizer == "adamw"  # the FedAvg family's shared option
    saved = config.resolved()
    assert saved["algorithm"] == {"name": "fedprox", "weighting": "samples", "aggregation": "mean", "budget": "per_task",
                                  "local_optimizer": "adamw", "mu": 0.1}
    assert build_config(saved).options == config.options  # the saved file loads back as it is
    assert tiny_config(algorithm="fedprox").options.mu == 0.01  # the option's default
    assert tiny_config(algorithm="local").resolved()["algorithm"] == "local"  # no options: the plain name
    raw = apply_overrides({"algorithm": "fedprox"}, ["algorithm.mu=0.3"])
    assert raw["algorithm"] == {"name": "fedprox", "mu": 0.3}
    assert apply_overrides({}, ["algorithm.server_lr=0.1"])["algorithm"] == {"name": "fltac", "server_lr": 0.1}
    cases = [
        ({"name": "fedprox", "mu": -1}, "algorithm.mu", "greater than or equal to 0"),
        ({"name": "fedprox", "nu": 1}, "algorithm.nu", "its options: ['aggregation', 'budget', 'local_optimizer', 'mu', 'trim_fraction', 'weighting']"),
        ({"name": "local", "mu": 1}, "algorithm.mu", "algorithm 'local' has no options"),
        ({"name": "scaffold", "local_optimizer": "lion"}, "algorithm.local_optimizer", "'adamw' or 'sgd'"),
        ({"mu": 1}, "algorithm.name", "names itself"),
        ({"name": "home_fedprox", "mu": "much"}, "algorithm.mu", "valid number"),
    ]
    for given, field, message in cases:
        with pytest.raises(ConfigError) as info:
            tiny_config(algorithm=given)
        issue = info.value.issues[0]
        assert (issue.field, message in issue.allowed) == (field, True), issue


def test_fltac_ray_tasks_lists_each_algorithms_options(capsys):
    from fltac_ray.cli import main

    main(["tasks"])
    out = capsys.readouterr().out
    assert "fedprox" in out and "mu = 0.01" in out and "server_lr = 0.01" in out


# --- end to end (the runs and their comparison as tests/test_backends.py makes them) ---------------
@pytest.mark.usefixtures("ray_cluster")
def test_fedprox_written_in_this_file_with_its_mu_runs_on_both_backends(tmp_path):
    local = _run(tmp_path, "local", algorithm={"name": "home_fedprox", "mu": 0.5},
                 engine={"backend": "local", "min_passes": 2})
    on_ray = _run(tmp_path, "ray", algorithm={"name": "home_fedprox", "mu": 0.5}, engine={"num_workers": 2})
    _same(local, on_ray)
    assert "mu: 0.5" in (on_ray.run_dir / "config.yaml").read_text()
    # mu moves the result: without the term the same run trains elsewhere
    free = _run(tmp_path, "free", algorithm={"name": "home_fedprox", "mu": 0.0},
                engine={"backend": "local", "min_passes": 2})
    assert not np.array_equal(free.rounds["train_loss"], local.rounds["train_loss"])


@pytest.mark.usefixtures("ray_cluster")
def test_scaffold_runs_alike_on_both_backends_and_counts_both_its_vectors(tmp_path):
    local = _run(tmp_path, "local", algorithm="scaffold", engine={"backend": "local", "min_passes": 2})
    on_ray = _run(tmp_path, "ray", algorithm="scaffold", engine={"num_workers": 2})
    _same(local, on_ray)
    rounds = on_ray.rounds
    assert (rounds["adapters"] == rounds["clients"]).all()  # one adapter per client
    size = rounds["params_up"].iloc[0] / (2 * rounds["adapters"].iloc[0])
    assert size == int(size) and size > 0
    assert (rounds["params_up"] == 2 * size * rounds["adapters"]).all()  # adapter + control update
    assert (rounds["params_down"] == 2 * size * rounds["adapters"]).all()  # x and c
    assert (rounds["control_norm"] > 0).all()  # SCAFFOLD's own per-round measure, as a column
    assert "kmeans_backend" not in rounds  # FL-TAC's measure is FL-TAC's alone


@pytest.mark.parametrize("algorithm", ["scaffold", "fedadam", "fedprox"])
def test_a_resumed_run_continues_the_server_and_client_state_exactly(tmp_path, algorithm):
    engine = {"backend": "local", "min_passes": 2, "checkpoint_every": 1, "keep_checkpoints": 3}
    whole = _run(tmp_path, "whole", algorithm=algorithm, rounds=3, engine=engine)
    run_dir = tmp_path / "cut"
    shutil.copytree(whole.run_dir, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "round_00003")  # as if killed before round 3's checkpoint
    if algorithm == "scaffold":  # the clients' control variates are in the checkpoint
        from fltac_ray.runs.checkpoint import read_checkpoint

        groups = read_checkpoint(run_dir / "checkpoints" / "round_00002").groups
        assert len(groups["client_state"]["rows"]) == 4 and np.abs(groups["client_state"]["rows"]).max() > 0
        assert set(groups["server"]) >= {"global", "control"}
    resumed = Simulation.resume(run_dir, progress=Progress(quiet=True)).run()
    _same(whole, resumed)

"""Paper scenarios without the hub: parameter counts (Table 2), concept shift, toy study, ROUGE-L."""

from __future__ import annotations

import numpy as np
import pytest

from fltac_ray.cli import main
from fltac_ray.client.rouge import lcs_length, rouge_l
from fltac_ray.config import build_config
from fltac_ray.data.encoding import make_featurizer
from fltac_ray.data.federated import _cluster_shares, build_federated_data, load_task
from fltac_ray.data.images import rotate_images
from fltac_ray.data.synthetic import teacher_first_layer
from fltac_ray.errors import ConfigError
from fltac_ray.models.counting import count_parameters
from fltac_ray.toy import toy_table

GLUE = ["glue_sst2", "glue_mrpc", "glue_qqp", "glue_qnli", "glue_rte"]
VIT = "google/vit-base-patch16-224-in21k"


def test_params_match_the_papers_table_2():
    bert = count_parameters(build_config({"data": {"tasks": GLUE}, "model": {"name": "bert-base-uncased"}}))
    # 5 tasks x (rank-1 LoRA on query/value over 12 layers: 12 * 2 * (768 + 768) + a 2-way head)
    assert (bert.lora_per_adapter, bert.head_per_adapter) == (36_864, 1_538)
    assert bert.trainable == bert.up_per_round == 192_010
    vit = count_parameters(build_config({"data": {"tasks": ["cifar10", "cifar100"]}, "model": {"name": VIT}}))
    assert vit.lora_per_adapter == 36_864
    assert vit.head_per_adapter == 768 * 100 + 100  # shared-width head: CIFAR-100's 100 classes
    fedit = count_parameters(build_config({"algorithm": "fedit", "data": {"tasks": ["cifar10", "cifar100"]},
                                           "model": {"name": VIT, "lora": {"rank": 8}}}))
    assert (fedit.adapters, fedit.lora_trainable) == (1, 294_912)


@pytest.mark.parametrize(("experiment", "per_adapter"), [("paper_cifar_vit", 36_864),
                                                         ("paper_cifar_vit_fedit", 294_912)])
def test_the_paper_vit_files_send_lora_only_as_the_authors_did(experiment, per_adapter):
    """The authors' ViT runs (peft FEATURE_EXTRACTION) leave the 100-way head at its random init:
    never trained, sent or clustered. The paper files freeze it, so what a client sends per
    adapter is Table 2's count."""
    from fltac_ray.config import load_config

    count = count_parameters(load_config(f"experiments/{experiment}.yaml"))
    assert count.head_per_adapter == 0
    assert count.adapter_size == count.lora_per_adapter == per_adapter


def test_params_of_other_algorithms_follow_what_they_send():
    local = count_parameters(build_config({"algorithm": "local", "model": {"name": "tiny-random-bert"}}))
    assert local.trainable > 0 and local.up_per_round == local.down_per_round == 0
    ifca = count_parameters(build_config({"algorithm": "ifca", "model": {"name": "tiny-random-bert"}}))
    assert ifca.down_per_round == 3 * ifca.adapter_size  # every global adapter comes down
    floral = count_parameters(build_config({"algorithm": "floral", "model": {"name": "tiny-random-bert"}}))
    assert floral.router_per_adapter == 3 and floral.up_per_round == 3 * (floral.adapter_size + 3)


def test_params_command_prints_lora_head_and_total(capsys):
    assert main(["params", "experiments/paper_glue_bert.yaml"]) == 0
    out = capsys.readouterr().out
    assert "192,010" in out and "36,864" in out and "1,538" in out


def test_tiny_model_families_build_on_meta_for_counting():
    for tasks, model in ((["digits"], "tiny-random-vit"), (["wordnet_define"], "tiny-random-llama"),
                         (["synthetic_linear"], "random-mlp"), (["digits"], "efficientnet-lite0")):
        count = count_parameters(build_config({"data": {"tasks": tasks}, "model": {"name": model}}))
        assert count.lora_per_adapter > 0
        assert (count.head_per_adapter == 0) == (tasks == ["wordnet_define"])


def test_cluster_partition_puts_client_k_in_cluster_k_mod_c():
    shares = _cluster_shares(5, 2)
    np.testing.assert_allclose(shares, [[1 / 3, 0, 1 / 3, 0, 1 / 3], [0, 0.5, 0, 0.5, 0]])


def _shifted(kind: str, task: str, clusters: int = 3):
    config = build_config({
        "data": {"tasks": [task], "concept_shift": {"kind": kind, "clusters": clusters},
                 "num_clients": 6, "train_per_task": 60, "test_per_task": 30},
        "model": {"name": "random-mlp" if task.startswith("synthetic") else "tiny-random-vit"},
    })
    return config, build_federated_data(config, make_featurizer(config.model.name, 16))


def test_rotation_shift_names_clusters_and_assigns_client_k_to_k_mod_c():
    _, data = _shifted("rotation", "digits", clusters=2)
    assert list(data.tasks) == ["digits@rot0", "digits@rot180"]
    for client in data.clients:
        assert list(client.tasks) == [list(data.tasks)[client.client_id % 2]]


def test_rotate_images_turns_about_the_centre():
    images = np.arange(2 * 1 * 8 * 8, dtype=np.uint8).reshape(2, 1, 8, 8)
    np.testing.assert_array_equal(rotate_images(images, 180), images[:, :, ::-1, ::-1])
    np.testing.assert_array_equal(rotate_images(images, 90), np.rot90(images, 1, axes=(2, 3)))
    assert rotate_images(images, 0) is images


def test_label_shift_relabels_y_to_y_plus_c_mod_classes():
    config, data = _shifted("label_shift", "digits")
    # cluster 2's examples are drawn like the plain task with cluster 2's seed, then relabelled
    shifted = data.tasks["digits@shift2"].train
    original = load_task("digits", config, np.random.default_rng([config.seed, 1, 2]))
    np.testing.assert_array_equal(shifted.labels, (original.labels[:60] + 2) % 10)
    np.testing.assert_array_equal(shifted.inputs["pixels"], original.images[:60])


def test_rank1_shift_is_a_rank_one_change_of_the_teacher():
    _, data = _shifted("rank1", "synthetic_linear")
    names = list(data.tasks)
    assert names == ["synthetic_linear@rank1_0", "synthetic_linear@rank1_1", "synthetic_linear@rank1_2"]
    base = teacher_first_layer("linear", 16, None)
    for cluster, name in enumerate(names):
        weight = teacher_first_layer("linear", 16, cluster)
        assert np.linalg.matrix_rank(weight - base, tol=1e-8) == 1
        split = data.tasks[name].train
        np.testing.assert_array_equal(split.labels, (split.inputs["features"] @ weight.T).argmax(1))


@pytest.mark.parametrize(("section", "message"), [
    ({"tasks": ["digits", "wordnet_pos"]}, "share a model family"),
    ({"tasks": ["wordnet_pos"], "concept_shift": {"kind": "rotation"}}, "needs an image task"),
    ({"tasks": ["digits"], "concept_shift": {"kind": "rank1"}}, "synthetic_linear or synthetic_mlp"),
    ({"tasks": ["digits", "fashion_mnist"], "concept_shift": {"kind": "label_shift"}}, "exactly one base task"),
    ({"tasks": ["glue_sst2"], "files": {"glue_mrpc": {"train": "a.csv", "test": "b.csv"}}}, "not a hub task"),
    ({"tasks": ["glue_sst2"], "files": {"glue_sst2": {"train": "a.csv"}}}, "needs keys"),
])
def test_scenario_errors_name_the_field(section, message):
    model = "tiny-random-vit" if "digits" in section["tasks"] else "tiny-random-bert"
    with pytest.raises(ConfigError, match=message):
        build_config({"data": section, "model": {"name": model}})


def test_model_must_read_the_tasks_kind():
    with pytest.raises(ConfigError, match="model.name.*cannot read image tasks"):
        build_config({"data": {"tasks": ["digits"]}, "model": {"name": "minilm"}})
    with pytest.raises(ConfigError, match="at least 48 px"):
        build_config({"data": {"tasks": ["digits"]}, "model": {"name": "efficientnet-lite0", "image_size": 32}})


def test_lcs_and_rouge_l_by_hand():
    assert lcs_length(["a", "b", "c", "d"], ["a", "c", "d", "e"]) == 3
    # reference 4 tokens, candidate 3, LCS 2 ("the cat"): P = 2/3, R = 2/4, F = 4/7
    assert rouge_l("The cat sat down.", "the cat ran") == pytest.approx(4 / 7)
    assert rouge_l("anything", "") == 0.0
    assert rouge_l("Same words here", "same, words here!") == 1.0


def test_toy_study_per_task_networks_beat_the_shared_one():
    table = toy_table([4, 8], seeds=1, epochs=1000)  # the paper trains for 1000 epochs
    assert (table["per_task_mean"] < table["shared_mean"]).all()

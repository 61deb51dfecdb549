import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fltac_ray.data import synthetic, wordnet
from fltac_ray.data.federated import build_federated_data
from fltac_ray.errors import ResourceUnavailableError

from .conftest import tiny_config

FIXTURE = Path(__file__).parent / "fixtures" / "wordnet"


def test_parse_data_file_reads_lexfile_lemma_and_definition():
    lexfiles, texts = wordnet.parse_data_file(FIXTURE / "data.noun")
    assert lexfiles == [5, 5, 6, 6, 13, 28]  # the licence header is skipped
    assert texts[1] == "dog: a member of the genus Canis"  # usage example cut off
    assert texts[2] == "motor vehicle: a self-propelled wheeled vehicle that does not run on rails"
    _, adjectives = wordnet.parse_data_file(FIXTURE / "data.adj")
    assert adjectives[1].startswith("abaxial: facing away")  # "(p)" marker removed


def test_supersense_labels_index_the_lexnames():
    texts = wordnet.load_supersense("noun", str(FIXTURE), 100, np.random.default_rng(0))
    assert len(texts.class_names) == 26 and texts.class_names[0] == "noun.Tops"
    by_text = dict(zip(texts.texts, texts.labels, strict=True))
    assert texts.class_names[by_text["dog: a member of the genus Canis"]] == "noun.animal"
    assert texts.class_names[by_text["meal: the food served and eaten at one time"]] == "noun.food"
    verbs = wordnet.load_supersense("verb", str(FIXTURE), 100, np.random.default_rng(0))
    assert len(verbs.class_names) == 15
    assert verbs.class_names[dict(zip(verbs.texts, verbs.labels, strict=True))["eat: take in solid food"]] == "verb.consumption"


def test_part_of_speech_is_class_balanced():
    texts = wordnet.load_part_of_speech(str(FIXTURE), 8, np.random.default_rng(0))
    assert texts.class_names == ["noun", "verb", "adjective", "adverb"]
    np.testing.assert_array_equal(np.bincount(texts.labels, minlength=4), [2, 2, 2, 2])


def test_missing_wordnet_says_how_to_install(tmp_path):
    with pytest.raises(ResourceUnavailableError, match="apt-get install wordnet-base"):
        wordnet.load_supersense("noun", str(tmp_path), 10, np.random.default_rng(0))


@pytest.mark.parametrize("make", [synthetic.sentiment, synthetic.topic, synthetic.tense])
def test_synthetic_tasks_are_seeded_and_cover_all_classes(make):
    a, b = make(300, np.random.default_rng(3)), make(300, np.random.default_rng(3))
    assert a.texts == b.texts
    assert set(a.labels.tolist()) == set(range(len(a.class_names)))


def _fake_encode(texts):
    return {"input_ids": np.zeros((len(texts), 4), np.int32), "lengths": np.full(len(texts), 4, np.int32)}


def test_federated_split_assigns_every_example_once():
    config = tiny_config(data={"num_clients": 6, "train_per_task": 200, "test_per_task": 50})
    data = build_federated_data(config, _fake_encode)
    assert data.head_classes == 4  # topic has 4 classes, the widest
    for task_index, task in enumerate(config.data.tasks):
        train = np.concatenate([c.tasks[task][0] for c in data.clients if task in c.tasks])
        assert sorted(train.tolist()) == list(range(200))
        test = np.concatenate([c.tasks[task][1] for c in data.clients if task in c.tasks])
        assert len(set(test.tolist())) == len(test) <= 50
        shares = data.shares[task_index]
        assert shares.sum() == pytest.approx(1.0)
        for client in data.clients:
            if shares[client.client_id] == 0:
                assert task not in client.tasks


def test_federated_split_is_seeded():
    config = tiny_config()
    a, b = build_federated_data(config, _fake_encode), build_federated_data(config, _fake_encode)
    np.testing.assert_array_equal(a.shares, b.shares)
    other = build_federated_data(tiny_config(seed=1), _fake_encode)
    assert not np.array_equal(a.shares, other.shares)


def test_fortunes_collections_become_a_labelled_task():
    from fltac_ray.data.fortunes import CATEGORIES, load_fortune_category

    examples = load_fortune_category("/usr/share/games/fortunes", 300, np.random.default_rng(0))
    assert len(examples) == 300 and examples.class_names == CATEGORIES
    assert len(set(examples.labels.tolist())) == len(CATEGORIES)
    assert all("\n" not in t and len(t) > 10 for t in examples.texts)


def test_fashion_mnist_idx_and_its_grouped_labelling():
    from fltac_ray.data.images import FASHION_GROUP_OF, load_fashion_mnist

    rng = np.random.default_rng(0)
    plain = load_fashion_mnist("/usr/share/datasets/fashion-mnist", 50, rng)
    assert plain.images.shape == (50, 1, 28, 28) and plain.images.dtype == np.uint8
    grouped = load_fashion_mnist("/usr/share/datasets/fashion-mnist", 50, np.random.default_rng(0), grouped=True)
    np.testing.assert_array_equal(grouped.labels, FASHION_GROUP_OF[plain.labels])


def test_wordnet_instruction_categories_have_reference_answers():
    from fltac_ray.data.instructions import build_category

    rng = np.random.default_rng(0)
    category = build_category("wordnet_category", "/usr/share/wordnet", 20, rng)
    assert category.kind == "instruction" and category.class_names == []
    assert all(p.startswith("### Instruction:\nWhat kind of thing is") for p in category.texts)
    assert all(answer.isalpha() and answer.islower() for answer in category.pairs)
    hypernym = build_category("wordnet_hypernym", "/usr/share/wordnet", 20, rng)
    assert all(answer for answer in hypernym.pairs)


def test_a_clients_examples_come_back_raw_from_the_config_and_bad_requests_name_the_field(tmp_path):
    """Result.client_examples rebuilds a client's examples from config.yaml (the partition is
    seeded): the test indices the engine evaluated, their labels and their raw text."""
    import yaml

    from fltac_ray.api import Result
    from fltac_ray.data.encoding import make_featurizer
    from fltac_ray.errors import ConfigError

    config = tiny_config()
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config.resolved()))
    result = Result(tmp_path, config.resolved(), *(pd.DataFrame(),) * 5)
    data = build_federated_data(config, make_featurizer(config.model.name, config.data.max_length))
    for client in range(config.data.num_clients):
        for task, (train, test) in data.clients[client].tasks.items():
            for split, index, encoded in (("test", test, data.tasks[task].test), ("train", train, data.tasks[task].train)):
                examples = result.client_examples(client, task, split)
                assert examples["index"].tolist() == index.tolist()
                assert examples["label"].tolist() == encoded.labels[index].tolist()
                assert examples["text"].map(len).gt(0).all()
                assert set(examples["class"]) <= set(data.tasks[task].class_names)
    for request, words in [((0, "synthetic_topic", "validation"), "split = 'validation': use 'train' or 'test'"),
                           ((0, "nope", "test"), "task = 'nope': this run's tasks are"),
                           ((9, "synthetic_topic", "test"), "client = 9: this run has clients 0-3")]:
        with pytest.raises(ConfigError, match=re.escape(words)):
            result.client_examples(*request)

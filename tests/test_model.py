import numpy as np
import pytest
import torch

from fltac_ray.client.training import evaluate_adapter, train_adapter
from fltac_ray.config import ModelConfig
from fltac_ray.data.encoding import text_encoder
from fltac_ray.data.federated import EncodedSplit
from fltac_ray.errors import ConfigError
from fltac_ray.models.adapter_model import AdapterModel
from fltac_ray.models.builders import check_target_modules, load_backbone


def _model(rank=1, head_classes=4, seed=0):
    config = ModelConfig(name="tiny-random-bert", lora={"rank": rank, "dropout": 0.0})
    return AdapterModel(load_backbone("tiny-random-bert", "text"), config, head_classes, seed)


def test_adapter_layout_is_lora_plus_head_in_sorted_order():
    model = _model(rank=2)
    names = [name for name, _ in model.adapter_layout()]
    assert names == sorted(names)
    assert names[:2] == ["encoder.base_model.model.encoder.layer.0.attention.self.query.lora_A.default.weight",
                         "encoder.base_model.model.encoder.layer.0.attention.self.query.lora_B.default.weight"]
    assert names[-2:] == ["head.bias", "head.weight"]
    # 2 layers x {query, value} x (A: r x 32 + B: 32 x r) + head 32 x 4 + 4
    assert model.adapter_size == 2 * 2 * (2 * 32 + 32 * 2) + 32 * 4 + 4


def test_same_adapter_length_for_tasks_with_different_class_counts():
    model = _model(head_classes=26)
    ids = torch.randint(1000, 2000, (3, 8))
    lengths = torch.tensor([8, 5, 3])
    assert model(input_ids=ids, lengths=lengths, num_classes=4).shape == (3, 4)
    assert model(input_ids=ids, lengths=lengths, num_classes=26).shape == (3, 26)
    # the upload is the same vector whatever the task: the server cannot read tasks from shapes
    assert model.get_adapter().shape == (model.adapter_size,)


def test_initial_adapter_is_seeded():
    np.testing.assert_array_equal(_model(seed=3).get_adapter(), _model(seed=3).get_adapter())
    assert not np.array_equal(_model(seed=3).get_adapter(), _model(seed=4).get_adapter())


def test_set_get_round_trip_and_shape_check():
    model = _model()
    vector = np.arange(model.adapter_size, dtype=np.float32) / 1000
    model.set_adapter(vector)
    np.testing.assert_array_equal(model.get_adapter(), vector)
    with pytest.raises(ValueError, match="expected"):
        model.set_adapter(np.zeros(3, np.float32))


def test_only_adapter_parameters_train():
    model = _model()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {name for name, _ in model.adapter_layout()}
    assert all("lora_" in n or n.startswith("head.") for n in trainable)


def test_local_training_lowers_loss_and_changes_only_the_adapter():
    encode = text_encoder("tiny-random-bert", max_length=8)
    texts = [f"word{i % 2} sample" for i in range(32)]
    split = EncodedSplit(encode(texts), np.array([i % 2 for i in range(32)], dtype=np.int64))
    model = _model(head_classes=2)
    frozen_before = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    start = model.get_adapter()
    indices = np.arange(32)
    before = evaluate_adapter(model, start, split, indices, 2, 16, torch.device("cpu"))
    outcome = train_adapter(model, start, split, indices, 2, steps=30, batch_size=8, lr=5e-2,
                            weight_decay=0.0, rng=np.random.default_rng(0), device=torch.device("cpu"))
    after = evaluate_adapter(model, outcome.adapter, split, indices, 2, 16, torch.device("cpu"))
    assert after.loss_sum < before.loss_sum
    assert after.correct == 32
    for name, param in model.named_parameters():
        if not param.requires_grad:
            assert torch.equal(param, frozen_before[name]), name


def test_unknown_target_module_fails_with_the_choices():
    with pytest.raises(ConfigError, match="model.lora.target_modules") as info:
        check_target_modules("tiny-random-bert", "text", ["query", "q_proj"])
    assert "'q_proj'" in str(info.value) and "value" in str(info.value)
    check_target_modules("minilm", "text", ["query", "value"])  # meta-device build, no weights read


def test_pooler_pooling_feeds_the_head_the_backbones_pretrained_pooler():
    """model.pooling: pooler — what BertForSequenceClassification feeds its head (the FL-TAC
    authors' GLUE model): the frozen pretrained pooler, with the config's dropout in training."""
    from transformers import BertModel

    from fltac_ray.models.builders import _tiny_config

    torch.manual_seed(0)
    encoder = BertModel(_tiny_config("tiny-random-bert", 1000), add_pooling_layer=True)
    model = AdapterModel(encoder, ModelConfig(name="tiny-random-bert", pooling="pooler"), 2, seed=0).eval()
    ids, lengths = torch.randint(1, 1000, (3, 7)), torch.tensor([7, 3, 5])
    mask = (torch.arange(7)[None, :] < lengths[:, None]).long()
    with torch.no_grad():
        expected = model.encoder(input_ids=ids, attention_mask=mask).pooler_output
        torch.testing.assert_close(model.features(input_ids=ids, lengths=lengths), expected)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "pooler" in n)  # frozen
    model.train()
    with torch.no_grad():  # hidden_dropout_prob 0.1 applies in training
        assert not torch.equal(model.features(input_ids=ids, lengths=lengths), expected)
    no_pooler = AdapterModel(load_backbone("tiny-random-bert", "text", seed=0),
                             ModelConfig(name="tiny-random-bert", pooling="pooler"), 2, seed=0)
    with pytest.raises(ValueError, match="has no pretrained pooler"):
        no_pooler.features(input_ids=ids, lengths=lengths)


def test_base_dropout_off_makes_the_frozen_base_deterministic_and_keeps_the_lora_dropout():
    ids, lengths = torch.randint(1000, 2000, (4, 8)), torch.tensor([8, 6, 5, 3])

    def model(base_dropout: bool, lora_dropout: float) -> AdapterModel:
        config = ModelConfig(name="tiny-random-bert", base_dropout=base_dropout,
                             lora={"rank": 2, "dropout": lora_dropout})
        built = AdapterModel(load_backbone("tiny-random-bert", "text"), config, 4, 0)
        return built.train()

    def logits(built: AdapterModel) -> torch.Tensor:
        with torch.no_grad():
            return built(input_ids=ids, lengths=lengths, num_classes=4)

    torch.manual_seed(0)
    on = model(True, 0.0)
    assert not torch.equal(logits(on), logits(on))  # the base's own dropout draws
    off = model(False, 0.0)
    train_mode = logits(off)
    torch.testing.assert_close(logits(off), train_mode, rtol=0, atol=0)
    torch.testing.assert_close(logits(off.eval()), train_mode, rtol=0, atol=0)
    kept = model(False, 0.3)
    rates = {name: module.p for name, module in kept.encoder.named_modules() if isinstance(module, torch.nn.Dropout)}
    assert {p for name, p in rates.items() if "lora_dropout" in name} == {0.3}
    assert {p for name, p in rates.items() if "lora_dropout" not in name} == {0.0}
    kept.set_adapter(np.random.default_rng(0).normal(size=kept.adapter_size).astype(np.float32))  # B != 0
    assert not torch.equal(logits(kept), logits(kept))  # LoRA's dropout still draws

"""FLoRAL: mixture-of-adaptor layers, the private router, and router-weighted aggregation."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fltac_ray.algorithms.base import AdapterSpec, Uploads
from fltac_ray.algorithms.floral import FLoRAL
from fltac_ray.algorithms.floral import FloralOptions as FloralConfig
from fltac_ray.config import ModelConfig, build_config
from fltac_ray.errors import ConfigError
from fltac_ray.models.adapter_model import AdapterModel
from fltac_ray.models.builders import load_backbone
from fltac_ray.models.mixture_lora import (
    MixtureConv2d,
    MixtureEmbedding,
    MixtureLinear,
    MixtureNorm,
    Router,
    inject_mixtures,
    layer_rank,
)


def _router(c=2, temperature=1.0, min_weight=0.0):
    return Router(c, temperature, min_weight)


@pytest.mark.parametrize(
    ("make", "x"),
    [
        (lambda r: MixtureLinear(nn.Linear(6, 4), r, 2, 1.0, 0.0), torch.randn(3, 6)),
        (lambda r: MixtureConv2d(nn.Conv2d(3, 5, 3, padding=1), r, 2, 1.0), torch.randn(2, 3, 8, 8)),
        (lambda r: MixtureEmbedding(nn.Embedding(10, 4), r, 2, 1.0), torch.tensor([[1, 2, 3]])),
        (lambda r: MixtureNorm(nn.LayerNorm(6), r), torch.randn(3, 6)),
        (lambda r: MixtureNorm(nn.BatchNorm2d(3).eval(), r), torch.randn(2, 3, 4, 4)),
    ],
)
def test_every_mixture_layer_starts_as_its_base_layer(make, x):
    torch.manual_seed(0)
    layer = make(_router())
    assert torch.allclose(layer(x), layer.base(x), atol=1e-6)


def test_linear_mixture_hand_computed():
    router = _router(c=2)
    layer = MixtureLinear(nn.Linear(2, 1, bias=False), router, rank=1, scale=2.0, dropout=0.0)
    with torch.no_grad():
        layer.base.weight.zero_()
        layer.lora_A.copy_(torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]]))  # (C=2, r=1, in=2)
        layer.lora_B.copy_(torch.tensor([[[3.0]], [[5.0]]]))  # (C=2, out=1, r=1)
        router.weight.copy_(torch.tensor([0.0, np.log(3.0)]))  # pi = softmax = [1/4, 3/4]
    x = torch.tensor([[2.0, 1.0]])
    # 2 * (1/4 * 3 * 2 + 3/4 * 5 * 1) = 2 * (1.5 + 3.75) = 10.5
    assert layer(x).item() == pytest.approx(10.5)


def test_min_weight_floors_every_gate():
    router = Router(3, temperature=1.0, min_weight=0.01)
    with torch.no_grad():
        router.weight.copy_(torch.tensor([50.0, 0.0, 0.0]))
    assert router.gates().min().item() == pytest.approx(0.01)
    assert router.mixture().sum().item() == pytest.approx(1.0)


def test_conv_mixture_matches_per_adaptor_convolutions():
    torch.manual_seed(1)
    router = _router(c=2)
    base = nn.Conv2d(3, 4, kernel_size=3, stride=2, padding=1)
    layer = MixtureConv2d(base, router, rank=2, scale=0.5)
    with torch.no_grad():
        layer.lora_B.normal_()
        router.weight.copy_(torch.tensor([0.3, -0.2]))
    x = torch.randn(2, 3, 9, 9)
    gates = router.gates()
    expected = base(x)
    for c in range(2):  # (1, 3) conv then (3, 1) conv, each adaptor on its own
        low = F.conv2d(x, layer.lora_A[c], stride=(1, 2), padding=(0, 1))
        expected = expected + 0.5 * gates[c] * F.conv2d(low, layer.lora_B[c], stride=(2, 1), padding=(1, 0))
    assert torch.allclose(layer(x), expected, atol=1e-5)


def test_rank_as_a_share_of_the_layers_parameter_budget():
    # the reference's resolve_rank: int(f * in * out / (in + out)), at least 1
    assert layer_rank(None, 0.01, 384, 384) == 1  # int(1.92)
    assert layer_rank(None, 0.1, 384, 384) == 19  # int(19.2)
    assert layer_rank(None, 0.05, 1024, 4096) == 40  # int(40.96)
    assert layer_rank(None, 0.01, 30, 768) == 1  # at least one
    assert layer_rank(3, None, 384, 384) == 3


def test_adaptor_bias_is_mixed_and_scaled_like_the_adaptors():
    router = _router(c=2)
    layer = MixtureLinear(nn.Linear(2, 1), router, rank=1, scale=2.0, dropout=0.0, bias=True)
    with torch.no_grad():
        layer.base.weight.zero_()
        layer.base.bias.zero_()
        layer.lora_A.zero_()
        layer.lora_bias.copy_(torch.tensor([[1.0], [5.0]]))  # (C=2, out=1)
        router.weight.copy_(torch.tensor([0.0, np.log(3.0)]))  # pi = [1/4, 3/4]
    # 2 * (1/4 * 1 + 3/4 * 5) = 8
    assert layer(torch.tensor([[2.0, 1.0]])).item() == pytest.approx(8.0)
    assert MixtureLinear(nn.Linear(2, 1, bias=False), router, 1, 1.0, 0.0, bias=True).lora_bias is None


def test_router_noise_only_in_training_once_per_pass_and_seeded():
    router = Router(3, temperature=1.0, min_weight=0.0, noise=1.0)
    router.eval()
    router.resample()
    np.testing.assert_allclose(router.gates().detach().numpy(), [1 / 3] * 3, rtol=1e-6)  # no noise
    router.train()
    torch.manual_seed(0)
    router.resample()
    first = router.gates().detach().clone()
    assert torch.equal(router.gates().detach(), first)  # the same draw for every layer of the pass
    assert not torch.allclose(first, torch.full((3,), 1 / 3))
    torch.manual_seed(0)
    router.resample()
    assert torch.equal(router.gates().detach(), first)  # seeded by torch's generator
    torch.testing.assert_close(router.mixture(), torch.full((3,), 1 / 3))  # what the server is told


def test_floral_defaults_follow_the_reference_code():
    floral = FloralConfig()
    assert (floral.rank_fraction, floral.alpha, floral.bias, floral.router_noise, floral.min_weight) == (
        0.01, 1.0, True, 1.0, 0.0)
    torch.manual_seed(0)
    layer = MixtureLinear(nn.Linear(400, 8), _router(), rank=2, scale=1.0, dropout=0.0)
    bound = (6 / 400) ** 0.5  # A ~ U(-sqrt(6 / fan_in), +)
    assert layer.lora_A.abs().max().item() <= bound and layer.lora_A.abs().max().item() > 0.9 * bound


def test_inject_mixtures_reports_unmatched_targets():
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(4, 4))
    with pytest.raises(ValueError, match="missing"):
        inject_mixtures(model, ["proj", "missing"], _router(), 1, None, 1.0, 0.0)


def _floral_model(c=3):
    config = ModelConfig(name="tiny-random-bert", lora={"rank": 1, "dropout": 0.0,
                                                        "target_modules": ["query", "value", "LayerNorm"]})
    return AdapterModel(load_backbone("tiny-random-bert", "text"), config, 4, 0, floral=FloralConfig(), num_adaptors=c)


def test_router_is_private_and_adaptors_are_indexed():
    model = _floral_model(c=3)
    names = [name for name, _ in model.adapter_layout()]
    assert not any("router" in name for name in names)
    groups = model.optimizer_groups(lr=1e-3)
    assert groups[1]["params"][0] is model.router.weight and groups[1]["lr"] == FloralConfig().router_lr
    assert groups[0]["lr"] == 1e-3 and len(groups[0]["params"]) == len(model.adapter_layout())
    index = model.adaptor_index()
    assert index.shape == (model.adapter_size,)
    shared = (index == -1).sum()
    assert shared == 32 * 4 + 4  # the head's base weight and bias
    counts = np.bincount(index[index >= 0])
    assert len(counts) == 3 and len(set(counts.tolist())) == 1  # C adaptors of equal size


def test_private_state_round_trip():
    model = _floral_model()
    model.set_private(np.array([1.0, 2.0, 3.0], np.float32))
    np.testing.assert_array_equal(model.get_private(), [1.0, 2.0, 3.0])
    model.set_private(None)
    np.testing.assert_allclose(model.mixture_weights(), [1 / 3] * 3, rtol=1e-6)


def test_floral_aggregation_hand_computed():
    # d = 3 entries: one shared (-1), one of adaptor 0, one of adaptor 1
    algorithm = FLoRAL(build_config({"algorithm": "floral"}))
    algorithm.setup(AdapterSpec((("head.bias", (1,)), ("a.lora_A", (2, 1))), np.array([-1, 0, 1])))
    vectors = np.array([[1.0, 10.0, 100.0], [3.0, 20.0, 300.0]], dtype=np.float32)
    mixture = np.array([[0.9, 0.1], [0.2, 0.8]])
    result = algorithm.aggregate(Uploads(vectors, np.array([1, 3]), extras={"mixture": mixture}), 1)
    # shared: (1*1 + 3*3) / 4 = 2.5
    # adaptor 0: weights 1*0.9, 3*0.2 -> (0.9*10 + 0.6*20) / 1.5 = 14
    # adaptor 1: weights 1*0.1, 3*0.8 -> (0.1*100 + 2.4*300) / 2.5 = 292
    np.testing.assert_allclose(result.adapters, [[2.5, 14.0, 292.0]], rtol=1e-6)
    np.testing.assert_array_equal(result.labels, [0, 0])
    with pytest.raises(ValueError, match="mixture"):
        algorithm.aggregate(Uploads(vectors, np.array([1, 3])), 1)


def test_floral_options_only_for_floral():
    with pytest.raises(ConfigError) as info:
        build_config({"algorithm": {"name": "fltac", "temperature": 0.5}})
    assert info.value.issues[0].field == "algorithm.temperature"
    config = build_config({"algorithm": {"name": "floral", "temperature": 0.5, "rank_fraction": 0.01}})
    assert config.resolved()["algorithm"]["num_adaptors"] == 3
    assert "num_adaptors" not in build_config({"algorithm": "fltac"}).resolved()["algorithm"]  # no FLoRAL options
    with pytest.raises(ConfigError, match="algorithm.temperature"):
        build_config({"algorithm": {"name": "floral", "temperature": 0}})


def test_optimal_router_fixes_each_client_to_its_true_cluster():
    from fltac_ray.algorithms.base import ClientJob

    shift = {"tasks": ["fashion_mnist"], "concept_shift": {"kind": "label_shift", "clusters": 4},
             "num_clients": 8}
    config = build_config({"algorithm": {"name": "floral", "router": "optimal"}, "data": shift,
                           "model": {"name": "efficientnet-lite0"}})
    algorithm = FLoRAL(config)
    names = config.data.task_names  # one task per cluster: fashion_mnist@shift0..3
    private = algorithm.private_start(ClientJob((5, 0), (names[1],), 10), np.array([9.0, 0, 0, 0], np.float32))
    np.testing.assert_array_equal(private, [0.0, 30.0, 0.0, 0.0])  # what it kept is ignored
    np.testing.assert_allclose(algorithm.mixture(private), [0, 1, 0, 0], atol=1e-12)
    learned = FLoRAL(build_config({"algorithm": "floral", "data": shift, "model": {"name": "efficientnet-lite0"}}))
    assert learned.private_start(ClientJob((5, 0), (names[1],), 10), None) is None
    model = AdapterModel(load_backbone("tiny-random-bert", "text"), ModelConfig(name="tiny-random-bert"), 4, 0,
                         floral=FloralConfig(router="optimal"), num_adaptors=4)
    assert model.optimizer_groups(lr=1e-3)[1]["lr"] == 0.0 and model.router.noise == 0.0  # never trained
    with pytest.raises(ConfigError, match="algorithm.router = 'optimal'.*here no data.concept_shift"):
        build_config({"algorithm": {"name": "floral", "router": "optimal"}})
    with pytest.raises(ConfigError, match="algorithm.num_adaptors \\(3\\); here 4 clusters"):
        build_config({"algorithm": {"name": "floral", "router": "optimal", "num_adaptors": 3}, "data": shift,
                      "model": {"name": "efficientnet-lite0"}})


def test_beside_a_quantised_base_the_router_and_mixtures_move_and_bitsandbytes_layers_stay():
    """model.quantization with FLoRAL: bitsandbytes placed its layers (and refuses .to()); the
    router, the mixture adaptors, the pixel statistics and the rest follow to the device. A
    stand-in bitsandbytes layer on the CPU, the meta device as the target."""
    model = _floral_model()

    class Linear4bit(nn.Linear):  # what bitsandbytes' layers look like to the walk
        def to(self, *args, **kwargs):
            raise AssertionError("a bitsandbytes layer was moved")

    Linear4bit.__module__ = "bitsandbytes.nn.modules"
    model.quantized_stand_in = Linear4bit(3, 3)
    model.place_beside_quantized_base(torch.device("meta"))
    assert model.quantized_stand_in.weight.device.type == "cpu"
    moved = [(name, t) for name, t in [*model.named_parameters(), *model.named_buffers()]
             if not name.startswith("quantized_stand_in")]
    assert moved and all(t.device.type == "meta" for _, t in moved)
    assert any("router" in name for name, _ in moved) and any("pixel" in name for name, _ in moved)

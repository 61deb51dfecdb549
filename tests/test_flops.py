"""Model FLOPs for MFU (client/flops.py): hand-computed on the tiny BERT, and the forward count
equal to torch's own FlopCounterMode on an unpadded batch."""

from __future__ import annotations

import torch

from fltac_ray.client.flops import peak_matmul_flops, step_flops
from fltac_ray.config import ModelConfig
from fltac_ray.models.adapter_model import AdapterModel
from fltac_ray.models.builders import load_backbone


def _tiny(rank: int = 2, head_classes: int = 5) -> AdapterModel:
    config = ModelConfig(name="tiny-random-bert", lora={"rank": rank, "dropout": 0.0})
    return AdapterModel(load_backbone("tiny-random-bert", "text"), config, head_classes, seed=0).eval()


def test_a_steps_flops_hand_computed_on_the_tiny_bert():
    # per layer: q, k, v, o (32 x 32 each), intermediate 64 x 32, output 32 x 64 = 16,384 weights
    # over 2 layers; LoRA on query and value at rank 2: (32*2 + 2*32) x 2 modules x 2 layers = 512
    flops = step_flops(_tiny(), tokens=10, examples=2, squared_lengths=3**2 + 7**2, head_classes=5)
    assert flops.base_linear == 2 * 16_384 * 10
    assert flops.lora == 2 * 512 * 10
    assert flops.attention == 4 * 32 * 2 * 58  # 4 L^2 hidden per layer, summed over the examples
    assert flops.head == 2 * 32 * 5 * 2
    assert flops.train == 2 * 327_680 + 3 * (14_848 + 10_240 + 640)


def test_the_forward_count_is_what_torch_counts_on_an_unpadded_batch():
    """With eager attention (plain matmuls, which torch's counter sees; its CPU SDPA kernel it
    does not count) the counts agree exactly."""
    from torch.utils.flop_counter import FlopCounterMode

    model = _tiny()
    model.encoder.config._attn_implementation = "eager"
    length = 9
    ids = torch.randint(1000, 2000, (1, length))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(num_classes=5, input_ids=ids, lengths=torch.tensor([length]))
    ours = step_flops(model, tokens=length, examples=1, squared_lengths=length**2, head_classes=5)
    assert counter.get_total_flops() == ours.forward


def test_the_matmul_peak_is_measured():
    assert peak_matmul_flops(torch.float32, size=128, repeats=2) > 1e6


def test_a_causal_lms_vocabulary_projection_counts_only_the_scored_tokens():
    """lm_token_scores sends only response positions through the output layer: with eager
    attention, torch's count of a scoring pass equals ours with scored_tokens."""
    from torch.utils.flop_counter import FlopCounterMode

    config = ModelConfig(name="tiny-random-llama", lora={"rank": 2, "dropout": 0.0})
    model = AdapterModel(load_backbone("tiny-random-llama", "causal_lm"), config, 0, seed=0,
                         modality="causal_lm").eval()
    model.encoder.config._attn_implementation = "eager"
    length, prompt = 12, 5
    ids = torch.randint(1000, 2000, (1, length))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.lm_token_scores(ids, torch.tensor([length]), torch.tensor([prompt]))
    ours = step_flops(model, tokens=length, examples=1, squared_lengths=length**2, head_classes=0,
                      scored_tokens=length - prompt)
    assert counter.get_total_flops() == ours.forward


def test_a_rounds_flops_sum_every_clients_tasks_at_their_steps():
    """Two clients: client 0 holds 2 examples of lengths 3 and 5 on task a; client 1 holds one
    of length 4 on task a and one of length 6 on task b, and trains b for 3 steps (a shard's own
    steps, as the pooled client's). Batch 2, default 1 step: hand-computed from step_flops."""
    import numpy as np

    from fltac_ray.client.flops import federation_flops
    from fltac_ray.data.federated import ClientShard, EncodedSplit, FederatedData, TaskBundle

    def bundle(name: str, lengths: list[int], classes: int) -> TaskBundle:
        split = EncodedSplit({"lengths": np.array(lengths)}, np.zeros(len(lengths), np.int64))
        return TaskBundle(name, [str(c) for c in range(classes)], split, split)

    data = FederatedData({"a": bundle("a", [3, 5, 4], 5), "b": bundle("b", [6], 3)},
                         [ClientShard(0, {"a": (np.array([0, 1]), np.array([0]))}),
                          ClientShard(1, {"a": (np.array([2]), np.array([0])), "b": (np.array([0]), np.array([0]))},
                                      steps={"b": 3})],
                         np.ones((2, 2)))
    model = _tiny()
    total = federation_flops(model, data, [0, 1], local_steps=1, batch_size=2)
    expected = (step_flops(model, tokens=8, examples=2, squared_lengths=9 + 25, head_classes=5)
                + step_flops(model, tokens=4, examples=1, squared_lengths=16, head_classes=5)
                + 3 * step_flops(model, tokens=6, examples=1, squared_lengths=36, head_classes=5))
    assert total == expected
    only_first = federation_flops(model, data, [0], local_steps=1, batch_size=2)
    assert only_first == step_flops(model, tokens=8, examples=2, squared_lengths=34, head_classes=5)

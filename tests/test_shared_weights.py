"""The base model travels as numpy arrays and is attached to a meta-built architecture unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fltac_ray.models.builders import backbone_from_weights, load_backbone
from fltac_ray.models.shared_weights import BaseWeights, attach_weights, export_weights


@pytest.mark.parametrize("name,modality", [("tiny-random-bert", "text"), ("tiny-random-vit", "image"),
                                           ("tiny-random-llama", "causal_lm"), ("random-mlp", "vector")])
def test_attached_backbone_equals_the_loaded_one(name, modality):
    loaded = load_backbone(name, modality, seed=3).eval()
    weights = export_weights(loaded)
    attached = backbone_from_weights(name, modality, weights)
    before, after = loaded.state_dict(), attached.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.is_meta for p in attached.parameters())
    assert not any(p.requires_grad for p in attached.parameters())


def test_attach_is_zero_copy_and_outputs_match():
    loaded = load_backbone("tiny-random-bert", "text").eval()
    weights = export_weights(loaded)
    for array in weights.arrays.values():
        array.flags.writeable = False  # as the memory maps hand them out
    attached = backbone_from_weights("tiny-random-bert", "text", weights)
    embedding = attached.embeddings.word_embeddings.weight
    array = weights.arrays["embeddings.word_embeddings.weight"]
    assert embedding.data_ptr() == array.__array_interface__["data"][0]  # the same memory
    ids = torch.randint(100, 1000, (2, 7))
    torch.testing.assert_close(attached(input_ids=ids).last_hidden_state, loaded(input_ids=ids).last_hidden_state)


def test_tied_weights_stay_tied():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    weights = export_weights(model)
    assert weights.aliases == {"lm_head.weight": "model.embed_tokens.weight"}
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(config)
    attached = attach_weights(skeleton, weights)
    assert attached.lm_head.weight is attached.model.embed_tokens.weight


def test_bfloat16_travels_as_raw_bits():
    model = torch.nn.Linear(3, 2).to(torch.bfloat16)
    weights = export_weights(model)
    assert weights.arrays["weight"].dtype == np.uint16 and weights.dtypes["weight"] == "bfloat16"
    with torch.device("meta"):
        skeleton = torch.nn.Linear(3, 2)
    attached = attach_weights(skeleton, weights)
    assert attached.weight.dtype == torch.bfloat16 and torch.equal(attached.weight, model.weight)


def test_weights_for_another_architecture_are_refused():
    weights = export_weights(torch.nn.Linear(3, 2))
    with torch.device("meta"):
        other = torch.nn.Sequential(torch.nn.Linear(3, 2))
    with pytest.raises(ValueError, match="missing .*0.weight"):
        attach_weights(other, weights)
    assert isinstance(weights, BaseWeights) and weights.nbytes == 4 * (6 + 2)

"""The base is loaded once per node into memory-mapped files; the node's other workers map them."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from fltac_ray.models import base_cache
from fltac_ray.models.base_cache import (
    BaseDescription,
    cache_key,
    node_base_weights,
    read_weights,
    write_weights,
)
from fltac_ray.models.builders import backbone_from_weights, load_backbone
from fltac_ray.models.shared_weights import export_weights


def test_written_weights_map_back_unchanged_and_read_only(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    weights = export_weights(model)
    write_weights(weights, tmp_path / "base")
    mapped = read_weights(tmp_path / "base")
    assert mapped.aliases == weights.aliases == {"lm_head.weight": "model.embed_tokens.weight"}
    assert (mapped.dtypes, mapped.buffers) == (weights.dtypes, weights.buffers)
    for name, array in weights.arrays.items():
        assert isinstance(mapped.arrays[name], np.memmap) and not mapped.arrays[name].flags.writeable
        np.testing.assert_array_equal(mapped.arrays[name], array)
    assert mapped.dtypes["model.embed_tokens.weight"] == "bfloat16"


def test_the_first_worker_of_a_node_loads_and_the_others_map(tmp_path):
    description = BaseDescription("tiny-random-bert", "text", seed=3, feature_dim=16)
    first, loaded_first = node_base_weights(description, tmp_path)
    second, loaded_second = node_base_weights(description, tmp_path)
    assert (loaded_first, loaded_second) == (True, False)
    reference = load_backbone("tiny-random-bert", "text", seed=3).eval()
    attached = backbone_from_weights("tiny-random-bert", "text", second)
    ids = torch.randint(100, 1000, (2, 7))
    torch.testing.assert_close(attached(input_ids=ids).last_hidden_state, reference(input_ids=ids).last_hidden_state)
    # another seed is another base, under another key
    other = BaseDescription("tiny-random-bert", "text", seed=4, feature_dim=16)
    assert cache_key(other) != cache_key(description)
    assert node_base_weights(other, tmp_path)[1] is True


def test_workers_starting_together_load_the_base_once(tmp_path, monkeypatch):
    import fltac_ray.models.builders as builders

    calls = []
    real = builders.load_backbone

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(builders, "load_backbone", counting)
    description = BaseDescription("random-mlp", "vector", seed=0, feature_dim=8)
    results = []
    threads = [threading.Thread(target=lambda: results.append(node_base_weights(description, tmp_path)))
               for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and sorted(loaded for _, loaded in results) == [False, False, False, True]
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == [cache_key(description)]  # no staging left


def test_a_base_without_its_manifest_is_reloaded(tmp_path):
    description = BaseDescription("random-mlp", "vector", seed=0, feature_dim=8)
    folder = tmp_path / cache_key(description)
    folder.mkdir()
    (folder / "0.npy").write_bytes(b"torn")  # a copy interrupted by hand
    assert node_base_weights(description, tmp_path)[1] is True
    assert read_weights(folder).nbytes > 0


def test_a_manifest_of_another_format_is_refused(tmp_path):
    write_weights(export_weights(torch.nn.Linear(3, 2)), tmp_path / "base")
    manifest = tmp_path / "base" / base_cache.MANIFEST
    manifest.write_text(manifest.read_text().replace('"format": 1', '"format": 99'))
    with pytest.raises(ValueError, match="format 99, expected 1"):
        read_weights(tmp_path / "base")

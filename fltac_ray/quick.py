"""The quick profile (`fltac-ray run EXP --quick`, `fltac_ray.run(..., quick=True)`): the same
pipeline end to end - data, partition, training, clustering, evaluation, checkpoints, export,
report - at the cheapest settings, to check an experiment file, a plug-in or an installation in
seconds rather than minutes. Its numbers mean nothing about the method.

What it changes (every other setting stays as the experiment gives it, and a --set given with
--quick wins over these):
  engine.backend local        no Ray start-up (several seconds on 2 cores; one process computes)
  model.name                  the modality's 2-layer, hidden-32 random model (tiny-random-bert,
                              -vit, -llama; random-mlp for vectors), with its default LoRA targets,
                              its own image size and no quantisation
  rounds, data.num_clients    at most 2 and 4
  data.train_per_task / test  at most 64 / 32 examples per task; text at most 16 tokens long
  train.local_steps           at most 2
"""

from __future__ import annotations

from fltac_ray.config import ExperimentConfig

QUICK_MODELS = {"text": "tiny-random-bert", "image": "tiny-random-vit", "causal_lm": "tiny-random-llama",
                "vector": "random-mlp"}


def quick_overrides(config: ExperimentConfig) -> list[str]:
    """`--set` strings that make `config` the quick profile of itself."""
    data = config.data
    train = data.train_limit if data.train_limit is not None else 64
    out = ["engine.backend=local", f"model.name={QUICK_MODELS[data.modality]}", "model.lora.target_modules=null",
           "model.image_size=null", "model.quantization=none", f"rounds={min(config.rounds, 2)}",
           f"data.num_clients={min(data.num_clients, 4)}", f"data.train_per_task={min(train, 64)}",
           f"data.test_per_task={min(data.test_per_task, 32)}",
           f"train.local_steps={min(config.train.local_steps, 2)}"]
    if data.modality in ("text", "causal_lm"):
        out.append(f"data.max_length={min(data.max_length, 16)}")
    return out

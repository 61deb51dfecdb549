"""Examples -> model inputs: the arrays shipped once to every worker through the object store.

Every value is a numpy array whose first axis is the example:
  text / text_pair  input_ids (n, L) int32, lengths (n,) int32, token_type_ids (n, L) int8 (pairs)
  image             pixels (n, channels, h, w) uint8 at native size (the model resizes a batch)
  vector            features (n, d) float32
  instruction       input_ids (n, L) int32 = prompt + response + EOS, lengths (n,) int32,
                    prompt_lengths (n,) int32; references (n,) object = reference responses
Storing lengths instead of attention masks halves the token arrays; batches are cut to their
longest example, so short examples do not pay for max_length.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from fltac_ray.data.types import Examples

Featurizer = Callable[[Examples], dict[str, np.ndarray]]


def encode_texts(tokenizer: Any, texts: list[str], pairs: list[str] | None, max_length: int) -> dict[str, np.ndarray]:
    if not texts:
        return {"input_ids": np.zeros((0, max_length), np.int32), "lengths": np.zeros(0, np.int32)}
    batch = tokenizer(texts, pairs, padding="max_length", truncation=True, max_length=max_length,
                      return_tensors="np")
    out = {
        "input_ids": batch["input_ids"].astype(np.int32),
        "lengths": batch["attention_mask"].sum(axis=1).astype(np.int32),
    }
    if pairs is not None and "token_type_ids" in batch:
        out["token_type_ids"] = batch["token_type_ids"].astype(np.int8)
    return out


def encode_instructions(tokenizer: Any, prompts: list[str], responses: list[str], max_length: int,
                        eos_id: int) -> dict[str, np.ndarray]:
    """Prompt + response + EOS per row, right-padded. When too long, the prompt loses its start
    (the instruction's end sits next to the response) and the response keeps at least half."""
    n = len(prompts)
    ids = np.full((n, max_length), tokenizer.pad_token_id, np.int32)
    lengths = np.zeros(n, np.int32)
    prompt_lengths = np.zeros(n, np.int32)
    for i, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        r = tokenizer(response, add_special_tokens=False)["input_ids"] + [eos_id]
        r = r[: max(max_length // 2, max_length - len(p))]
        p = p[-(max_length - len(r)):] if len(p) + len(r) > max_length else p
        row = p + r
        ids[i, : len(row)] = row
        lengths[i], prompt_lengths[i] = len(row), len(p)
    return {"input_ids": ids, "lengths": lengths, "prompt_lengths": prompt_lengths,
            "references": np.asarray(responses, dtype=object)}


def make_featurizer(model_name: str, max_length: int) -> Featurizer:
    """One function for every task kind; the tokenizer is loaded only when a text kind needs it."""
    tokenizer: list[Any] = []

    def get_tokenizer() -> Any:
        if not tokenizer:
            from fltac_ray.models.builders import load_tokenizer

            tokenizer.append(load_tokenizer(model_name))
        return tokenizer[0]

    def featurize(examples: Examples) -> dict[str, np.ndarray]:
        if examples.kind in ("text", "text_pair"):
            return encode_texts(get_tokenizer(), examples.texts or [], examples.pairs, max_length)
        if examples.kind == "instruction":
            from fltac_ray.models.builders import eos_token_id

            tok = get_tokenizer()
            return encode_instructions(tok, examples.texts or [], examples.pairs or [], max_length,
                                       eos_token_id(tok))
        if examples.kind == "image":
            return {"pixels": np.ascontiguousarray(examples.images, dtype=np.uint8)}
        return {"features": np.ascontiguousarray(examples.features, dtype=np.float32)}

    return featurize


def text_encoder(name: str, max_length: int):
    """texts -> {"input_ids": (n, max_length) int32, "lengths": (n,) int32} with model `name`'s
    tokenizer (for callers that only have texts; make_featurizer handles every task kind)."""
    from fltac_ray.models.builders import load_tokenizer

    tokenizer = load_tokenizer(name)
    return lambda texts: encode_texts(tokenizer, texts, None, max_length)

"""Writes the example CSVs of experiments/custom_csv.yaml: three text tasks as a user would bring
them (a text column, a label column holding class names), drawn from fltac-ray's generated
sentence tasks. Run from the repository root: python experiments/data/make_example_csv.py"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from fltac_ray.data import synthetic

HERE = Path(__file__).parent
TASKS = {"reviews": synthetic.sentiment, "topics": synthetic.topic, "tenses": synthetic.tense}

for index, (name, generate) in enumerate(TASKS.items()):
    examples = generate(500, np.random.default_rng([7, index]))
    frame = pd.DataFrame({"sentence": examples.texts,
                          "label": [examples.class_names[i] for i in examples.labels]})
    frame.iloc[:400].to_csv(HERE / f"{name}_train.csv", index=False)
    frame.iloc[400:].to_csv(HERE / f"{name}_test.csv", index=False)
    print(f"{name}: {len(frame)} rows, classes {examples.class_names}")

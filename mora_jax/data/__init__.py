"""The missing-modality benchmark protocol: datasets, missing tables, preprocessing, pipeline, metrics.

    from mora_jax import data
    ds = data.load("mm_imdb", split="train", data_dir=..., manual_dir=..., missing=data.Missing(rate=0.7, type="both"))
    it = iter(data.batches(ds, 256, tokenizer, train=True, seed=42))   # dicts of numpy arrays
    test_views = {kind: ds.scenario(kind) for kind in data.SCENARIOS}  # complete / text / image missing / mix
    own = data.load(data.MANIFEST, "train", data_dir=..., manifest=data.Manifest("my_data.jsonl"))  # your own data
"""

from mora_jax.data.builders.manifest import Manifest
from mora_jax.data.datasets import (BUILDERS, MANIFEST, SCENARIOS, Classes, Dataset, batches, classes, is_prepared,
                                    load, prepare)
from mora_jax.data.missing import Missing
from mora_jax.data.pipeline import CLASSIFIER_INPUTS, MODEL_INPUTS, Preprocessing, tokenize

__all__ = ["BUILDERS", "CLASSIFIER_INPUTS", "MANIFEST", "MODEL_INPUTS", "SCENARIOS", "Classes", "Dataset", "Manifest",
           "Missing", "Preprocessing", "batches", "classes", "is_prepared", "load", "prepare", "tokenize"]


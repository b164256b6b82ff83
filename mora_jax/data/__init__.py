"""The missing-modality benchmark protocol: datasets, missing tables, preprocessing, pipeline, metrics.

    from mora_jax import data
    ds = data.load("mm_imdb", split="train", data_dir=..., manual_dir=..., missing=data.Missing(rate=0.7, type="both"))
    it = iter(data.batches(ds, 256, tokenizer, train=True, seed=42))   # dicts: "inputs" (inputs.Decoded), labels...
    test_views = {kind: ds.scenario(kind) for kind in data.SCENARIOS}  # complete / text / image missing / mix
    own = data.load(data.MANIFEST, "train", data_dir=..., manifest=data.Manifest("my_data.jsonl"))  # your own data

What lives where: datasets.py (load, classes, scenarios), builders/ (TFDS builders: easy-VQA, the manual
downloads, manifests), missing.py (missing tables and codes), preprocess.py (images), pipeline.py (the Grain batches),
inputs.py (the typed model inputs a batch carries), pixel_store.py and array_files.py (decoded images and other
arrays kept on disk), metrics.py, tokenizers.py, vqa.py (easy-VQA for the multimodal LLM).

Imports: data imports neither mora_jax.adapters nor mora_jax.train; the names below load their module on first use,
so that importing one light module (preprocess, missing, inputs; what a decoding worker process or the adapters
import) does not load TFDS and the dataset builders.
"""

import importlib

_EXPORTS = {
    "Manifest": "builders.manifest",
    **dict.fromkeys(("BUILDERS", "MANIFEST", "SCENARIOS", "Classes", "Dataset", "batches", "classes", "is_prepared",
                     "load", "prepare", "truncation_warning"), "datasets"),
    "Missing": "missing",
    **dict.fromkeys(("Preprocessing", "tokenize"), "pipeline"),
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
  if name not in _EXPORTS:
    raise AttributeError(f"module 'mora_jax.data' has no attribute {name!r}")
  return getattr(importlib.import_module(f"mora_jax.data.{_EXPORTS[name]}"), name)

"""The embedded default backbone: a small CLIP pre-trained by this project on easy-VQA train images paired with
captions derived from their questions and answers, saved as a Hugging Face CLIP checkpoint directory.

`backbone.path="embedded"` builds it once per cache directory (the first `python train.py` that needs it) and
then loads it like any checkpoint. Deterministic given the seed. The test split is never used for
pre-training, only for the zero-shot retrieval check.
"""

import dataclasses
import json
import os
import shutil
from pathlib import Path

import jax
import numpy as np
import safetensors.numpy
import tokenizers
import transformers
from tokenizers import models, normalizers, pre_tokenizers, trainers

from mora_jax import data, sharding
from mora_jax.backbones import pretrain
from mora_jax.data import pipeline, preprocess
from mora_jax.data.builders import easy_vqa
from mora_jax.models import modeling as clip_lib
from mora_jax.models.config import CLIPConfig, preset
from mora_jax.models import hf

from jax.experimental import multihost_utils

NAME = "embedded"  # the backbone.path value that selects this backbone
TOWERS_FILE = "towers.json"  # in a combine_towers folder: where each tower came from
VERSION = 1  # part of the cache directory name: bump it when the recipe or the architecture changes
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
IMAGE_SIZE = 64
IMAGE_PROCESSING = preprocess.ImageProcessing.clip(IMAGE_SIZE)
MAX_LENGTH = 24
# The most zero-shot recall that fits the first run's few minutes on a 2-core CPU (docs/training.md, "The embedded
# backbone", lists the alternatives measured).
RECIPE = dict(epochs=12, batch_size=64, lr=5e-4, weight_decay=0.1)


def train_tokenizer(texts, directory: Path, vocab_size: int = 400) -> transformers.CLIPTokenizer:
  """A small BPE (CLIP conventions: lower case, "</w>" ends words, byte-level alphabet) trained on `texts`,
  written as vocab.json + merges.txt and loaded as transformers' CLIPTokenizer."""
  bpe = tokenizers.Tokenizer(models.BPE(end_of_word_suffix="</w>"))
  bpe.normalizer = normalizers.Lowercase()
  bpe.pre_tokenizer = pre_tokenizers.Whitespace()
  bpe.train_from_iterator(texts, trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), end_of_word_suffix="</w>", show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  directory.mkdir(parents=True, exist_ok=True)
  bpe.model.save(str(directory))
  # The trainer numbers its alphabet in hash-set order, which changes from run to run (the merges do not):
  # renumber specials first, then every other token in sorted order, so the same texts give the same ids.
  vocab = json.loads((directory / "vocab.json").read_text())
  order = list(SPECIAL_TOKENS) + sorted(set(vocab) - set(SPECIAL_TOKENS))
  (directory / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(order)}))
  return transformers.CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"))


def small_config(tokenizer) -> CLIPConfig:
  """Width 128, 4 layers per tower, patch 16 on 64 px images, 24 text positions."""
  tiny = preset("tiny")
  text = dataclasses.replace(tiny.text, vocab_size=len(tokenizer), hidden_size=128, intermediate_size=512,
                             num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=MAX_LENGTH,
                             eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
  vision = dataclasses.replace(tiny.vision, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                               num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=16)
  return dataclasses.replace(tiny, text=text, vision=vision, projection_dim=128)


def _zero_shot(model, tokenizer, prep, data_dir, log) -> tuple[float, int]:
  """(recall@1 of each test image's caption among all distinct test captions, number of those captions)."""
  test = data.load("easy_vqa", "test", data_dir, missing=data.Missing(rate=0.0), log=log)
  pairs = easy_vqa.image_captions(test.source.source, test.class_names)
  captions = sorted({p["text"] for p in pairs})
  images = np.stack([prep.pixels(pipeline.record_image(p, "easy_vqa test captions")) for p in pairs])
  ids, mask = data.tokenize(tokenizer, captions, prep)
  image_features, caption_features = pretrain.features(model, images, ids, mask)
  truth = np.array([captions.index(p["text"]) for p in pairs])
  return pretrain.retrieval_recall_at_1(image_features, caption_features, truth), len(captions)


def directory_name(seed: int) -> str:
  return f"easy_vqa_clip-v{VERSION}-seed{seed}"


def is_built(directory: Path) -> bool:
  return (directory / "pretraining.json").is_file()


def ensure(cache_dir: str | Path, data_dir: str | Path, seed: int = 0, log=print) -> Path:
  """The embedded backbone's directory under `cache_dir`, pre-training it first if it is not there yet.

  With several processes the pre-training is collective (on the global mesh) and process 0 writes, so
  `cache_dir` must be on a filesystem every process sees (as the workdir).
  """
  directory = Path(cache_dir).expanduser() / directory_name(seed)
  if sharding.on_every_process(is_built(directory)):
    return directory
  log(f"building the embedded backbone (first use of {directory}): pre-training a small CLIP on easy-VQA "
      "train images, a few minutes on 2 CPU cores; later runs load it from there")
  build(directory, data_dir, seed=seed, log=log)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"built {directory}")
  if not is_built(directory):
    raise FileNotFoundError(f"{directory} was written by process 0 but is not visible to process "
                            f"{jax.process_index()}: put backbone.cache_dir on a filesystem all processes share.")
  return directory


def build(directory: str | Path, data_dir: str | Path, seed: int = 0, recipe: dict | None = None,
          log=print) -> Path:
  """Pre-trains the small CLIP and writes it (config.json, model.safetensors, tokenizer files,
  preprocessor_config.json, and pretraining.json with the recipe, losses and zero-shot score) to `directory`;
  returns it. Every process calls it."""
  directory = Path(directory).expanduser()
  recipe = {**RECIPE, **(recipe or {})}
  train = data.load("easy_vqa", "train", data_dir, missing=data.Missing(rate=0.0), log=log)
  pairs = easy_vqa.image_captions(train.source.source, train.class_names)
  texts = [train.source[i]["text"].decode() for i in range(len(train.source))] + [p["text"] for p in pairs]
  # Staged under a per-process name and renamed when complete: a crash never leaves a half-written backbone.
  staging = directory.with_name(f"{directory.name}.partial-{os.getpid()}")
  tokenizer = train_tokenizer(texts, staging)
  prep = data.Preprocessing(image=IMAGE_PROCESSING, max_length=MAX_LENGTH)
  model = clip_lib.init(small_config(tokenizer), seed=seed)
  log(f"pre-training on {len(pairs)} (image, caption) pairs: {recipe}")
  model, losses = pretrain.train(model, pairs, tokenizer, prep, seed=seed, **recipe)
  recall, num_captions = _zero_shot(model, tokenizer, prep, data_dir, log)
  log(f"zero-shot retrieval on easy-VQA test images: recall@1 {100 * recall:.1f}% among {num_captions} "
      f"captions (chance {100 / num_captions:.1f}%)")
  hf.save_pretrained(model, staging)
  if sharding.is_main_process():
    tokenizer.save_pretrained(str(staging))
    transformers.CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                    crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(str(staging))
    (staging / "pretraining.json").write_text(json.dumps(
        {"seed": seed, "recipe": recipe, "pairs": len(pairs), "epoch_losses": losses,
         "zero_shot_recall_at_1": recall, "distinct_test_captions": num_captions}, indent=2) + "\n")
    staging.rename(directory)
  shutil.rmtree(staging, ignore_errors=True)
  return directory


def ensure_combined(cache_dir: str | Path, data_dir: str | Path, vision_seed: int = 0, text_seed: int = 1,
                    log=print) -> Path:
  """The folder of `combine_towers` of two embedded backbones (each built first if absent): the vision tower of
  seed `vision_seed`, the text tower of `text_seed`; written by process 0, seen by all (as `ensure`)."""
  vision = ensure(cache_dir, data_dir, vision_seed, log)
  text = ensure(cache_dir, data_dir, text_seed, log)
  directory = Path(cache_dir).expanduser() / combined_name(vision_seed, text_seed)
  if sharding.on_every_process((directory / TOWERS_FILE).is_file()):
    return directory
  if sharding.is_main_process():
    combine_towers(vision, text, directory)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"combined {directory}")
  return directory


def combined_name(vision_seed: int, text_seed: int) -> str:
  return f"easy_vqa_clip-v{VERSION}-vision-seed{vision_seed}-text-seed{text_seed}"


def combine_towers(vision_dir: str | Path, text_dir: str | Path, out_dir: str | Path) -> Path:
  """A CLIP checkpoint whose vision tower (and projection, and temperature) come from `vision_dir` and whose
  text tower (and projection, and tokenizer) from `text_dir`: two towers that were never trained together.
  Both must have the same architecture and tokenizer (e.g. two seeds of the embedded backbone)."""
  vision_dir, text_dir, out = Path(vision_dir), Path(text_dir), Path(out_dir)
  vision, _ = hf.read_weights(vision_dir)
  text, _ = hf.read_weights(text_dir)
  if hf.read_config(vision_dir) != hf.read_config(text_dir):
    raise ValueError(f"{vision_dir} and {text_dir} have different CLIP configs; their towers cannot be combined.")
  if (vision_dir / "vocab.json").read_text() != (text_dir / "vocab.json").read_text():
    raise ValueError(f"{vision_dir} and {text_dir} have different tokenizers.")
  combined = {k: (text[k] if k.startswith(("text_model.", "text_projection.")) else v) for k, v in vision.items()}
  out.mkdir(parents=True, exist_ok=True)
  for name in os.listdir(text_dir):
    if name not in (hf.SAFETENSORS_FILE, "pretraining.json"):
      shutil.copy(text_dir / name, out / name)
  safetensors.numpy.save_file(combined, out / hf.SAFETENSORS_FILE, metadata={"format": "pt"})
  (out / TOWERS_FILE).write_text(json.dumps({"vision": str(vision_dir), "text": str(text_dir)}, indent=2) + "\n")
  return out

"""Contrastive pre-training pieces: CLIP's loss, the pre-training step, and easy-VQA's derived captions."""

import numpy as np
import pytest

from mora_jax import clip, data
from mora_jax.data import pipeline, preprocess, tokenizers
from mora_jax.data.builders import easy_vqa
from mora_jax.backbones import backbone, pretrain


def test_contrastive_loss_is_the_symmetric_cross_entropy():
  logits = np.random.RandomState(0).randn(5, 5).astype(np.float32)

  def cross_entropy(rows):  # direct transcription: -log softmax of the diagonal, averaged
    shifted = rows - rows.max(1, keepdims=True)
    return float(np.mean(-(np.diag(shifted) - np.log(np.exp(shifted).sum(1)))))

  expected = 0.5 * (cross_entropy(logits) + cross_entropy(logits.T))
  assert float(pretrain.contrastive_loss(logits)) == pytest.approx(expected, abs=1e-6)


def test_pretraining_lowers_the_loss_of_matching_pairs(tmp_path):
  """40 one-step epochs on 16 distinct (image, text) pairs: the weights move, the loss falls, and
  images retrieve their own text well above chance."""
  tokenizer = tokenizers.byte_level_clip_tokenizer(tmp_path / "tok")
  rng = np.random.RandomState(0)
  pairs = [{"id": str(i), "image": rng.randint(0, 255, (32, 32, 3)).astype(np.uint8), "text": f"pair {i} {i * 7}",
            "label": 0} for i in range(16)]
  model = clip.init(backbone.random_config("tiny", tokenizer, 16), seed=0)
  before = np.asarray(model.text_projection.kernel[...]).copy()
  prep = pipeline.Preprocessing(image=preprocess.ImageProcessing.clip(32), max_length=16)
  trained, losses = pretrain.train(model, pairs, tokenizer, prep, epochs=40, batch_size=16, lr=3e-3, seed=0,
                                   warmup_fraction=0.0, num_threads=1)
  assert losses[-1] < 1.0 < 3.0 < losses[0], losses  # measured: 4.12 -> 0.31
  assert not np.allclose(np.asarray(trained.text_projection.kernel[...]), before)
  batch = next(iter(pipeline.batches(pairs, np.zeros(16, np.int8), tokenizer, 16, train=False, prep=prep)))
  inputs = batch["inputs"]
  pixel_values = np.stack([preprocess.normalize(image, prep.image) for image in inputs.pixels])
  image_features, text_features = pretrain.features(trained, pixel_values, inputs.input_ids, inputs.attention_mask)
  recall = pretrain.retrieval_recall_at_1(image_features, text_features, np.arange(16))
  assert recall >= 0.75, recall  # measured 1.0; chance is 1/16


def test_easy_vqa_captions_agree_with_every_question_about_the_image(easy_vqa_data):
  """Each derived caption answers every question of its image as the dataset does (negations included)."""
  ds = data.load("easy_vqa", "validation", easy_vqa_data, missing=data.Missing(rate=0.0))
  source, names = ds.source.source, ds.class_names
  captions = {int(p["id"]): p["text"].split()[1:] for p in easy_vqa.image_captions(source, names)}
  assert len(captions) >= 0.95 * len({int(source[i]["image_id"]) for i in range(len(source))})
  checked = 0
  for i in range(len(source)):
    record = source[i]
    words, answer = captions.get(int(record["image_id"])), names[int(record["label"])]
    if words is None or words[-1] == "shape" or len(words) != 2:
      continue
    colour, shape = words
    question = record["text"].decode()
    tokens = question.replace("?", " ").split()
    if answer not in easy_vqa.YES_NO:
      assert answer in (colour, shape), (question, answer, words)
    else:
      named = [w for w in tokens if w in names and w not in easy_vqa.YES_NO]
      if len(named) == 1:
        has = named[0] in (colour, shape)
        negative = "not" in tokens or "no" in tokens  # written out here, not easy_vqa.negated
        assert (answer == "yes") == (has != negative), (question, answer, words)
    checked += 1
  assert checked > 3000

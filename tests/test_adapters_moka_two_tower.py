"""MokA (two-tower) on CLIP: per-tower LoRA when lambda = 0, no cross term for samples without text, text
features untouched by images, gradients into the text tower's A through the vision cross term, partitions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mora_jax import adapters, clip
from mora_jax.adapters import partition
from tests import helpers

TARGETS = dict(targets=("q_proj", "v_proj", "fc1"), start_layer=0, rank=3, dropout=0.0)


def moka_classifier(lam: float, **overrides) -> adapters.Classifier:
  cfg = adapters.MokAConfig(**{**TARGETS, "lam": lam, **overrides})
  return adapters.build_classifier(clip.init(helpers.tiny_config(), seed=0), cfg, num_classes=4)


def inputs_with_a_missing_text():
  """Random inputs whose sample 1 has the empty text (start and end tokens only), as docs/protocol.md's dummy."""
  pixels, ids, mask = helpers.random_inputs(helpers.tiny_config())
  mask = np.asarray(mask).copy()
  mask[1] = 0
  mask[1, :2] = 1
  assert np.asarray(mask).sum(-1)[[0, 2]].min() > 2
  return pixels, ids, jnp.asarray(mask)


def test_lambda_zero_equals_per_tower_lora_exactly():
  lora = adapters.build_classifier(clip.init(helpers.tiny_config(), seed=0),
                                   adapters.LoRAConfig(**TARGETS, alpha=16.0), num_classes=4)
  helpers.perturb_trainables(lora)
  moka = moka_classifier(lam=0.0)
  nnx.update(moka, nnx.state(lora, partition.Trainable))
  pixels, ids, mask = inputs_with_a_missing_text()
  np.testing.assert_array_equal(np.asarray(moka(pixels, ids, mask)), np.asarray(lora(pixels, ids, mask)))
  crossed = moka_classifier(lam=0.5)
  nnx.update(crossed, nnx.state(lora, partition.Trainable))
  assert np.abs(np.asarray(crossed(pixels, ids, mask)) - np.asarray(lora(pixels, ids, mask))).max() > 1e-4


def test_a_sample_without_text_gets_the_lambda_zero_vision_output():
  with_cross, without = moka_classifier(lam=0.5), moka_classifier(lam=0.0)
  helpers.perturb_trainables(with_cross)
  nnx.update(without, nnx.state(with_cross, partition.Trainable))
  pixels, ids, mask = inputs_with_a_missing_text()
  half = helpers.tiny_config().projection_dim
  image = np.asarray(with_cross.features(pixels, ids, mask))[:, :half]
  reference = np.asarray(without.features(pixels, ids, mask))[:, :half]
  np.testing.assert_array_equal(image[1], reference[1])
  assert np.abs(image[[0, 2]] - reference[[0, 2]]).min(-1).max() > 0  # the others do attend to their text


def test_text_features_do_not_depend_on_the_image():
  clf = moka_classifier(lam=0.5)
  helpers.perturb_trainables(clf)
  pixels, ids, mask = inputs_with_a_missing_text()
  half = helpers.tiny_config().projection_dim
  text = np.asarray(clf.features(pixels, ids, mask))[:, half:]
  other = np.asarray(clf.features(pixels[::-1] + 1.0, ids, mask))[:, half:]
  np.testing.assert_array_equal(text, other)


@pytest.mark.parametrize("lam", [0.0, 0.5])
def test_gradients_reach_the_text_towers_a_through_the_vision_cross_term(lam):
  clf = moka_classifier(lam=lam)
  helpers.perturb_trainables(clf)
  graphdef, params = adapters.split(clf)
  pixels, ids, mask = inputs_with_a_missing_text()
  half = helpers.tiny_config().projection_dim

  def image_only(text_specific):
    tree = {**params, "adapter": {**params["adapter"], "specific": {**params["adapter"]["specific"],
                                                                     "text": text_specific}}}
    return jnp.sum(adapters.join(graphdef, tree).features(pixels, ids, mask)[:, :half] ** 2)

  grads = jax.jit(jax.grad(image_only))(params["adapter"]["specific"]["text"])
  text_a = [np.asarray(v) for path, v in nnx.to_flat_state(grads) if path[-1] == "lora_A"]
  assert all(np.isfinite(g).all() for g in text_a)
  norm = sum(float(np.abs(g).sum()) for g in text_a)
  assert (norm > 0) == (lam > 0), norm


def test_partitions_and_merge():
  moka = moka_classifier(lam=0.5)
  lora = adapters.build_classifier(clip.init(helpers.tiny_config(), seed=0), adapters.LoRAConfig(**TARGETS), 4)
  assert adapters.count_parameters(moka)["per_partition"] == adapters.count_parameters(lora)["per_partition"]
  assert adapters.count_parameters(moka)["per_partition"]["adapter/common"] == 0
  assert not adapters.mergeable(moka.adapter) and adapters.mergeable(lora.adapter)
  with pytest.raises(ValueError, match="cannot be merged"):
    adapters.merge(moka)
  with pytest.raises(ValueError, match="pairs the vision and text"):
    moka_classifier(lam=0.5, towers=("vision",))
  with pytest.raises(RuntimeError, match="outside a classifier pass"):
    moka.backbone.get_image_features(inputs_with_a_missing_text()[0])

"""LoRA / DoRA / none and the shared machinery: init, merge, partitions, frozen backbone under training."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mora_jax import adapters, clip
from mora_jax.adapters import optim
from tests import helpers

METHODS = {
    "mora": adapters.MoRAConfig(targets=("q_proj", "v_proj"), start_layer=1, rank=3, alpha=0.5),
    "lora": adapters.LoRAConfig(targets=("q_proj", "k_proj", "fc1"), start_layer=0, rank=3, alpha=6.0),
    "dora": adapters.DoRAConfig(targets=("v_proj", "out_proj", "fc2"), start_layer=1, rank=3, alpha=6.0),
}


def classifier(method: str | None, seed: int = 0, num_classes: int = 4):
  return adapters.build_classifier(clip.init(helpers.tiny_config(), seed=seed), METHODS.get(method), num_classes)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_lora_and_dora_start_exactly_at_the_frozen_model(method):
  pixels, ids, mask = helpers.random_inputs(helpers.tiny_config())
  frozen = clip.init(helpers.tiny_config(), seed=0)
  adapted = classifier(method)
  expected = jnp.concatenate([frozen.get_image_features(pixels), frozen.get_text_features(ids, mask)], -1)
  np.testing.assert_array_equal(np.asarray(adapted.features(pixels, ids, mask)), np.asarray(expected))


@pytest.mark.parametrize("method", ["mora", "lora", "dora"])
def test_merged_logits_equal_unmerged(method):
  clf = classifier(method)
  helpers.perturb_trainables(clf)
  merged = adapters.merge(clf)
  pixels, ids, mask = helpers.random_inputs(clf.backbone.config)
  unmerged_logits = np.asarray(clf(pixels, ids, mask))
  np.testing.assert_allclose(np.asarray(merged(pixels, ids, mask)), unmerged_logits, atol=1e-5, rtol=0)
  assert type(merged.backbone) is clip.CLIP
  counts = adapters.count_parameters(merged)
  assert counts["trainable"] == counts["per_partition"]["head"]  # nothing but the head is left
  assert counts["backbone"] == adapters.count_parameters(classifier(None))["backbone"]
  # merge copies: the original keeps its adapters and its outputs.
  np.testing.assert_array_equal(np.asarray(clf(pixels, ids, mask)), unmerged_logits)


@pytest.mark.parametrize("method", ["mora", "lora", "dora"])
def test_merged_export_loads_in_transformers(method, tmp_path):
  torch = pytest.importorskip("torch", reason="checks the export in transformers.CLIPModel")
  transformers = pytest.importorskip("transformers")
  clf = classifier(method)
  helpers.perturb_trainables(clf)
  merged = adapters.merge(clf)
  out = clip.save_pretrained(merged.backbone, tmp_path / "merged")
  hf = transformers.CLIPModel.from_pretrained(out, attn_implementation="eager").eval()
  pixels, ids, mask = helpers.random_inputs(clf.backbone.config)
  with torch.no_grad():
    hf_image = hf.get_image_features(pixel_values=torch.tensor(pixels)).pooler_output.numpy()
    hf_text = hf.get_text_features(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).pooler_output.numpy()
  features = np.asarray(clf.features(pixels, ids, mask))
  np.testing.assert_allclose(np.concatenate([hf_image, hf_text], -1), features, atol=1e-4, rtol=0)


def test_partitions_and_counts():
  for method, expected in (("mora", {"adapter/common", "adapter/specific/vision", "adapter/specific/text"}),
                           ("lora", {"adapter/specific/vision", "adapter/specific/text"}),
                           (None, set())):
    counts = adapters.count_parameters(classifier(method))["per_partition"]
    assert {name for name, n in counts.items() if n and name not in ("backbone", "head")} == expected, method
  # lora, rank 3, q/k (32 -> 32) and fc1 (32 -> 64), both layers, both towers.
  lora = adapters.count_parameters(classifier("lora"))["per_partition"]
  assert lora["adapter/specific/text"] == 2 * (2 * (32 * 3 + 3 * 32) + (32 * 3 + 3 * 64))


def test_dropout_is_deterministic_without_rngs_and_random_with():
  clf = classifier("mora")
  pixels, ids, mask = helpers.random_inputs(clf.backbone.config)
  a, b = clf(pixels, ids, mask), clf(pixels, ids, mask)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  c = clf(pixels, ids, mask, rngs=nnx.Rngs(dropout=0))
  d = clf(pixels, ids, mask, rngs=nnx.Rngs(dropout=0))
  e = clf(pixels, ids, mask, rngs=nnx.Rngs(dropout=1))
  np.testing.assert_array_equal(np.asarray(c), np.asarray(d))
  assert np.abs(np.asarray(c) - np.asarray(a)).max() > 1e-4
  assert np.abs(np.asarray(c) - np.asarray(e)).max() > 1e-4


@pytest.mark.parametrize("method", ["mora", "lora", "dora", None])
def test_twenty_steps_train_adapters_and_leave_the_backbone_bitwise(method):
  clf = classifier(method)
  graphdef, params = adapters.split(clf)
  backbone_before = jax.tree.map(np.array, params["backbone"])
  trainable = adapters.trainable(params)
  trainable_before = jax.tree.map(np.array, trainable)
  tx = optim.adamw(1e-2, 0.02)
  opt_state = tx.init(trainable)
  n_trainable = adapters.count_parameters(clf)["trainable"]
  state_values = sum(np.size(x) for x in jax.tree.leaves(opt_state))
  assert n_trainable * 2 <= state_values <= n_trainable * 2 + 16  # two AdamW moments + step counters, nothing else

  rng = np.random.RandomState(0)
  pixels, ids, mask = helpers.random_inputs(clf.backbone.config, batch=8)
  labels = jnp.asarray(rng.randint(0, 4, 8))

  @jax.jit
  def step(trainable, opt_state, key):
    def loss_fn(trainable):
      model = adapters.join(graphdef, {"backbone": params["backbone"], **trainable})
      logits = model(pixels, ids, mask, rngs=nnx.Rngs(dropout=key))
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    loss, grads = jax.value_and_grad(loss_fn)(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss

  losses = []
  for i in range(20):
    trainable, opt_state, loss = step(trainable, opt_state, jax.random.key(i))
    losses.append(float(loss))
  assert losses[-1] < losses[0]
  for before, after in zip(jax.tree.leaves(backbone_before), jax.tree.leaves(params["backbone"]), strict=True):
    np.testing.assert_array_equal(before, np.asarray(after))
  changed = [not np.array_equal(b, np.asarray(a))
             for b, a in zip(jax.tree.leaves(trainable_before), jax.tree.leaves(trainable), strict=True)]
  assert all(changed)


def test_partition_multipliers_freeze_and_reject_unknown_names():
  clf = classifier("mora")
  _, params = adapters.split(clf)
  trainable = adapters.trainable(params)
  tx = optim.adamw(1e-2, 0.0, lr_mults={"adapter/common": 0.0})
  grads = jax.tree.map(jnp.ones_like, trainable)
  updates, _ = tx.update(grads, tx.init(trainable), trainable)
  assert all(float(jnp.abs(u).max()) == 0 for u in jax.tree.leaves(updates["adapter"]["common"]))
  assert all(float(jnp.abs(u).max()) > 0 for u in jax.tree.leaves(updates["head"]))
  with pytest.raises(ValueError, match="Unknown partitions \\['adapter/specific'\\]"):
    optim.adamw(1e-2, 0.0, wd_mults={"adapter/specific": 2.0})

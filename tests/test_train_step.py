"""The train step's loss and gradient: padding rows and gradient accumulation change neither."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mora_jax import adapters, clip
from mora_jax.data.inputs import Normalized
from mora_jax.train import step as step_lib
from tests import helpers

# Both comparisons sum the same per-row terms in another order (or with exact zeros added): float32 rounding
# of a mean over 16 rows, far below 1e-6.
TOLERANCE = 1e-6


def tiny_mora(multi_label: bool):
  """Tiny CLIP + MoRA (no dropout, so rows do not depend on the batch shape), trainables off their init."""
  cfg = adapters.MoRAConfig(targets=("q_proj", "v_proj"), start_layer=0, rank=2, alpha=0.5, dropout=0.0)
  clf = adapters.build_classifier(clip.init(helpers.tiny_config(), seed=0), cfg, num_classes=5,
                                  multi_label=multi_label)
  helpers.perturb_trainables(clf)
  graphdef, params = adapters.split(clf)
  return graphdef, {"backbone": params["backbone"]}, adapters.trainable(params)


def batch_of(rows: int, valid: int, multi_label: bool, seed: int = 0) -> dict:
  """`rows` rows of which the first `valid` are real; the others hold other random values (padding)."""
  halves = [helpers.random_inputs(helpers.tiny_config(), batch=rows // 2, length=16, seed=seed + k) for k in (0, 1)]
  pixels, ids, mask = (np.concatenate(parts) for parts in zip(*halves))
  rng = np.random.RandomState(seed + 1)
  label = rng.randint(0, 2, (rows, 5)) if multi_label else rng.randint(0, 5, rows)
  return {"inputs": Normalized(pixels, ids.astype(np.int32), mask.astype(np.int32), np.zeros(rows, np.int8)),
          "label": label, "valid": np.arange(rows) < valid}


def micro_batches(batch: dict, count: int) -> dict:
  return jax.tree.map(lambda v: np.asarray(v).reshape(count, -1, *np.shape(v)[1:]), batch)


def first_rows(batch: dict, rows: int) -> dict:
  return jax.tree.map(lambda v: v[:rows], batch)


def assert_same(a, b):
  (loss_a, grads_a, count_a), (loss_b, grads_b, count_b) = a, b
  assert float(count_a) == float(count_b)
  np.testing.assert_allclose(loss_a, loss_b, rtol=0, atol=TOLERANCE)
  for x, y in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b), strict=True):
    np.testing.assert_allclose(x, y, rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("multi_label", [False, True])
def test_a_padded_last_batch_gives_the_loss_and_gradient_of_its_real_rows(multi_label):
  graphdef, frozen, params = tiny_mora(multi_label)
  loss_and_grads = jax.jit(step_lib.make_loss_and_grads(graphdef, step_lib.classifier_loss(multi_label)))
  key = jax.random.PRNGKey(0)
  padded = batch_of(16, valid=11, multi_label=multi_label)
  real = first_rows(padded, 11)
  result = loss_and_grads(params, frozen, micro_batches(padded, 1), key)
  assert_same(result, loss_and_grads(params, frozen, micro_batches(real, 1), key))
  assert float(jnp.abs(jax.tree.leaves(result[1])[0]).sum()) > 0  # a gradient that can differ


def test_four_accumulated_micro_batches_give_the_whole_batch_loss_and_gradient():
  graphdef, frozen, params = tiny_mora(multi_label=False)
  loss_and_grads = jax.jit(step_lib.make_loss_and_grads(graphdef, step_lib.classifier_loss(False)))
  key = jax.random.PRNGKey(0)
  batch = batch_of(16, valid=13, multi_label=False)  # padding in the last micro-batch, as at an epoch's end
  assert_same(loss_and_grads(params, frozen, micro_batches(batch, 4), key),
              loss_and_grads(params, frozen, micro_batches(batch, 1), key))


def test_lr_schedule_warms_up_then_decays_to_zero():
  from mora_jax.train import step  # pylint: disable=import-outside-toplevel
  schedule = step.lr_schedule(1e-2, 100, 0.1)
  assert float(schedule(0)) == 0.0 and float(schedule(10)) == pytest.approx(1e-2)
  assert float(schedule(5)) == pytest.approx(5e-3) and float(schedule(55)) == pytest.approx(5e-3)
  assert float(schedule(100)) == pytest.approx(0.0, abs=1e-12)


def test_bfloat16_backbone_step_tracks_float32():
  """Mixed precision: a bfloat16 frozen backbone (adapters, head and AdamW in float32) gives the float32
  loss to bfloat16 rounding (2e-2 relative), and the trainable state stays float32."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from mora_jax import adapters, clip, sharding  # pylint: disable=import-outside-toplevel
  from mora_jax.adapters import optim  # pylint: disable=import-outside-toplevel
  from mora_jax.train import step as step_lib  # pylint: disable=import-outside-toplevel
  from tests.helpers import random_inputs, tiny_config  # pylint: disable=import-outside-toplevel
  cfg = tiny_config()
  pixels, ids, mask = random_inputs(cfg, batch=8, length=12)
  mesh = sharding.make_mesh((jax.device_count(), 1), ("data", "fsdp"))
  batch = {"inputs": Normalized(pixels[None], ids[None].astype(np.int32), mask[None].astype(np.int32),
                               np.zeros((1, 8), np.int8)),
           "label": np.arange(8, dtype=np.int32)[None] % 3, "valid": np.ones((1, 8), bool)}
  losses = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    clf = adapters.build_classifier(clip.init(cfg, seed=0, dtype=dtype), adapters.MoRAConfig(start_layer=1), 3)
    graphdef, params = adapters.split(clf)
    schedule = step_lib.lr_schedule(1e-2, 10, 0.1)
    tx = optim.adamw(schedule, 0.02)
    trainable = adapters.trainable(params)
    state = sharding.replicate({"params": trainable, "opt": tx.init(trainable), "step": jnp.int32(0),
                                "rng": jax.random.PRNGKey(0)}, mesh)
    train_step = step_lib.make_train_step(graphdef, tx, schedule, step_lib.classifier_loss(False), mesh, {
        "backbone": sharding.state_shardings(params["backbone"], mesh, sharding.REPLICATED_RULES)})
    global_batch = jax.device_put(batch, sharding.batch_sharding(mesh, micro_axis=True))
    state, metrics = train_step(state, {"backbone": params["backbone"]}, global_batch)
    losses[dtype] = float(metrics["loss"])
    assert {leaf.dtype for leaf in jax.tree.leaves(state["params"])} == {jnp.dtype(jnp.float32)}
  assert losses[jnp.bfloat16] == pytest.approx(losses[jnp.float32], rel=2e-2)


def test_every_input_form_reaches_the_classifier_with_the_same_logits():
  """One batch through the evaluation step in each form of mora_jax.data.inputs gives the same logits: decoded
  uint8 pixels (normalised on the devices into the float form: the reference), the fill step's activations (the
  towers' inputs at the start layer, and their final features), and row numbers into activations on the devices."""
  from mora_jax import sharding  # pylint: disable=import-outside-toplevel
  from mora_jax.data import inputs, pipeline, preprocess  # pylint: disable=import-outside-toplevel
  from mora_jax.train import prefix_cache  # pylint: disable=import-outside-toplevel
  graphdef, frozen, params = tiny_mora(multi_label=False)  # start layer 0: the prefix is the towers' embeddings
  mesh = sharding.make_mesh((1, 1), ("data", "fsdp"), devices=jax.devices()[:1])
  shardings = sharding.state_shardings(frozen["backbone"], mesh, sharding.REPLICATED_RULES)
  prep = pipeline.Preprocessing(image=preprocess.ImageProcessing.clip(32))
  _, ids, mask = helpers.random_inputs(helpers.tiny_config(), batch=4, length=16)
  pixels = np.random.RandomState(0).randint(0, 256, (4, 32, 32, 3)).astype(np.uint8)
  decoded = inputs.Decoded(pixels, ids.astype(np.int32), mask.astype(np.int32), np.zeros(4, np.int8))
  fill = lambda layer: prefix_cache.make_fill_step(graphdef, layer, mesh, shardings, prep)(
      params, frozen["backbone"], decoded)
  prefix = inputs.Prefix(**fill(0))
  # The rows reversed, then as they are: the vision rows come from the first half, the text rows from the second.
  cache = jax.tree.map(lambda x: jnp.concatenate([x[::-1], x]), prefix)
  rows = inputs.Rows(np.arange(3, -1, -1, dtype=np.int32), np.arange(4, 8, dtype=np.int32))
  eval_step = step_lib.make_eval_step(graphdef, mesh, shardings, prep)
  expected = np.asarray(eval_step(params, frozen["backbone"], decoded))
  for form in (prefix, inputs.Features(**fill(None))):
    np.testing.assert_allclose(eval_step(params, frozen["backbone"], form), expected, rtol=0, atol=1e-5)
  np.testing.assert_allclose(eval_step(params, frozen["backbone"], rows, cache), expected, rtol=0, atol=1e-5)

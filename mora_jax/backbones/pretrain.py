"""Contrastive pre-training of a whole CLIP: CLIP's symmetric InfoNCE with a learnable temperature, every
parameter trained, on the device mesh of fine-tuning (batch sharded over all devices, weights placed by
logical-axis rules, global batches assembled per process).

    model, epoch_losses = pretrain.train(model, source, tokenizer, prep, epochs=10, batch_size=128, lr=1e-3, seed=0)
    image_features, text_features = pretrain.features(model, images, input_ids, attention_mask)
    recall = pretrain.retrieval_recall_at_1(image_features, text_features, truth)

`source` is any pipeline source (records with "image" and "text"), e.g. image-caption pairs.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from mora_jax import console, sharding
from mora_jax.data import pipeline
from mora_jax.models.modeling import CLIP

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clamps the learned temperature at 100


def contrastive_loss(logits_per_image: jax.Array) -> jax.Array:
  """Mean of the image->text and text->image cross-entropies, matching pairs on the diagonal."""
  labels = jnp.arange(logits_per_image.shape[0])
  return 0.5 * (optax.softmax_cross_entropy_with_integer_labels(logits_per_image, labels).mean()
                + optax.softmax_cross_entropy_with_integer_labels(logits_per_image.T, labels).mean())


def _decay_mask(params):
  """Weight decay on matrices only (not on biases, LayerNorm scales, or the temperature)."""
  return jax.tree.map(lambda x: x.ndim >= 2, params)


def make_step(graphdef, tx, mesh, param_shardings, prep: pipeline.Preprocessing):
  replicated = NamedSharding(mesh, PartitionSpec())

  def step(params, opt_state, decoded):
    inputs = pipeline.normalize(decoded, prep)

    def loss_fn(params):
      logits_per_image, _ = nnx.merge(graphdef, params)(inputs.pixel_values, inputs.input_ids, inputs.attention_mask)
      return contrastive_loss(logits_per_image)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    params["logit_scale"].set_value(jnp.minimum(params["logit_scale"].get_value(), MAX_LOGIT_SCALE))
    return params, opt_state, loss

  return jax.jit(step, in_shardings=(param_shardings, replicated, sharding.batch_sharding(mesh, micro_axis=False)),
                 out_shardings=(param_shardings, replicated, replicated), donate_argnums=(0, 1))


def train(model: CLIP, source, tokenizer, prep: pipeline.Preprocessing, *, epochs: int, batch_size: int,
          lr: float, seed: int, weight_decay: float = 0.1, warmup_fraction: float = 0.1, mesh=None,
          rules=sharding.REPLICATED_RULES, num_threads: int = 2) -> tuple[CLIP, list[float]]:
  """Trains every parameter of `model` on (image, text) pairs; returns the model and per-epoch mean losses.

  Deterministic given `seed` (shuffling) and the initial model. `batch_size` is global.
  """
  mesh = mesh or sharding.make_mesh((jax.device_count(),), ("data",))
  sharding.shard_module(model, mesh, rules)
  graphdef, params = nnx.split(model)
  steps_per_epoch = len(source) // batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"{len(source)} pairs are fewer than one batch of {batch_size}.")
  total = steps_per_epoch * epochs
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, int(total * warmup_fraction), total, 0.0)
  tx = optax.adamw(schedule, b1=0.9, b2=0.98, eps=1e-6, weight_decay=weight_decay, mask=_decay_mask)
  opt_state = sharding.replicate(tx.init(params), mesh)
  step = make_step(graphdef, tx, mesh, sharding.state_shardings(params, mesh, rules), prep)
  per_process, count = batch_size // jax.process_count(), jax.process_count()
  table = np.zeros(len(source), np.int8)  # every pair complete
  batches = iter(pipeline.batches(source, table, tokenizer, per_process, train=True, seed=seed, prep=prep,
                                  process_index=jax.process_index(), process_count=count,
                                  num_threads=num_threads, source_name="pretraining pairs"))
  target = sharding.batch_sharding(mesh, micro_axis=False)
  losses = []
  for epoch in range(epochs):
    step_losses = []  # device scalars, read once per epoch: no host sync inside the step loop
    for _ in console.bar(range(steps_per_epoch), desc=f"pre-training epoch {epoch + 1}/{epochs}", unit="step"):
      batch = sharding.global_arrays(next(batches)["inputs"], target, False)
      params, opt_state, loss = step(params, opt_state, batch)
      step_losses.append(loss)
    losses.append(float(np.mean([np.asarray(loss.addressable_data(0)) for loss in step_losses])))
    if sharding.is_main_process():
      tqdm.write(f"pre-training epoch {epoch + 1}/{epochs}: mean contrastive loss {losses[-1]:.4f}")
  return nnx.merge(graphdef, params), losses


def features(model: CLIP, images: np.ndarray, input_ids: np.ndarray, attention_mask: np.ndarray,
             batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
  """L2-normalised image and text features (host numpy), in batches."""
  graphdef, state = nnx.split(model)
  image_fn = jax.jit(lambda s, x: nnx.merge(graphdef, s).get_image_features(x))
  text_fn = jax.jit(lambda s, i, m: nnx.merge(graphdef, s).get_text_features(i, m))
  image = np.concatenate([sharding.host_numpy(image_fn(state, images[i:i + batch_size]))
                          for i in range(0, len(images), batch_size)])
  text = np.concatenate([
      sharding.host_numpy(text_fn(state, input_ids[i:i + batch_size], attention_mask[i:i + batch_size]))
      for i in range(0, len(input_ids), batch_size)])
  return (image / np.linalg.norm(image, axis=-1, keepdims=True),
          text / np.linalg.norm(text, axis=-1, keepdims=True))


def retrieval_recall_at_1(image_features: np.ndarray, caption_features: np.ndarray,
                          true_caption: np.ndarray) -> float:
  """Fraction of images whose most similar caption (among all distinct captions) is their own."""
  return float(np.mean(np.argmax(image_features @ caption_features.T, axis=1) == true_caption))

"""The jitted train and evaluation steps over a device mesh.

The train state is {"params": trainable partitions, "opt": optimizer state, "step": int32, "rng": PRNG key};
the frozen backbone is a separate argument, never differentiated, never updated, never checkpointed.
Batches are global arrays sharded along their batch dimension over every mesh axis; the train batch has a
leading micro-batch axis (gradient accumulation).
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mora_jax import adapters, sharding
from mora_jax.adapters import classifier
from mora_jax.data import pipeline
from mora_jax.train import prefix_cache

TARGET_KEYS = ("label", "valid")


def input_keys(batch: dict) -> tuple[str, ...]:
  """The keys of a host batch that go to the devices as model inputs: decoded records' (pipeline.MODEL_INPUTS:
  uint8 pixels, tokens and each sample's missing code), or cached activations' (classifier.PREFIX_INPUTS /
  FEATURE_INPUTS; mora_jax.train.prefix_cache), or the row numbers of a prefix cache on the devices (ROW_INPUTS)."""
  for keys in (pipeline.MODEL_INPUTS, classifier.PREFIX_INPUTS, classifier.FEATURE_INPUTS, prefix_cache.ROW_INPUTS):
    if keys[0] in batch:
      return keys
  raise KeyError(f"a batch with keys {sorted(batch)} holds no model inputs.")


DECAYS = ("cosine", "linear")


def lr_schedule(peak: float, total_steps: int, warmup_fraction: float, decay: str = "cosine") -> optax.Schedule:
  """Linear warm-up from 0 over the first `warmup_fraction` of the steps, then `decay` to 0: "cosine" (MoRA's
  recipe) or "linear" (the DCP code's polynomial decay of power 1)."""
  warmup, total = int(total_steps * warmup_fraction), max(total_steps, 1)
  if decay == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, total, end_value=0.0)
  if decay == "linear":
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup),
                                 optax.linear_schedule(peak, 0.0, max(total - warmup, 1))], [warmup])
  raise ValueError(f"config.optim.decay={decay!r}: use one of {DECAYS}.")


def per_sample_loss(logits: jax.Array, labels: jax.Array, multi_label: bool) -> jax.Array:
  """Softmax cross-entropy (single-label) or sigmoid BCE averaged over classes (multi-label), per sample."""
  if multi_label:
    return optax.sigmoid_binary_cross_entropy(logits, labels.astype(logits.dtype)).mean(axis=-1)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def model_inputs(batch: dict, prep: pipeline.Preprocessing | None) -> dict:
  """`pipeline.model_inputs` (uint8 pixels normalised on the devices) when the batch holds pixels."""
  if "pixels" in batch and prep is None:
    raise ValueError("a batch of uint8 pixels needs the run's preprocessing (prep=job.prep) to normalise them.")
  return pipeline.model_inputs(batch, prep) if prep is not None else batch


def make_loss_and_grads(graphdef: nnx.GraphDef, multi_label: bool,
                        prep: pipeline.Preprocessing | None = None) -> Callable:
  """(params, backbone, batch, key) -> (loss, gradients w.r.t. params) of a step's batch, whose arrays have a
  leading micro-batch axis.

  The loss is the mean over the valid rows of all micro-batches together: accumulation gives the gradient of
  the whole batch, and padding rows (an epoch's smaller last step) count for nothing. Micro-batch i's dropout
  key is fold_in(key, i). `prep`: the preprocessing that normalises uint8 pixels (batches of float pixel_values or
  cached activations need none).
  """

  def summed_loss(params, backbone, micro, key):
    model = adapters.join(graphdef, {"backbone": backbone, **params})
    logits = model.logits(model_inputs(micro, prep), rngs=nnx.Rngs(dropout=key))
    weight = micro["valid"].astype(jnp.float32)
    return jnp.sum(per_sample_loss(logits.astype(jnp.float32), micro["label"], multi_label) * weight)

  def loss_and_grads(params, backbone, batch, key):

    def accumulate(carry, inputs):
      grad_sum, loss_sum = carry
      micro, index = inputs
      loss, grads = jax.value_and_grad(summed_loss)(params, backbone, micro, jax.random.fold_in(key, index))
      return (jax.tree.map(jnp.add, grad_sum, grads), loss_sum + loss), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    micro_steps = batch["valid"].shape[0]
    (grad_sum, loss_sum), _ = jax.lax.scan(accumulate, (zeros, jnp.float32(0)), (batch, jnp.arange(micro_steps)))
    count = jnp.maximum(jnp.sum(batch["valid"]), 1).astype(jnp.float32)
    return loss_sum / count, jax.tree.map(lambda g: g / count, grad_sum)

  return loss_and_grads


def train_step_fn(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, schedule: optax.Schedule,
                  multi_label: bool, prep: pipeline.Preprocessing | None = None) -> Callable:
  """The unjitted (state, backbone, batch) -> (state, metrics) of `make_train_step`."""
  loss_and_grads = make_loss_and_grads(graphdef, multi_label, prep)

  def step(state, backbone, batch):
    key = jax.random.fold_in(state["rng"], state["step"])
    loss, grads = loss_and_grads(state["params"], backbone, batch, key)
    updates, opt = tx.update(grads, state["opt"], state["params"])
    new_state = {"params": optax.apply_updates(state["params"], updates), "opt": opt, "step": state["step"] + 1,
                 "rng": state["rng"]}
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": schedule(state["step"]),
               "valid": jnp.sum(batch["valid"])}
    return new_state, metrics

  return step


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    multi_label: bool, mesh: Mesh, backbone_shardings,
                    prep: pipeline.Preprocessing | None = None) -> Callable:
  """(state, backbone, batch) -> (state, metrics); `state` is donated. The loss is `make_loss_and_grads`'s.
  Dropout keys derive from (rng, step, micro-batch): with jax's partitionable threefry the masks do not depend
  on how the batch is split over devices/hosts."""
  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.jit(train_step_fn(graphdef, tx, schedule, multi_label, prep),
                 in_shardings=(replicated, backbone_shardings, sharding.batch_sharding(mesh, True)),
                 out_shardings=(replicated, replicated), donate_argnums=(0,))


def make_train_step_on_leaves(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, schedule: optax.Schedule,
                              multi_label: bool, mesh: Mesh, backbone_shardings, prep: pipeline.Preprocessing | None,
                              state_treedef, backbone_treedef) -> Callable:
  """`make_train_step` over the flat leaf lists of the state and the backbone, reading a prefix cache that lives
  on the devices: (state leaves, backbone leaves, device cache arrays ({} for none), batch) -> (state leaves,
  metrics). A call then flattens plain lists; flattening their nnx Variables in Python instead costs ~20 us
  each, ~30 ms per step for the embedded CLIP's train state and backbone (bench/feed.py --loop), during which an
  accelerator waited."""
  step = train_step_fn(graphdef, tx, schedule, multi_label, prep)

  def on_leaves(state_leaves, backbone_leaves, cache_arrays, batch):
    state, metrics = step(jax.tree.unflatten(state_treedef, state_leaves),
                          jax.tree.unflatten(backbone_treedef, backbone_leaves),
                          prefix_cache.gather(batch, cache_arrays))
    return jax.tree.leaves(state), metrics

  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.jit(on_leaves, in_shardings=(replicated, jax.tree.leaves(backbone_shardings), replicated,
                                          sharding.batch_sharding(mesh, True)),
                 out_shardings=(replicated, replicated), donate_argnums=(0,))


def make_eval_step(graphdef: nnx.GraphDef, mesh: Mesh, backbone_shardings,
                   prep: pipeline.Preprocessing | None = None) -> Callable:
  """(params, backbone, model inputs, device cache arrays = {}) -> float32 logits, sharded like the batch: each
  process reads the rows of its own samples (sharding.process_rows), whose labels never left the host. Inputs in
  any form `Classifier.logits` reads, or row numbers of a prefix cache on the devices (prefix_cache.gather)."""
  replicated = NamedSharding(mesh, PartitionSpec())
  rows = sharding.batch_sharding(mesh, False)

  def step(params, backbone, batch, cache_arrays):
    model = adapters.join(graphdef, {"backbone": backbone, **params})
    return model.logits(model_inputs(prefix_cache.gather(batch, cache_arrays), prep)).astype(jnp.float32)

  jitted = jax.jit(step, in_shardings=(replicated, backbone_shardings, rows, replicated), out_shardings=rows)
  return lambda params, backbone, batch, cache_arrays=None: jitted(params, backbone, batch, cache_arrays or {})

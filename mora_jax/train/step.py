"""The jitted train and evaluation steps over a device mesh.

The train state is {"params": the trained partitions, "opt": optimizer state, "step": int32, "rng": PRNG key};
the frozen partitions (the backbone, and what a stage does not train) are a separate argument, never
differentiated, never updated, never checkpointed.
Batches are global arrays sharded along their batch dimension over every mesh axis; the train batch has a
leading micro-batch axis (gradient accumulation). A classifier's train batch is {"inputs": one of the forms of
mora_jax.data.inputs, "label", "valid"}; its evaluation step takes the inputs alone.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mora_jax import adapters, sharding
from mora_jax.adapters import partition
from mora_jax.data import inputs, pipeline
from mora_jax.train import prefix_cache

TARGET_KEYS = ("label", "valid")  # what goes to the devices beside a train batch's inputs


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


def model_inputs(batch_inputs, prep: pipeline.Preprocessing | None):
  """The inputs `Classifier.logits` reads: decoded uint8 pixels normalised on the devices (pipeline.normalize),
  the other forms as they are."""
  if not isinstance(batch_inputs, inputs.Decoded):
    return batch_inputs
  if prep is None:
    raise ValueError("a batch of uint8 pixels needs the run's preprocessing (prep=job.prep) to normalise them.")
  return pipeline.normalize(batch_inputs, prep)


# A task's loss on one micro-batch: (model, micro-batch, rngs) -> (the sum of its per-item losses, their count).
# The step divides the sums over all micro-batches by the counts' sum, so padding counts for nothing and
# accumulation gives the whole batch's mean.
LossFn = Callable[[nnx.Module, object, nnx.Rngs], tuple[jax.Array, jax.Array]]


def classifier_loss(multi_label: bool, prep: pipeline.Preprocessing | None = None) -> LossFn:
  """The classifier's summed loss over a micro-batch's valid rows (per_sample_loss), counting those rows. `prep`:
  the preprocessing that normalises uint8 pixels (batches of float pixel_values or cached activations need none)."""

  def loss(model, micro, rngs):
    logits = model.logits(model_inputs(micro["inputs"], prep), rngs=rngs)
    weight = micro["valid"].astype(jnp.float32)
    return jnp.sum(per_sample_loss(logits.astype(jnp.float32), micro["label"], multi_label) * weight), jnp.sum(weight)

  return loss


def make_loss_and_grads(graphdef: nnx.GraphDef, loss: LossFn, mean_loss: bool = False) -> Callable:
  """(params, frozen, batch, key) -> (loss, gradients w.r.t. params, count) of a step's batch, whose arrays have a
  leading micro-batch axis; `frozen` holds the partitions that are not trained (the backbone at least).

  The loss is the sum of `loss`'s sums over all micro-batches divided by the sum of their counts: accumulation
  gives the gradient of the whole batch, and padding rows (an epoch's smaller last step) count for nothing.
  Micro-batch i's dropout key is fold_in(key, i).
  `mean_loss`: `loss` returns a micro-batch's mean instead of its sum. A step of one micro-batch then differentiates
  that mean as it is, with `key` itself for dropout: the multimodal LLM's original step, whose runs this keeps bit
  for bit (mora_jax.train.answering); accumulation weighs the means by their counts (the same value, rounded
  otherwise).
  """

  def micro_loss(params, frozen, micro, key):
    return loss(adapters.join(graphdef, partition.combine(frozen, params)), micro, nnx.Rngs(dropout=key))

  def loss_and_grads(params, frozen, batch, key):
    micro_steps = jax.tree.leaves(batch)[0].shape[0]
    if mean_loss and micro_steps == 1:
      micro = jax.tree.map(lambda x: x[0], batch)
      (value, count), grads = jax.value_and_grad(micro_loss, has_aux=True)(params, frozen, micro, key)
      return value, grads, count

    def accumulate(carry, scanned):
      grad_sum, loss_sum, count_sum = carry
      micro, index = scanned
      (value, count), grads = jax.value_and_grad(micro_loss, has_aux=True)(
          params, frozen, micro, jax.random.fold_in(key, index))
      if mean_loss:
        value, grads = value * count, jax.tree.map(lambda g: g * count, grads)
      return (jax.tree.map(jnp.add, grad_sum, grads), loss_sum + value, count_sum + count), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    (grad_sum, loss_sum, count_sum), _ = jax.lax.scan(
        accumulate, (zeros, jnp.float32(0), jnp.float32(0)), (batch, jnp.arange(micro_steps)))
    count = jnp.maximum(count_sum, 1.0)
    return loss_sum / count, jax.tree.map(lambda g: g / count, grad_sum), count_sum

  return loss_and_grads


def train_step_fn(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, schedule: optax.Schedule,
                  loss: LossFn, mean_loss: bool = False) -> Callable:
  """The unjitted (state, frozen, batch) -> (state, metrics) of `make_train_step`."""
  loss_and_grads = make_loss_and_grads(graphdef, loss, mean_loss)

  def step(state, frozen, batch):
    key = jax.random.fold_in(state["rng"], state["step"])
    value, grads, count = loss_and_grads(state["params"], frozen, batch, key)
    updates, opt = tx.update(grads, state["opt"], state["params"])
    new_state = {"params": optax.apply_updates(state["params"], updates), "opt": opt, "step": state["step"] + 1,
                 "rng": state["rng"]}
    metrics = {"loss": value, "grad_norm": optax.tree.norm(grads), "lr": schedule(state["step"]), "count": count}
    return new_state, metrics

  return step


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    loss: LossFn, mesh: Mesh, frozen_shardings) -> Callable:
  """(state, frozen, batch) -> (state, metrics); `state` is donated; `frozen` is the partitioned tree of what is
  not trained ({"backbone": ...} for a classifier), placed by `frozen_shardings`. The loss is
  `make_loss_and_grads`'s. Dropout keys derive from (rng, step, micro-batch): with jax's partitionable threefry
  the masks do not depend on how the batch is split over devices/hosts."""
  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.jit(train_step_fn(graphdef, tx, schedule, loss),
                 in_shardings=(replicated, frozen_shardings, sharding.batch_sharding(mesh, True)),
                 out_shardings=(replicated, replicated), donate_argnums=(0,))


def make_train_step_on_leaves(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, schedule: optax.Schedule,
                              loss: LossFn, mesh: Mesh, frozen_shardings, state_treedef, frozen_treedef,
                              expand=lambda batch, cache_arrays: batch, mean_loss: bool = False) -> Callable:
  """`make_train_step` over the flat leaf lists of the state and the frozen partitions: (state leaves, frozen
  leaves, device arrays the batch refers to ({} for none), batch) -> (state leaves, metrics). `expand(batch,
  device arrays)` completes the batch on the devices (a prefix cache's rows: prefix_cache.gather). A call then
  flattens plain lists; flattening their nnx Variables in Python instead costs ~20 us each, ~30 ms per step for
  the embedded CLIP's train state and backbone (bench/feed.py --loop), during which an accelerator waited."""
  step = train_step_fn(graphdef, tx, schedule, loss, mean_loss)

  def on_leaves(state_leaves, frozen_leaves, device_arrays, batch):
    state, metrics = step(jax.tree.unflatten(state_treedef, state_leaves),
                          jax.tree.unflatten(frozen_treedef, frozen_leaves), expand(batch, device_arrays))
    return jax.tree.leaves(state), metrics

  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.jit(on_leaves, in_shardings=(replicated, jax.tree.leaves(frozen_shardings), replicated,
                                          sharding.batch_sharding(mesh, True)),
                 out_shardings=(replicated, replicated), donate_argnums=(0,))


def make_eval_step(graphdef: nnx.GraphDef, mesh: Mesh, backbone_shardings,
                   prep: pipeline.Preprocessing | None = None) -> Callable:
  """(params, backbone, model inputs, device cache arrays = {}) -> float32 logits, sharded like the batch: each
  process reads the rows of its own samples (sharding.process_rows), whose labels never left the host. Inputs in
  any form of mora_jax.data.inputs: decoded (with `prep`), normalised, cached activations, or row numbers of the
  prefix cache on the devices, `cache_arrays` (prefix_cache.gather)."""
  replicated = NamedSharding(mesh, PartitionSpec())
  rows = sharding.batch_sharding(mesh, False)

  def step(params, backbone, batch_inputs, cache_arrays):
    model = adapters.join(graphdef, {"backbone": backbone, **params})
    return model.logits(model_inputs(prefix_cache.gather(batch_inputs, cache_arrays), prep)).astype(jnp.float32)

  jitted = jax.jit(step, in_shardings=(replicated, backbone_shardings, rows, replicated), out_shardings=rows)
  return lambda params, backbone, batch, cache_arrays=None: jitted(params, backbone, batch, cache_arrays or {})

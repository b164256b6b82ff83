"""The MoRA classifier: adapted (or prompted) CLIP towers -> concat(image feature, text feature) -> a head
(docs/method.md's linear head, or an optional small MLP)."""

import jax
import jax.numpy as jnp
from flax import nnx

from mora_jax.adapters import common, partition
from mora_jax.adapters.method import Attached, Method
from mora_jax.data import missing as missing_lib
from mora_jax.data.inputs import Features, Normalized, Prefix
from mora_jax.models.modeling import CLIP, Call

HEADS = ("linear", "mlp")


class HeadLinear(nnx.Module):
  """Weights N(0, 0.02) (the authors' re-initialisation); bias U(+-1/sqrt(in)), PyTorch's Linear default."""

  def __init__(self, d_in: int, num_classes: int, *, rngs: nnx.Rngs):
    self.kernel = partition.Head(0.02 * jax.random.normal(rngs.params(), (d_in, num_classes), jnp.float32))
    bound = d_in**-0.5
    self.bias = partition.Head(jax.random.uniform(rngs.params(), (num_classes,), jnp.float32, -bound, bound))

  def __call__(self, x: jax.Array) -> jax.Array:
    return x.astype(jnp.float32) @ self.kernel[...] + self.bias[...]


class HeadMLP(nnx.Module):
  """logits = output(gelu(hidden(x))): unlike the linear head it can combine the two towers' features
  multiplicatively (a question's meaning with the image's content), still without touching the towers."""

  def __init__(self, d_in: int, hidden: int, num_classes: int, *, rngs: nnx.Rngs):
    self.hidden = HeadLinear(d_in, hidden, rngs=rngs)
    self.output = HeadLinear(hidden, num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.output(jax.nn.gelu(self.hidden(x), approximate=False))


class Classifier(nnx.Module):
  """logits = head(concat(image_features, text_features)); features are not L2-normalised (docs/method.md).

  The method attaches to the backbone (`Method.attach`): a projection adapter replaces projections, and keeps
  the modules they share in `adapter_common` (MoRA's common pairs); a prompt method (MMP, DCP) adds `prompts`, the
  module that makes each sample's prompt tokens from its missing code, and may zero the missing modality's
  feature. The projection adapters ignore the missing codes.
  """
  partitions = partition.CLASSIFIER

  def __init__(self, backbone: CLIP, adapter: Method | None, num_classes: int, multi_label: bool,
               *, head: str = "linear", head_hidden: int = 256, rngs: nnx.Rngs):
    self.adapter = adapter
    self.num_classes, self.multi_label = num_classes, multi_label
    self.backbone = backbone
    attached = Attached(nnx.Dict(), prompts=None) if adapter is None else adapter.attach(backbone, rngs=rngs)
    self.adapter_common = attached.shared
    self.prompts = nnx.data(attached.prompts)
    d_features = 2 * backbone.config.projection_dim
    if head not in HEADS:
      raise ValueError(f"head={head!r}: use one of {HEADS}.")
    self.head = (HeadLinear(d_features, num_classes, rngs=rngs) if head == "linear"
                 else HeadMLP(d_features, head_hidden, num_classes, rngs=rngs))

  def features(self, pixel_values: jax.Array, input_ids: jax.Array, attention_mask: jax.Array | None = None,
               rngs: nnx.Rngs | None = None, missing: jax.Array | None = None) -> jax.Array:
    text_mask = jnp.ones(input_ids.shape, jnp.int32) if attention_mask is None else attention_mask
    call = Call(rngs=rngs, text_mask=text_mask)
    vision_prompts = text_prompts = None
    if self.prompts is not None:
      if missing is None:
        raise ValueError(f"adapter method {self.adapter.name!r} picks its prompts by each sample's missing code: "
                         "pass missing=[B] ints (0 complete, 1 text missing, 2 image missing), the batch's "
                         "'missing' entry.")
      vision_prompts, text_prompts = self.prompts(missing)
    image, text = self._towers(lambda: self.backbone.get_image_features(pixel_values, call, vision_prompts),
                               lambda: self.backbone.get_text_features(input_ids, attention_mask, call, text_prompts))
    if self.prompts is not None and self.adapter.zeroes():
      image = jnp.where((missing == missing_lib.IMAGE_MISSING)[:, None], 0.0, image)
      text = jnp.where((missing == missing_lib.TEXT_MISSING)[:, None], 0.0, text)
    return jnp.concatenate([image, text], axis=-1)

  def features_from_layer(self, layer: int, prefix: Prefix, rngs: nnx.Rngs | None = None) -> jax.Array:
    """`features` continued from the input of layer `layer` of both towers: `prefix` holds the frozen layers'
    output computed beforehand (mora_jax.train.prefix_cache)."""
    call = Call(rngs=rngs, text_mask=prefix.text_mask)
    image, text = self._towers(
        lambda: self.backbone.image_features_from(prefix.vision_hidden, layer, call),
        lambda: self.backbone.text_features_from(prefix.text_hidden, layer, prefix.text_pool, prefix.text_mask, call))
    return jnp.concatenate([image, text], axis=-1)

  def _towers(self, image_features, text_features) -> tuple[jax.Array, jax.Array]:
    # The order sets which tower's dropout draws come first, and lets MokA hand text rows to the vision tower.
    if self.adapter is not None and self.adapter.text_first:
      text = text_features()
      return image_features(), text
    image = image_features()
    return image, text_features()

  def __call__(self, pixel_values: jax.Array, input_ids: jax.Array, attention_mask: jax.Array | None = None,
               rngs: nnx.Rngs | None = None, missing: jax.Array | None = None) -> jax.Array:
    """Logits [B, num_classes]; deterministic unless `rngs` (with a `dropout` stream) is given. `missing` [B]:
    each sample's missing code, which the prompt methods need (and the others ignore)."""
    return self.head(self.features(pixel_values, input_ids, attention_mask, rngs, missing))

  def logits(self, batch: Normalized | Prefix | Features, rngs: nnx.Rngs | None = None) -> jax.Array:
    """Logits of a batch in any of the forms the steps feed (mora_jax.data.inputs): the whole towers' inputs, the
    towers' inputs at their first adapted layer, or the towers' final features (frozen towers: the linear probe)."""
    match batch:
      case Normalized():
        return self(batch.pixel_values, batch.input_ids, batch.attention_mask, rngs, batch.missing)
      case Prefix():
        return self.head(self.features_from_layer(self.adapter.start_layer, batch, rngs))
      case Features():
        return self.head(jnp.concatenate([batch.vision_features, batch.text_features], axis=-1))
    raise TypeError(f"the classifier reads Normalized, Prefix or Features inputs, not {type(batch).__name__}: "
                    "normalise decoded pixels first (pipeline.normalize), gather a device cache's rows "
                    "(prefix_cache.gather).")


def build_classifier(backbone: CLIP, adapter: Method | None, num_classes: int,
                     multi_label: bool = False, seed: int = 0, head: str = "linear",
                     head_hidden: int = 256) -> Classifier:
  """Wraps `backbone` (modified in place: its target projections become adapted ones) in a classifier.

  adapter: a method's config (method.Method: MoRAConfig, LoRAConfig, DoRAConfig, MokAConfig, MMPConfig,
    DCPConfig; see adapters.registry), or None for frozen towers + head (the linear probe).
  head: "linear" (docs/method.md) or "mlp" (one GELU hidden layer of `head_hidden` units).
  """
  return Classifier(backbone, adapter, num_classes, multi_label, head=head, head_hidden=head_hidden,
                    rngs=nnx.Rngs(params=seed))


def mergeable(adapter: Method | None) -> bool:
  """Whether the adapted towers fold into plain CLIP weights (not MokA: its cross term depends on the input)."""
  return adapter is None or adapter.mergeable


def merge(clf: Classifier) -> Classifier:
  """A copy of `clf` whose towers are plain CLIP weights with every adapter folded in."""
  if not mergeable(clf.adapter):
    raise ValueError(f"{clf.adapter.name} cannot be merged into the backbone: its update depends on the input "
                     "(MokA: the text rows; MMP, DCP: extra prompt tokens). Evaluate the unmerged classifier.")
  merged = nnx.clone(clf)
  # A mergeable method is a projection adapter: each adapted projection folds into the `base` it wraps.
  for target in () if clf.adapter is None else common.targets(merged.backbone, clf.adapter):
    adapted = getattr(target.parent, target.name)
    base = adapted.base
    base.kernel.set_value(adapted.effective_kernel().astype(base.kernel.dtype))
    setattr(target.parent, target.name, base)
  merged.adapter_common = nnx.Dict()
  merged.adapter = None
  return merged


def count_parameters(clf: Classifier) -> dict:
  """{'backbone': N, 'trainable': M, 'per_partition': {partition name: count}} (counts of scalar values)."""
  _, params = partition.split(clf)
  per = partition.count(params)
  return {"backbone": per["backbone"], "trainable": sum(n for name, n in per.items() if name != "backbone"),
          "per_partition": per}

"""The prompting baselines MoRA is compared with: MMP (missing-aware prompts on CLIP) and DCP (deep correlated
prompts), docs/prompts.md.

Both keep the towers frozen and feed them extra tokens per layer, chosen by each sample's missing case (0
complete, 1 text missing, 2 image missing; mora_jax.data.missing). Everything is batched: a method computes its
prompts for the three cases from its parameters (DCP's correlated chain once per case per step, not per
sample), picks each sample's with one gather on the missing code, and runs DCP's dynamic-prompt attention for
the whole batch at once. The towers place the tokens (mora_jax.models.modeling.Encoder): layer 0's in front of
the sequence, a later layer's over the first positions, carried as ordinary tokens after the last prompted
layer.

Unlike the projection adapters (mora_jax.adapters.common.AdapterConfig) a prompt method adapts no projection:
its config says how long and how deep the prompts are, and its `attach` (the method.Method contract) checks the
backbone, marks the backbone parts it trains and `build`s the module that computes the prompts. The prompts
change layer 0 onwards, so no frozen prefix of layers is shared with plain CLIP (`start_layer` is 0).
"""

import dataclasses
from collections.abc import Callable
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mora_jax.adapters import partition
from mora_jax.adapters.method import Attached
from mora_jax.data import missing as missing_lib
from mora_jax.models.config import CLIPConfig
from mora_jax.models.modeling import CLIP, LayerNorm, Prompter

CASES = 3  # missing cases, indexed by the missing code
# Backbone parts a prompt method may train, by Hugging Face name -> the module holding them.
BACKBONE_PARTS: dict[str, Callable[[CLIP], nnx.Module]] = {
    "post_layernorm": lambda m: m.vision_model.post_layernorm,
    "final_layer_norm": lambda m: m.text_model.final_layer_norm,
    "visual_projection": lambda m: m.visual_projection,
    "text_projection": lambda m: m.text_projection,
}


@dataclasses.dataclass(frozen=True)
class PromptConfig:
  """What MMP and DCP share: prompt `length` (tokens per layer) and `depth` (prompted layers, from layer 0),
  whether the missing modality's half of the feature is zeroed before the head (`zero_missing_features`, as
  DCP's code does), and which backbone parts are trained besides the prompts and head (`trained_backbone`,
  DCP's code: both final LayerNorms and the vision projection)."""
  name: ClassVar[str]
  mergeable: ClassVar[bool] = False  # the prompts are extra tokens: nothing folds into the weights
  text_first: ClassVar[bool] = False
  start_layer: ClassVar[int] = 0  # prompts enter at layer 0: no frozen prefix of layers to reuse or cache
  frozen_prefix: ClassVar[bool] = False  # so no prefix-activation cache applies (main's prefix cache)
  separable: ClassVar[bool] = False  # each tower's prompts depend on the sample's missing case, i.e. on the other
  # tower's input being present, so a tower's features cannot be computed once for all missing scenarios
  length: int = 36
  depth: int = 6
  zero_missing_features: bool = True
  trained_backbone: tuple[str, ...] = ("post_layernorm", "final_layer_norm", "visual_projection")

  def __post_init__(self):
    object.__setattr__(self, "trained_backbone", tuple(self.trained_backbone))
    unknown = sorted(set(self.trained_backbone) - set(BACKBONE_PARTS))
    if unknown:
      raise ValueError(f"trained_backbone has unknown part(s) {unknown}; use a subset of {sorted(BACKBONE_PARTS)}.")
    if self.length < 1 or self.depth < 1:
      raise ValueError(f"length={self.length} and depth={self.depth} must be >= 1.")

  def attach(self, model: CLIP, *, rngs: nnx.Rngs) -> Attached:
    """Checks the backbone, marks the backbone parts it trains (partition `backbone_trained`) in place, and makes
    the prompt module."""
    if not isinstance(model, CLIP):
      raise ValueError(f"prompt method {self.name!r} prompts a CLIP model's towers, not a {type(model).__name__}.")
    self.check(model.config)
    mark_trained_backbone(model, self)
    return Attached(nnx.Dict(), self.build(model.config, rngs=rngs))

  def check(self, model: CLIPConfig) -> None:
    layers = min(model.vision.num_hidden_layers, model.text.num_hidden_layers)
    if self.depth > layers:
      raise ValueError(f"{self.name}: depth={self.depth} but the backbone has {layers} layers per tower; set "
                       f"adapter.depth <= {layers}.")

  def zeroes(self) -> bool:
    """Whether the head sees zeros for the missing modality's feature."""
    return self.zero_missing_features

  def build(self, model: CLIPConfig, *, rngs: nnx.Rngs) -> nnx.Module:
    """The module whose `__call__(missing [B] int)` returns (vision Prompter, text Prompter)."""
    raise NotImplementedError(f"{type(self).__name__} does not say how to build its prompts.")


def mark_trained_backbone(model: CLIP, cfg: PromptConfig) -> None:
  """Re-types the backbone parts `cfg` trains (partition `backbone_trained`), in place."""
  for part in cfg.trained_backbone:
    partition.retype(BACKBONE_PARTS[part](model), partition.BackboneTrained)


def parameter_parts(clf) -> dict[str, int]:
  """Parameter counts of a prompt-method classifier (adapters.Classifier) by part: its prompt module's parts
  (`PARTS`, trained), the backbone parts it trains, the head, and the fixed (frozen) values it adds, if any."""
  module = clf.prompts
  size = lambda leaves: sum(int(np.prod(np.shape(x))) for x in leaves)
  by_attribute: dict[str, int] = {}
  for path, value in nnx.to_flat_state(nnx.state(module, partition.Prompt)):
    by_attribute[path[0]] = by_attribute.get(path[0], 0) + size([value])
  counts = {part: sum(by_attribute.pop(a, 0) for a in attributes) for part, attributes in module.PARTS.items()}
  assert not by_attribute, f"parameters outside {type(module).__name__}.PARTS: {sorted(by_attribute)}"
  for part in clf.adapter.trained_backbone:
    counts[part] = size(jax.tree.leaves(nnx.state(BACKBONE_PARTS[part](clf.backbone), partition.BackboneTrained)))
  counts["head"] = size(jax.tree.leaves(nnx.state(clf.head, partition.Head)))
  counts["trained in all"] = sum(counts.values())
  fixed = size(jax.tree.leaves(nnx.state(module, nnx.Param)))
  if fixed:
    counts["fixed (frozen, not trained)"] = fixed
  return counts


def select(per_case: jax.Array, missing: jax.Array) -> jax.Array:
  """[CASES, ...] -> [B, ...]: each sample's entry, one gather."""
  return jnp.take(per_case, missing.astype(jnp.int32), axis=0)


# ---------------------------------------------------------------------------------------------------- MMP


MMP_INITS = ("map", "normal")


@dataclasses.dataclass(frozen=True)
class MMPConfig(PromptConfig):
  """Missing-aware prompts on CLIP (DCP's "MMP" column): independent learnable tokens per missing case, per
  prompted layer and per tower, `length` 16 per layer as MAP's code.

  init: "normal" (the default: N(0, init_std^2) per value) or "map" (MAP's code: zeros with a one at a
    case-specific row). MAP's rows are constant vectors, which every block's pre-LayerNorm maps to its bias: the
    tokens of a case and layer get the same gradient and stay one token repeated `length` times (MAP's ViLT
    breaks the tie with dropout, CLIP's towers have none), and AdamW's first steps (lr 1e-2 per value) are large
    against values of 0 or 1 in a scale-free LayerNorm. On easy-VQA "map" trains to 68.3 +- 3.9 on complete,
    "normal" with init_std 0.3 to 82.6 (docs/prompts.md).
  init_std: the standard deviation of the "normal" init; 0.3 chosen on easy-VQA's validation split among 0.02,
    0.1, 0.3 and 1.0 (0.02 trains to 73.4: the steps are then as large against the values as from MAP's zeros).
  """
  name: ClassVar[str] = "mmp"
  length: int = 16
  init: str = "normal"
  init_std: float = 0.3

  def __post_init__(self):
    super().__post_init__()
    if self.init not in MMP_INITS:
      raise ValueError(f"mmp init={self.init!r}: use one of {MMP_INITS}.")
    if self.init == "map" and self.length < CASES:
      raise ValueError(f"mmp: length={self.length} must be >= {CASES} (MAP's init marks a row per missing case).")
    if self.init_std <= 0:
      raise ValueError(f"mmp: init_std={self.init_std} must be > 0.")

  def build(self, model: CLIPConfig, *, rngs: nnx.Rngs) -> nnx.Module:
    return MMPPrompts(self, model, rngs=rngs)


# MAP's init row per missing code: complete 0, text missing 2, image missing 1.
MAP_ROW = {missing_lib.COMPLETE: 0, missing_lib.TEXT_MISSING: 2, missing_lib.IMAGE_MISSING: 1}


def map_init(depth: int, length: int, width: int) -> jax.Array:
  """[CASES, depth, length, width] zeros with ones in row MAP_ROW[case] of every layer."""
  rows = jnp.asarray([MAP_ROW[case] for case in range(CASES)])
  one_hot = jax.nn.one_hot(rows, length, dtype=jnp.float32)  # [CASES, length]
  return jnp.broadcast_to(one_hot[:, None, :, None], (CASES, depth, length, width))


def mmp_init(cfg: MMPConfig, width: int, rngs: nnx.Rngs) -> jax.Array:
  """[CASES, depth, length, width], cfg.init's values."""
  if cfg.init == "map":
    return map_init(cfg.depth, cfg.length, width)
  return cfg.init_std * jax.random.normal(rngs.params(), (CASES, cfg.depth, cfg.length, width), jnp.float32)


class MMPPrompts(nnx.Module):
  PARTS: ClassVar[dict[str, tuple[str, ...]]] = {"prompts": ("vision", "text")}

  def __init__(self, cfg: MMPConfig, model: CLIPConfig, *, rngs: nnx.Rngs):
    self.depth = cfg.depth
    self.vision = partition.Prompt(mmp_init(cfg, model.vision.hidden_size, rngs))
    self.text = partition.Prompt(mmp_init(cfg, model.text.hidden_size, rngs))

  def __call__(self, missing: jax.Array) -> tuple[Prompter, Prompter]:
    vision, text = select(self.vision[...], missing), select(self.text[...], missing)  # [B, depth, L, D]
    layers = lambda tokens: lambda x: [tokens[:, layer] for layer in range(self.depth)]
    return layers(vision), layers(text)


# ---------------------------------------------------------------------------------------------------- DCP

DCP_VARIANTS = ("code", "paper")


@dataclasses.dataclass(frozen=True)
class DCPConfig(PromptConfig):
  """Deep correlated prompts: per layer [correlated | modal-common | dynamic] tokens, a third of `length` each.

  variant: "code" (the authors' implementation, the default) or "paper" (their paper's four differences:
    the layer-0 correlated prompts are the learned base prompts, the correlated map is LN(MLP(concat)) rather
    than MLP(LN(concat)), the dynamic generator is LN(MLP(LN(attention))) rather than the bare attention, and
    the missing modality's feature is zero whatever `zero_missing_features` says).
  trainable_queries: whether the dynamic prompts' attention queries are learned. The code draws them at random
    on plain tensors, not parameters, so they stay fixed (recreated from the seed; here a frozen backbone-
    partition parameter, never differentiated nor in the optimizer): False, the default, follows it.
  reduction: the bottleneck of the correlated and modal-common maps (hidden = input width // reduction; 16).
  """
  name: ClassVar[str] = "dcp"
  variant: str = "code"
  trainable_queries: bool = False
  reduction: int = 16

  def __post_init__(self):
    super().__post_init__()
    if self.variant not in DCP_VARIANTS:
      raise ValueError(f"dcp variant={self.variant!r}: use one of {DCP_VARIANTS}.")
    if self.length % 3:
      raise ValueError(f"dcp: length={self.length} must be a multiple of 3 (correlated, modal-common and dynamic "
                       "prompts, a third each).")
    if self.reduction < 1:
      raise ValueError(f"dcp: reduction={self.reduction} must be >= 1.")

  @property
  def group(self) -> int:
    return self.length // 3

  def zeroes(self) -> bool:
    return self.zero_missing_features or self.variant == "paper"

  def build(self, model: CLIPConfig, *, rngs: nnx.Rngs) -> nnx.Module:
    return DCPPrompts(self, model, rngs=rngs)


def _uniform(rngs: nnx.Rngs, shape, bound: float) -> jax.Array:
  return jax.random.uniform(rngs.params(), shape, jnp.float32, -bound, bound)


class PromptLinear(nnx.Module):
  """y = x W + b with PyTorch's nn.Linear init (W and b uniform in +-1/sqrt(in)), trained as a prompt part."""

  def __init__(self, d_in: int, d_out: int, *, rngs: nnx.Rngs):
    self.kernel = partition.Prompt(_uniform(rngs, (d_in, d_out), d_in**-0.5))
    self.bias = partition.Prompt(_uniform(rngs, (d_out,), d_in**-0.5))

  def __call__(self, x: jax.Array) -> jax.Array:
    return x @ self.kernel[...] + self.bias[...]


def prompt_layer_norm(width: int) -> LayerNorm:
  """The backbone's LayerNorm (PyTorch's, eps 1e-5), trained as a prompt part."""
  norm = LayerNorm(width, 1e-5)
  partition.retype(norm, partition.Prompt)
  return norm


class Bottleneck(nnx.Module):
  """Linear(in -> hidden) -> GELU (exact, PyTorch's default) -> Linear(hidden -> out)."""

  def __init__(self, d_in: int, hidden: int, d_out: int, *, rngs: nnx.Rngs):
    self.fc1 = PromptLinear(d_in, hidden, rngs=rngs)
    self.fc2 = PromptLinear(hidden, d_out, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class CorrelatedMap(nnx.Module):
  """One layer's map from the previous layer's (image, text) correlated prompts to this tower's: code
  MLP(LN(concat)), paper LN(MLP(concat))."""

  def __init__(self, d_in: int, d_out: int, cfg: DCPConfig, *, rngs: nnx.Rngs):
    self.norm_first = cfg.variant == "code"
    self.norm = prompt_layer_norm(d_in if self.norm_first else d_out)
    self.mlp = Bottleneck(d_in, d_in // cfg.reduction, d_out, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.mlp(self.norm(x)) if self.norm_first else self.norm(self.mlp(x))


class DynamicPrompts(nnx.Module):
  """Single-head attention of `group` queries per missing case over a tower's layer-0 input (PyTorch's
  nn.MultiheadAttention(d, 1) init: Xavier-uniform input projections, uniform output kernel, zero biases);
  the paper variant follows it with LN -> bottleneck MLP -> LN."""

  def __init__(self, width: int, cfg: DCPConfig, *, rngs: nnx.Rngs):
    queries = 0.02 * jax.random.normal(rngs.params(), (CASES, cfg.group, width), jnp.float32)
    # Fixed queries are frozen by construction: a backbone-partition parameter, never differentiated.
    self.queries = (partition.Prompt(queries) if cfg.trainable_queries
                    else nnx.Param(queries, logical_axes=("cases", "prompt_tokens", "embed")))
    xavier = (6 / (width + 3 * width))**0.5  # over PyTorch's stacked [3 * width, width] in_proj_weight
    for name in ("q", "k", "v"):
      setattr(self, f"{name}_kernel", partition.Prompt(_uniform(rngs, (width, width), xavier)))
      setattr(self, f"{name}_bias", partition.Prompt(jnp.zeros((width,), jnp.float32)))
    self.out_kernel = partition.Prompt(_uniform(rngs, (width, width), width**-0.5))
    self.out_bias = partition.Prompt(jnp.zeros((width,), jnp.float32))
    self.refine = nnx.data(nnx.List([prompt_layer_norm(width),
                                     Bottleneck(width, width // cfg.reduction, width, rngs=rngs),
                                     prompt_layer_norm(width)]) if cfg.variant == "paper" else None)

  def __call__(self, missing: jax.Array, x: jax.Array) -> jax.Array:
    """missing [B], x [B, L, D] -> [B, group, D]."""
    x = x.astype(jnp.float32)
    q = select(self.queries[...], missing) @ self.q_kernel[...] + self.q_bias[...]
    k = x @ self.k_kernel[...] + self.k_bias[...]
    v = x @ self.v_kernel[...] + self.v_bias[...]
    weights = jax.nn.softmax((q @ k.swapaxes(-1, -2)) * q.shape[-1]**-0.5, axis=-1)
    out = (weights @ v) @ self.out_kernel[...] + self.out_bias[...]
    if self.refine is not None:
      for module in self.refine:
        out = module(out)
    return out


# Which base correlated prompt (0 the "complete" one, 1 the "missing" one) each case starts from, per tower:
# the image base is the missing one only when the image is missing, the text base when the text is.
IMAGE_BASE = jnp.asarray([0, 0, 1])
TEXT_BASE = jnp.asarray([0, 1, 0])


class DCPPrompts(nnx.Module):
  PARTS: ClassVar[dict[str, tuple[str, ...]]] = {
      "correlated prompts": ("image_base", "text_base", "correlated_vision", "correlated_text"),
      "modal-common prompts": ("common", "common_vision", "common_text"),
      "dynamic prompts (attention)": ("dynamic_vision", "dynamic_text"),
  }

  def __init__(self, cfg: DCPConfig, model: CLIPConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    dv, dt, g = model.vision.hidden_size, model.text.hidden_size, cfg.group
    base = lambda width: partition.Prompt(0.02 * jax.random.normal(rngs.params(), (2, g, width), jnp.float32))
    self.image_base, self.text_base = base(dv), base(dt)
    self.common = partition.Prompt(0.02 * jax.random.normal(rngs.params(), (CASES, g, dt), jnp.float32))
    # Correlated maps for layers 0..depth-1 (code) or 1..depth-1 (paper: layer 0 uses the bases themselves).
    first = 0 if cfg.variant == "code" else 1
    self.correlated_vision = nnx.List([CorrelatedMap(dv + dt, dv, cfg, rngs=rngs) for _ in range(first, cfg.depth)])
    self.correlated_text = nnx.List([CorrelatedMap(dv + dt, dt, cfg, rngs=rngs) for _ in range(first, cfg.depth)])
    self.common_vision = Bottleneck(dt, dt // cfg.reduction, dv, rngs=rngs)
    self.common_text = Bottleneck(dt, dt // cfg.reduction, dt, rngs=rngs)
    self.dynamic_vision = DynamicPrompts(dv, cfg, rngs=rngs)
    self.dynamic_text = DynamicPrompts(dt, cfg, rngs=rngs)

  def correlated(self) -> tuple[jax.Array, jax.Array]:
    """The correlated prompts of every case and prompted layer: ([CASES, depth, g, Dv], [CASES, depth, g, Dt]),
    from parameters only."""
    image, text = self.image_base[...][IMAGE_BASE], self.text_base[...][TEXT_BASE]
    if self.cfg.variant == "code":
      images, texts = [], []
    else:
      images, texts = [image], [text]
    for to_image, to_text in zip(self.correlated_vision, self.correlated_text):
      both = jnp.concatenate([image, text], axis=-1)
      image, text = to_image(both), to_text(both)
      images.append(image)
      texts.append(text)
    return jnp.stack(images, axis=1), jnp.stack(texts, axis=1)

  def __call__(self, missing: jax.Array) -> tuple[Prompter, Prompter]:
    image, text = self.correlated()
    common = self.common[...]
    towers = ((image, self.common_vision(common), self.dynamic_vision),
              (text, self.common_text(common), self.dynamic_text))

    def prompter(correlated, common, dynamic) -> Prompter:
      correlated, common = select(correlated, missing), select(common, missing)

      def layers(x: jax.Array) -> list[jax.Array]:
        first = jnp.concatenate([correlated[:, 0], common, dynamic(missing, x)], axis=1)
        return [first] + [correlated[:, layer] for layer in range(1, self.cfg.depth)]

      return layers

    return tuple(prompter(*tower) for tower in towers)
